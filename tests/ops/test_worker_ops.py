"""A real worker subprocess: scrape its /metrics after real jobs, list it, and catch it stuck.

The worker uses its own `redis-server` on a free port (`redis_server`, tests/ops/conftest.py),
so the test can take the broker away (the stuck-after-reconnect symptom: a live process that
consumes nothing) without touching the shared Redis.
"""

from __future__ import annotations

import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas.enums import TERMINAL_STATUSES
from tests.support import REPO_ROOT, RedisServer
from worker import health
from worker.db import make_engine, session_factory
from worker.deepgen.tiny import TinyModelPaths, tiny_env
from worker.jobstore import JobStore
from worker.publish import CeleryPublisher
from worker.registry import WorkerRegistry
from worker.submission import submit_jobs
from worker.testing import WorkerProcess, free_port, wait_for, worker_environ

pytestmark = pytest.mark.integration
FAST = {"num_inference_steps": 3, "height": 64, "width": 64}


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _args(**overrides: Any) -> Any:
    import argparse

    values = {
        "model_name": None,
        "worker_id": None,
        "stale_seconds": 5.0,
        "stuck_seconds": 3.0,
        "json": False,
    }
    return argparse.Namespace(**{**values, **overrides})


def test_metrics_registry_and_stuck_detection(
    redis_server: RedisServer,
    shared_pg_without_sweepers: str,
    s3_endpoint: str,
    s3_bucket: str,
    tiny_model: TinyModelPaths,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pg_url = shared_pg_without_sweepers  # migrated; a stalled sweeper row of another test would fail `health`
    broker_url = redis_server.url
    model = f"ops-{uuid.uuid4().hex[:8]}"
    metrics_port = free_port()
    env = worker_environ(
        database_url=pg_url,
        broker_url=broker_url,
        storage_url=f"s3://{s3_bucket}/ops",
        home=tmp_path / "home",
        s3_endpoint_url=s3_endpoint,
        model_env=tiny_env(tiny_model),
        DG_METRICS_PORT=str(metrics_port),
        DG_LEASE_SECONDS="5",
        DG_HEARTBEAT_SECONDS="0.5",
    )
    monkeypatch.setenv("DG_DATABASE_URL", pg_url)
    engine = make_engine(pg_url)
    store, registry = JobStore(session_factory(engine)), WorkerRegistry(session_factory(engine))
    worker = WorkerProcess.celery(env, model, tmp_path / "worker.log", cwd=REPO_ROOT).start()
    try:
        worker.wait_ready()
        wait_for(
            lambda: registry.list(model_name=model),
            30,
            lambda: f"worker never registered:\n{worker.log_text()[-3000:]}",
        )
        [record] = registry.list(model_name=model)
        assert record.queue == model and record.current_job_id is None

        publisher = CeleryPublisher(broker_url)
        good = {"kind": "t2i", "prompt": "a fox", "model_name": model, "params": FAST}
        bad = {
            "kind": "edit",
            "instruction": "x",
            "model_name": model,
            "params": FAST,
            "images": [f"http://127.0.0.1:{free_port()}/gone.png"],
        }
        ids = [s.job.id for s in submit_jobs(store, publisher, [good, bad, {**good, "prompt": "again"}])]
        publisher.close()
        wait_for(
            lambda: all(j.status in TERMINAL_STATUSES for j in store.get_many(ids)),
            120,
            lambda: f"jobs not finished:\n{worker.log_text()[-3000:]}",
        )
        assert [j.status for j in store.get_many(ids)] == ["succeeded", "failed", "succeeded"]

        # Metrics of the job-running process after real jobs.
        wait_for(
            lambda: (
                _scrape(metrics_port).get(("diffgentor_job_queue_wait_seconds_count", (("model", model),)))
                == 3
            ),
            10,
            "queue waits not recorded",
        )
        samples = _scrape(metrics_port)
        assert samples[("diffgentor_jobs_finished_total", (("model", model), ("status", "succeeded")))] == 2
        assert samples[("diffgentor_jobs_finished_total", (("model", model), ("status", "failed")))] == 1
        assert samples[("diffgentor_job_run_seconds_count", (("model", model), ("status", "succeeded")))] == 2
        assert samples[("diffgentor_job_run_seconds_sum", (("model", model), ("status", "succeeded")))] > 0
        assert samples[("diffgentor_model_loads_total", (("model", model),))] == 1
        assert samples[("diffgentor_model_load_seconds", (("model", model),))] > 0
        assert samples[("diffgentor_steps_per_second", (("model", model),))] > 0
        assert samples[("diffgentor_worker_busy", (("model", model),))] == 0
        assert samples[("diffgentor_queue_depth", (("queue", model),))] == 0
        assert samples[("diffgentor_broker_up", ())] == 1
        assert not any(name.startswith("diffgentor_accelerator") for name, _ in samples)  # CPU host

        # Registry and the commands: consumed everything, healthy.
        wait_for(lambda: registry.list(model_name=model)[0].jobs_done == 3, 10, "jobs_done not updated")
        assert health.cmd_workers(_args(model_name=model)) == 0
        assert record.worker_id in capsys.readouterr().out
        assert health.cmd_health(_args(model_name=model)) == 0
        from api_client.cli import main as diffgentor  # the same commands through the CLI

        assert diffgentor(["health", "--model_name", model]) == 0
        assert diffgentor(["workers", "--model_name", model, "--json"]) == 0
        assert f'"worker_id": "{record.worker_id}"' in capsys.readouterr().out

        # The broker goes away: the process lives on (heartbeat fresh) but consumes nothing.
        redis_server.stop()
        [waiting] = store.submit([{**good, "prompt": "never taken"}])
        store.mark_published([waiting.job.id])  # as if the publish reached a broker it cannot read
        assert health.cmd_health(_args(model_name=model)) == 0  # within the limit
        wait_for(lambda: health.cmd_health(_args(model_name=model)) == 1, 15, "stuck worker not detected")
        assert "stuck" in capsys.readouterr().err
        assert worker.process.poll() is None
        assert (time.time() - registry.list(model_name=model)[0].heartbeat_at.timestamp()) < 5
        assert _scrape(metrics_port)[("diffgentor_broker_up", ())] == 0

        # The process dies: its heartbeat goes stale -> gone.
        worker.kill()
        capsys.readouterr()
        wait_for(
            lambda: (
                [
                    r.state
                    for r in health.check(
                        registry, worker_id=record.worker_id, stale_seconds=5, stuck_seconds=3
                    )
                ]
                == ["gone"]
            ),
            15,
            "dead worker not detected",
        )
        assert health.cmd_health(_args(worker_id=record.worker_id)) == 1
        assert "is gone: no heartbeat" in capsys.readouterr().err
    finally:
        worker.stop()
        engine.dispose()
