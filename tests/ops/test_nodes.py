"""Health judges Celery nodes, not prefork child pids: a killed child that Celery replaced is not gone."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from schemas.tables import WorkerRecord, utcnow
from worker import health
from worker.db import make_engine, session_factory
from worker.registry import WorkerRegistry, node_name
from worker.testing import WorkerProcess, wait_for, worker_environ

REPO_ROOT = Path(__file__).resolve().parents[2]


def _age(sessions: sessionmaker[Session], worker_id: str, seconds: float) -> None:
    with sessions.begin() as session:
        session.execute(
            sa.update(WorkerRecord)
            .where(WorkerRecord.worker_id == worker_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_registration_removes_the_dead_processes_of_its_node(
    registry: WorkerRegistry, sessions: sessionmaker[Session]
) -> None:
    host = socket.gethostname()
    registry.register(
        "live-sibling", model_name="m1", queue="m1", node="n1@h", hostname=host, pid=os.getpid()
    )
    registry.register("far-stale", model_name="m1", queue="m1", node="n1@h", hostname="elsewhere", pid=1)
    registry.register("far-fresh", model_name="m1", queue="m1", node="n1@h", hostname="elsewhere", pid=2)
    registry.register("dead-child", model_name="m1", queue="m1", node="n1@h", hostname=host, pid=_dead_pid())
    registry.register("other-node", model_name="m1", queue="m1", node="n2@h", hostname=host, pid=_dead_pid())
    registry.register("no-node", model_name="m1", queue="m1", hostname=host, pid=_dead_pid())
    _age(sessions, "far-stale", 60)
    replaced = registry.register(
        "new-child",
        model_name="m1",
        queue="m1",
        node="n1@h",
        hostname=host,
        pid=os.getppid(),
        replace_stale_seconds=30,
    )
    assert sorted(replaced) == ["dead-child", "far-stale"]
    assert {w.worker_id for w in registry.list()} == {
        "live-sibling",
        "far-fresh",
        "other-node",
        "no-node",
        "new-child",
    }
    assert registry.list(worker_id="new-child")[0].node == "n1@h"
    assert {w.worker_id for w in registry.list(nodes=["n1@h"])} == {"live-sibling", "far-fresh", "new-child"}


def test_gone_rows_of_a_live_node_are_replaced(
    registry: WorkerRegistry, sessions: sessionmaker[Session]
) -> None:
    # Rows another host wrote (registration cannot check their pid), so health must sort them out.
    registry.register("old-child", model_name="m1", queue="m1", node="n1@h", hostname="h", pid=11)
    registry.register("new-child", model_name="m1", queue="m1", node="n1@h", hostname="h", pid=12)
    registry.register("dead-node", model_name="m1", queue="m1", node="n2@h", hostname="h", pid=21)
    registry.register("old-release", model_name="m1", queue="m1", hostname="h", pid=31)  # no node
    for worker_id in ("old-child", "dead-node", "old-release"):
        _age(sessions, worker_id, 120)
    states = {r.worker.worker_id: r.state for r in health.check(registry, stale_seconds=30, stuck_seconds=60)}
    assert states == {"old-child": "replaced", "new-child": "ok", "dead-node": "gone", "old-release": "gone"}
    [old] = health.check(registry, worker_id="old-child", stale_seconds=30, stuck_seconds=60)
    assert old.healthy and "consumes again as new-child" in old.reason
    # The whole node dies: every row of it is gone.
    _age(sessions, "new-child", 120)
    states = {r.worker.worker_id: r.state for r in health.check(registry, stale_seconds=30, stuck_seconds=60)}
    assert states["old-child"] == states["new-child"] == "gone"


def test_node_name_parsing() -> None:
    assert node_name("deepgen-ab12@gpu1") == "deepgen-ab12@gpu1"
    assert node_name(None) is None and node_name("") is None and node_name(object()) is None


def _args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "model_name": None,
        "worker_id": None,
        "stale_seconds": 3.0,
        "stuck_seconds": 60.0,
        "json": False,
    }
    return argparse.Namespace(**{**values, **overrides})


@pytest.mark.integration
def test_killed_prefork_child_is_replaced_and_a_killed_worker_is_gone(
    shared_pg_without_sweepers: str,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pg_url = shared_pg_without_sweepers
    model = f"node-{uuid.uuid4().hex[:8]}"
    env = worker_environ(
        database_url=pg_url,
        broker_url=redis_url,
        storage_url=f"file://{tmp_path / 'out'}",
        home=tmp_path / "home",
        DG_HEARTBEAT_SECONDS="0.5",
    )  # no job runs: no model needed
    monkeypatch.setenv("DG_DATABASE_URL", pg_url)
    engine = make_engine(pg_url)
    registry = WorkerRegistry(session_factory(engine))
    node = f"{model}-n1@{socket.gethostname()}"
    worker = WorkerProcess.celery(
        env, model, tmp_path / "worker.log", node_name=f"{model}-n1@%h", cwd=REPO_ROOT
    ).start()
    try:
        worker.wait_ready()
        wait_for(
            lambda: registry.list(model_name=model),
            30,
            lambda: f"worker never registered:\n{worker.log_text()[-3000:]}",
        )
        [first] = registry.list(model_name=model)
        [child] = worker.child_pids()
        assert (first.node, first.pid) == (node, child)  # the Celery node name reaches the child's row

        os.kill(child, signal.SIGKILL)  # the OOM killer, or a hard time limit
        wait_for(
            lambda: [w.worker_id for w in registry.list(model_name=model)] not in ([], [first.worker_id]),
            30,
            lambda: f"no new child registered:\n{worker.log_text()[-3000:]}",
        )
        [second] = registry.list(model_name=model)  # the new child deleted the dead one's row
        assert second.node == node and second.pid != child and worker.process.poll() is None
        assert worker.child_pids() == [second.pid]
        time.sleep(3.5)  # past the stale limit of the killed child's last heartbeat
        assert [
            r.state for r in health.check(registry, model_name=model, stale_seconds=3, stuck_seconds=60)
        ] == ["ok"]
        capsys.readouterr()
        assert health.cmd_health(_args(model_name=model)) == 0
        assert first.worker_id not in capsys.readouterr().err

        worker.kill()  # the whole worker, main process and child: the node is gone
        wait_for(
            lambda: (
                [r.state for r in health.check(registry, model_name=model, stale_seconds=3, stuck_seconds=60)]
                == ["gone"]
            ),
            15,
            "dead node not gone",
        )
        assert health.cmd_health(_args(model_name=model)) == health.EXIT_UNHEALTHY
        assert f"{second.worker_id} is gone: no heartbeat" in capsys.readouterr().err
    finally:
        worker.stop()
        engine.dispose()


def test_node_name_reaches_prefork_children_without_a_signal_sender(monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery < 5.6 sends `worker_process_init` without a sender: the name the `worker_init`
    handler saw in the main process (inherited by the forked child) is used."""
    from worker import hooks as registry_module

    class _WorkController:  # what Celery sends with `worker_init`: the worker, its node name expanded
        hostname = "deepgen-x1@gpu7"

    monkeypatch.setattr(registry_module, "_node", None)
    registry_module.remember_node(sender=_WorkController())
    assert registry_module._node == "deepgen-x1@gpu7"
    registry_module.remember_node(sender=None)  # nothing usable: keeps what it had
    assert registry_module._node == "deepgen-x1@gpu7"
