"""Sweeper rows in the workers table: `record_sweep`, kept out of every worker query, and the
stalled rule of `diffgentor health`."""

from __future__ import annotations

import argparse
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from schemas.tables import WorkerRecord, utcnow
from worker import health
from worker.db import make_engine, session_factory
from worker.jobstore import JobStore
from worker.registry import SWEEPER_QUEUE, WorkerRegistry, default_sweeper_id


def _age(
    sessions: sessionmaker[Session], worker_id: str, seconds: float, *, started_ago: float | None = None
) -> None:
    values = {"heartbeat_at": utcnow() - timedelta(seconds=seconds)}
    if started_ago is not None:
        values["started_at"] = utcnow() - timedelta(seconds=started_ago)
    with sessions.begin() as session:
        session.execute(sa.update(WorkerRecord).where(WorkerRecord.worker_id == worker_id).values(**values))


def test_record_sweep_upserts_a_sweeper_row_that_worker_queries_leave_out(
    registry: WorkerRegistry,
    store: JobStore,
    sessions: sessionmaker[Session],
) -> None:
    registry.register("w1", model_name="m1", queue="m1")
    registry.record_sweep("s1", interval_seconds=30, hostname="sweep-host", pid=42)
    [s1] = registry.sweepers()
    assert (
        s1.worker_id,
        s1.role,
        s1.model_name,
        s1.queue,
        s1.hostname,
        s1.pid,
        s1.sweep_interval_seconds,
    ) == ("s1", "sweeper", "*", SWEEPER_QUEUE, "sweep-host", 42, 30.0)
    assert s1.node is None and s1.heartbeat_at == s1.started_at
    # Listing (all, by model "*", by id), the stuck rule and expiry only ever see workers.
    assert [w.worker_id for w in registry.list()] == ["w1"]
    assert registry.list(model_name="*") == [] and registry.list(worker_id="s1") == []
    assert [r.worker.worker_id for r in health.check(registry, stale_seconds=30, stuck_seconds=60)] == ["w1"]
    [job] = store.submit([{"kind": "t2i", "prompt": "x", "model_name": "m1"}])
    store.mark_published([job.job.id])
    assert set(registry.oldest_waiting([w.model_name for w in registry.list()])) == {"m1"}
    _age(sessions, "s1", 3600)
    _age(sessions, "w1", 3600)
    assert registry.prune(600) == 1  # the worker only
    assert registry.list() == [] and [s.worker_id for s in registry.sweepers()] == ["s1"]
    # The next finished sweep moves the time of the last sweep, not the start.
    registry.record_sweep("s1", interval_seconds=5)
    [again] = registry.sweepers()
    assert (utcnow() - again.heartbeat_at).total_seconds() < 5 and again.sweep_interval_seconds == 5
    assert again.started_at == s1.started_at
    registry.unregister("s1")  # a clean stop
    assert registry.sweepers() == []
    assert default_sweeper_id().startswith("sweeper:")


def test_record_sweep_never_takes_over_a_worker_row(registry: WorkerRegistry) -> None:
    registry.register("same-id", model_name="m1", queue="m1")
    with pytest.raises(sa.exc.IntegrityError):
        registry.record_sweep("same-id", interval_seconds=30)
    assert [w.worker_id for w in registry.list()] == ["same-id"]


def test_record_sweep_expires_long_silent_sweepers(
    registry: WorkerRegistry, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DG_WORKER_EXPIRE_SECONDS", "600")
    for sweeper in ("dead-long-ago", "dead-recently", "slow"):
        registry.record_sweep(sweeper, interval_seconds=3600 if sweeper == "slow" else 30)
    _age(sessions, "dead-long-ago", 700)
    _age(sessions, "dead-recently", 300)
    _age(sessions, "slow", 700)  # within 3 of its hour-long intervals: not expired
    registry.record_sweep("live", interval_seconds=30)
    assert sorted(s.worker_id for s in registry.sweepers()) == ["dead-recently", "live", "slow"]


def test_stalled_and_replaced_sweepers(registry: WorkerRegistry, sessions: sessionmaker[Session]) -> None:
    registry.record_sweep("s-fast", interval_seconds=10)
    registry.record_sweep("s-slow", interval_seconds=1)  # limit: 15 s, not 3 s
    _age(sessions, "s-fast", 31, started_ago=600)
    _age(sessions, "s-slow", 14, started_ago=600)  # running since before s-fast's last sweep
    states = {r.worker.worker_id: (r.state, r.reason) for r in health.check_sweepers(registry)}
    assert states["s-slow"][0] == "ok"
    state, reason = states["s-fast"]
    assert state == "stalled" and "last finished a sweep 31s ago, at " in reason and "limit 30s" in reason
    # A sweeper started after s-fast's last sweep sweeps (a restart under a new id): s-fast is replaced.
    registry.record_sweep("s-restarted", interval_seconds=10)
    states = {r.worker.worker_id: r.state for r in health.check_sweepers(registry)}
    assert states == {"s-fast": "replaced", "s-slow": "ok", "s-restarted": "ok"}
    assert all(r.healthy for r in health.check_sweepers(registry))
    # Nobody sweeps any more: all stalled, whatever their start.
    for sweeper in ("s-slow", "s-restarted"):
        _age(sessions, sweeper, 40)
    assert {r.state for r in health.check_sweepers(registry)} == {"stalled"}


def _args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "model_name": None,
        "worker_id": None,
        "stale_seconds": 30.0,
        "stuck_seconds": 60.0,
        "json": False,
    }
    return argparse.Namespace(**{**values, **overrides})


def test_health_and_workers_commands_with_sweepers(
    shared_pg_without_sweepers: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = shared_pg_without_sweepers
    monkeypatch.setenv("DG_DATABASE_URL", url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    registry = WorkerRegistry(sessions)
    model = "sweep-health"
    registry.register("sw-worker", model_name=model, queue=model)
    try:
        # No sweeper at all: one warning line, not a failure.
        assert health.cmd_health(_args(model_name=model)) == 0
        err = capsys.readouterr().err
        assert err.count("no sweeper has reported") == 1
        assert "run `diffgentor sweep --loop` or a worker with --sweeper --beat" in err
        assert health.cmd_health(_args(worker_id="sw-worker")) == 0  # one worker: no sweeper verdict
        assert "sweeper" not in capsys.readouterr().err
        assert health.cmd_health(_args(worker_id="nobody")) == health.EXIT_NO_WORKER
        assert "sweeper" not in capsys.readouterr().err

        registry.record_sweep("sweeper:h:1", interval_seconds=10, hostname="sweep-host")
        assert health.cmd_health(_args(model_name=model)) == 0
        out, err = capsys.readouterr()
        assert "SWEEPER" in out and "sweeper:h:1" in out and "sweep-host" in out and err == ""
        assert health.cmd_workers(_args(model_name=model)) == 0
        out = capsys.readouterr().out
        assert out.index("sw-worker") < out.index("SWEEPER") < out.index("sweeper:h:1")

        _age(sessions, "sweeper:h:1", 45)  # > max(3 x 10 s, 15 s)
        assert health.cmd_health(_args(model_name=model)) == health.EXIT_UNHEALTHY
        err = capsys.readouterr().err
        assert "unhealthy: sweeper:h:1 is stalled: last finished a sweep 45s ago" in err
        assert health.cmd_health(_args(worker_id="sweeper:h:1")) == health.EXIT_UNHEALTHY  # --worker names it
        assert health.cmd_health(_args(worker_id="sw-worker")) == 0  # a worker alone: sweepers not judged
        assert health.cmd_workers(_args(model_name=model)) == 0  # listing never fails
        capsys.readouterr()
        assert health.main(["workers", "--model_name", model, "--json"]) == 0
        out = capsys.readouterr().out
        assert '"role": "sweeper"' in out and '"state": "stalled"' in out and '"role": "worker"' in out
    finally:
        registry.unregister("sweeper:h:1")
        registry.unregister("sw-worker")
        engine.dispose()
