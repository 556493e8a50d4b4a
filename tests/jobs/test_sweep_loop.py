"""`diffgentor sweep --loop` survives a database outage: one line per failure, then it carries on."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from worker.db import make_engine, session_factory
from worker.faults import FaultProxy
from worker.jobstore import JobStore
from worker.testing import WorkerProcess, wait_for, worker_environ

pytestmark = pytest.mark.integration
REPO_ROOT = Path(__file__).resolve().parents[2]


def test_sweep_loop_survives_a_database_outage(migrated_pg_url: str, redis_url: str, tmp_path: Path) -> None:
    url = make_url(migrated_pg_url)
    engine = make_engine(migrated_pg_url)
    store = JobStore(session_factory(engine))
    with FaultProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        env = worker_environ(
            database_url=url.set(port=proxy.port).render_as_string(hide_password=False),
            broker_url=redis_url,
            storage_url=(tmp_path / "a").as_uri(),
            home=tmp_path,
            DG_PUBLISH_GRACE_SECONDS="0",
        )
        sweeper = WorkerProcess(
            [str(Path(sys.executable).parent / "diffgentor"), "sweep", "--loop", "--interval", "0.5"],
            env,
            tmp_path / "sweep.log",
            cwd=REPO_ROOT,
        )
        try:
            sweeper.start()
            wait_for(lambda: "re-published" in sweeper.log_text(), 30, sweeper.log_text)
            proxy.refuse()
            wait_for(lambda: "sweep failed" in sweeper.log_text(), 30, sweeper.log_text)
            time.sleep(3)  # several sweeps' worth of outage
            assert sweeper.process.poll() is None, sweeper.log_text()  # still running
            log = sweeper.log_text()
            assert "Traceback" not in log and log.count("sweep failed") <= 4  # one line per back-off step
            proxy.restore()
            job_id = store.submit(
                [{"kind": "t2i", "prompt": "after the outage", "params": {"width": 64, "height": 64}}]
            )[0].job.id
            wait_for(
                lambda: store.get(job_id).published_at is not None,
                60,
                lambda: f"the sweeper did not publish the job after the outage:\n{sweeper.log_text()}",
            )
        finally:
            sweeper.stop()
            engine.dispose()
