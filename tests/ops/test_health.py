"""The health rule (gone / stuck / busy / ok) and the exit codes of the two commands."""

from __future__ import annotations

import argparse
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from schemas.tables import utcnow
from worker import health
from worker.db import make_engine, session_factory
from worker.jobstore import JobStore
from worker.registry import WorkerRegistry, WorkerView

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)


def _worker(
    *,
    beat_ago: float = 1,
    started_ago: float = 600,
    last_job_ago: float | None = None,
    current: str | None = None,
) -> WorkerView:
    last = NOW - timedelta(seconds=last_job_ago) if last_job_ago is not None else None
    return WorkerView(
        "w",
        "host",
        1,
        "m1",
        "m1",
        NOW - timedelta(seconds=started_ago),
        NOW - timedelta(seconds=beat_ago),
        current,
        0,
        last,
    )


def _assess(worker: WorkerView, waiting_since: float | None) -> str:
    waiting = NOW - timedelta(seconds=waiting_since) if waiting_since is not None else None
    return health.assess(worker, waiting, NOW, stale_seconds=30, stuck_seconds=60).state


@pytest.mark.parametrize(
    ("worker", "waiting_since", "state"),
    [
        (_worker(), None, "ok"),  # idle, nothing to do
        (_worker(beat_ago=31), None, "gone"),  # heartbeat stale
        (_worker(beat_ago=31, current="j"), 500, "gone"),  # stale wins over busy
        (_worker(current="j"), 500, "busy"),  # busy workers leave jobs waiting legitimately
        (_worker(last_job_ago=500), 59, "ok"),  # a job arrived 59 s ago: within the limit
        (_worker(last_job_ago=500), 61, "stuck"),  # idle since before the job came, 61 s
        (_worker(last_job_ago=10), 500, "ok"),  # freed 10 s ago: it should take the job now, not yet late
        (_worker(last_job_ago=61), 500, "stuck"),  # freed 61 s ago with a job waiting all along
        (_worker(started_ago=30), 500, "ok"),  # just (re)started: its grace counts from the start
        (_worker(started_ago=61), 500, "stuck"),  # never handled anything since start while work waits
    ],
)
def test_rule(worker: WorkerView, waiting_since: float | None, state: str) -> None:
    assert _assess(worker, waiting_since) == state


def _args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "model_name": None,
        "worker_id": None,
        "stale_seconds": 30.0,
        "stuck_seconds": 60.0,
        "json": False,
    }
    return argparse.Namespace(**{**values, **overrides})


def test_commands_exit_codes(
    shared_pg_without_sweepers: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    migrated_pg_url = (
        shared_pg_without_sweepers  # a sweeper row left stalled by another test would fail `health`
    )
    monkeypatch.setenv("DG_DATABASE_URL", migrated_pg_url)
    engine = make_engine(migrated_pg_url)
    registry, store = WorkerRegistry(session_factory(engine)), JobStore(session_factory(engine))
    model = f"health-{uuid.uuid4().hex[:6]}"
    hw1 = f"hw1-{model}"
    assert health.cmd_health(_args(model_name=model)) == health.EXIT_NO_WORKER == 6  # nobody registered
    registry.register(hw1, model_name=model, queue=model)
    assert health.cmd_health(_args(model_name=model)) == 0
    assert health.cmd_workers(_args(model_name=model)) == 0
    assert hw1 in capsys.readouterr().out
    [job] = store.submit([{"kind": "t2i", "prompt": "waits", "model_name": model}])
    store.mark_published([job.job.id])
    assert health.cmd_health(_args(model_name=model)) == 0  # just published
    # Same state seen 61 s later: the idle worker never took it.
    later = utcnow() + timedelta(seconds=61)
    results = health.check(registry, model_name=model, stale_seconds=1000, stuck_seconds=60, now=later)
    assert [r.state for r in results] == ["stuck"]
    assert health.cmd_health(_args(worker_id=hw1, stuck_seconds=0.0)) == 1
    assert "not consuming" in capsys.readouterr().err
    assert health.cmd_health(_args(worker_id="nobody")) == 6
    assert health.main(["workers", "--model_name", model, "--json"]) == 0
    assert '"state": "stuck"' not in capsys.readouterr().out  # default limit 60 s not reached yet
    engine.dispose()


def test_unreachable_database_is_its_own_exit_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.testing import free_port

    monkeypatch.setenv("DG_DATABASE_URL", f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none")
    assert health.cmd_health(_args()) == health.EXIT_UNREACHABLE == 5
    assert "cannot read the job database" in capsys.readouterr().err
