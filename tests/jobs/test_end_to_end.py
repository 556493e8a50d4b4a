"""End to end: real Celery worker subprocesses, Redis, PostgreSQL, moto S3 and the tiny DeepGen.

The worker builds its engine with `DeepGenEngine.from_env()` exactly as production does.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from PIL import Image
from pydantic import ValidationError

from schemas.enums import TERMINAL_STATUSES, JobStatus
from schemas.views import JobView
from tests.support import REPO_ROOT
from worker.db import make_engine, session_factory
from worker.deepgen.tiny import tiny_env
from worker.jobstore import JobStore, publish_target
from worker.publish import RUN_JOB_TASK_NAME, CeleryPublisher
from worker.settings import load_settings
from worker.storage import open_store
from worker.submission import submit_jobs
from worker.sweeper import sweep_once
from worker.testing import RedisServer, WorkerProcess, free_port, wait_for, worker_environ

pytestmark = pytest.mark.integration

FAST = {"num_inference_steps": 2, "height": 64, "width": 64}
SLOW = {"num_inference_steps": 200, "height": 512, "width": 512}  # a few seconds on the tiny model


def _s3(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
    )


@pytest.fixture
def model_name() -> str:
    return f"deepgen-{uuid.uuid4().hex[:8]}"  # its own queue: tests never see each other's messages


@pytest.fixture
def worker_env(
    migrated_pg_url: str,
    redis_url: str,
    s3_endpoint: str,
    s3_bucket: str,
    tiny_model_paths: Any,
    tmp_path: Path,
) -> dict[str, str]:
    # "dynamic" keeps small edit inputs at their own size: the tiny model has a small maximum side.
    return worker_environ(
        database_url=migrated_pg_url,
        broker_url=redis_url,
        storage_url=f"s3://{s3_bucket}/e2e",
        home=tmp_path / "home",
        s3_endpoint_url=s3_endpoint,
        model_env=tiny_env(tiny_model_paths, IMAGE_RESIZE_MODE="dynamic"),
        # Short lease and a fast Redis restore sweep, so a killed worker's job comes back in seconds.
        DG_LEASE_SECONDS="3",
        DG_HEARTBEAT_SECONDS="0.5",
        DG_PUBLISH_GRACE_SECONDS="1",
        DG_SOFT_TIME_LIMIT_SECONDS="60",
        DG_HARD_TIME_LIMIT_SECONDS="70",
        DG_VISIBILITY_TIMEOUT_SECONDS="75",
        DG_UNACKED_RESTORE_INTERVAL_SECONDS="1",
        DG_UNACKED_RESTORE_THROTTLE="1",
        DG_PROGRESS_INTERVAL_SECONDS="0.2",
    )


@pytest.fixture
def store(migrated_pg_url: str) -> Iterator[JobStore]:
    engine = make_engine(migrated_pg_url)
    yield JobStore(session_factory(engine))
    engine.dispose()


@pytest.fixture
def publisher(redis_url: str) -> Iterator[CeleryPublisher]:
    publisher = CeleryPublisher(redis_url)
    yield publisher
    publisher.close()


@pytest.fixture
def start_worker(worker_env: dict[str, str], model_name: str, tmp_path: Path) -> Iterator[Any]:
    started: list[WorkerProcess] = []

    def start(env_overrides: dict[str, str] | None = None) -> WorkerProcess:
        worker = WorkerProcess.celery(
            {**worker_env, **(env_overrides or {})},
            model_name,
            tmp_path / f"worker-{len(started)}.log",
            cwd=REPO_ROOT,
        )
        started.append(worker)
        worker.start()
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


def _wait_terminal(store: JobStore, job_ids: list[str], timeout: float = 120) -> list[JobView]:
    def done() -> bool:
        return all(job.status in TERMINAL_STATUSES for job in store.get_many(job_ids))

    wait_for(
        done, timeout, lambda: f"jobs not finished: {[(j.id, j.status) for j in store.get_many(job_ids)]}"
    )
    return store.get_many(job_ids)


def _png(color: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def test_jobs_run_on_one_resident_model_and_bad_inputs_fail_cleanly(
    store: JobStore,
    publisher: CeleryPublisher,
    start_worker: Any,
    model_name: str,
    s3_endpoint: str,
    s3_bucket: str,
    worker_env: dict[str, str],
) -> None:
    s3 = _s3(s3_endpoint)
    s3.put_object(
        Bucket=s3_bucket, Key="inputs/source.png", Body=_png((10, 200, 10)), ContentType="image/png"
    )
    s3.put_object(
        Bucket=s3_bucket,
        Key="inputs/corrupt.png",
        Body=b"\x89PNG\r\n\x1a\ntruncated",
        ContentType="image/png",
    )
    worker = start_worker()

    t2i = [
        {"kind": "t2i", "prompt": f"a fox number {i}", "model_name": model_name, "params": FAST}
        for i in range(8)
    ]
    edit = {
        "kind": "edit",
        "instruction": "make it red",
        "model_name": model_name,
        "images": [f"s3://{s3_bucket}/inputs/source.png"],
        "params": {"num_inference_steps": 2},
    }
    unreachable = {**edit, "images": [f"http://127.0.0.1:{free_port()}/gone.png"]}
    corrupt = {**edit, "images": [f"s3://{s3_bucket}/inputs/corrupt.png"]}
    submitted = submit_jobs(
        store, publisher, [*t2i, edit, unreachable, corrupt, {**t2i[0], "prompt": "after"}]
    )
    jobs = _wait_terminal(store, [s.job.id for s in submitted])

    by_status = {job.id: (job.kind, job.status.value, job.error_type, job.error_message) for job in jobs}
    bad_unreachable, bad_corrupt = jobs[9], jobs[10]
    good = [job for job in jobs if job.id not in (bad_unreachable.id, bad_corrupt.id)]
    assert [job.id for job in good if job.status != JobStatus.SUCCEEDED] == [], [
        v for v in by_status.values() if v[1] != "succeeded"
    ]
    assert len(good) == 10
    assert bad_unreachable.status == JobStatus.FAILED and bad_unreachable.error_type == "InputImageError"
    assert "gone.png" in (bad_unreachable.error_message or "")
    assert bad_corrupt.status == JobStatus.FAILED and "corrupt.png" in (bad_corrupt.error_message or "")
    assert bad_unreachable.error_class == bad_corrupt.error_class == "permanent"  # the user's input
    assert jobs[-1].status == JobStatus.SUCCEEDED  # the worker kept serving after the failures

    artifacts = open_store(f"s3://{s3_bucket}/e2e", endpoint_url=s3_endpoint)
    for job in good:
        [artifact] = job.artifacts
        assert artifact.uri == f"s3://{s3_bucket}/e2e/jobs/{job.id}/1/0.png"
        data = artifacts.get_bytes(artifact.uri)
        assert len(data) == artifact.bytes and Image.open(io.BytesIO(data)).size == (
            artifact.width,
            artifact.height,
        )
        assert job.attempts == 1 and job.provenance and job.seed is not None
    edited = jobs[8]
    assert (edited.width, edited.height) == (edited.artifacts[0].width, edited.artifacts[0].height)

    # Ten (and more) jobs, one model load in the worker process.
    assert worker.log_text().count("DeepGen model loaded") == 1

    # The same message delivered twice: one execution.
    [again] = submit_jobs(store, publisher, [{**t2i[0], "prompt": "twice"}])
    publisher.publish([type("T", (), {"job_id": again.job.id, "model_name": model_name, "priority": 0})()])
    [finished] = _wait_terminal(store, [again.job.id])
    wait_for(
        lambda: worker.log_text().count(f"dropping delivery of job {again.job.id}") == 1,
        30,
        "the second delivery was not dropped",
    )
    assert finished.status == JobStatus.SUCCEEDED and finished.attempts == 1 and len(finished.artifacts) == 1


def test_bad_spec_is_rejected_at_submit(store: JobStore, publisher: CeleryPublisher) -> None:
    before = len(store.list(limit=1000))
    with pytest.raises(ValidationError) as error:
        submit_jobs(
            store,
            publisher,
            [
                {"kind": "t2i", "prompt": "ok"},
                {"kind": "t2i", "prompt": "x", "params": {"num_inference_steps": 0}},
            ],
        )
    assert "num_inference_steps" in str(error.value)
    assert len(store.list(limit=1000)) == before  # nothing of the batch was inserted


def test_cancel_queued_and_running_jobs(
    store: JobStore, publisher: CeleryPublisher, start_worker: Any, model_name: str
) -> None:
    worker = start_worker()
    running, queued, after = (
        s.job.id
        for s in submit_jobs(
            store,
            publisher,
            [
                {"kind": "t2i", "prompt": "slow", "model_name": model_name, "params": SLOW},
                {"kind": "t2i", "prompt": "queued", "model_name": model_name, "params": FAST},
                {"kind": "t2i", "prompt": "after", "model_name": model_name, "params": FAST},
            ],
        )
    )
    wait_for(lambda: store.get(running).progress_step > 0, 90, "the slow job never started")
    assert store.cancel(queued).status == JobStatus.CANCELLED
    assert store.cancel(running).cancel_requested
    stopped, never_ran, next_job = _wait_terminal(store, [running, queued, after])
    assert stopped.status == JobStatus.CANCELLED and stopped.progress_step < 200 and stopped.artifacts == []
    assert never_ran.status == JobStatus.CANCELLED and never_ran.attempts == 0
    assert next_job.status == JobStatus.SUCCEEDED
    assert worker.log_text().count("DeepGen model loaded") == 1  # the model stayed resident


def test_kill_9_of_the_whole_worker_then_a_new_worker_completes_the_job_once(
    store: JobStore,
    publisher: CeleryPublisher,
    start_worker: Any,
    model_name: str,
) -> None:
    # Redis redelivers an unacked message only after the visibility timeout, and the test waits that
    # long: keep it short, so the job too (256 px, 200 steps: ~1.5 s on an idle core, still long
    # enough to be killed mid-run, see the RUNNING check below). The soft limit stays over three times
    # the new worker's run of it (~6 s on an idle machine with the child's imports and model load),
    # or a busy 2-core machine would fail the job.
    quick = {
        "DG_SOFT_TIME_LIMIT_SECONDS": "20",
        "DG_HARD_TIME_LIMIT_SECONDS": "22",
        "DG_VISIBILITY_TIMEOUT_SECONDS": "24",
    }
    first = start_worker(quick)
    [submitted] = submit_jobs(
        store,
        publisher,
        [
            {
                "kind": "t2i",
                "prompt": "survive a crash",
                "model_name": model_name,
                "params": {"num_inference_steps": 200, "height": 256, "width": 256},
            }
        ],
    )
    job_id = submitted.job.id
    wait_for(lambda: store.get(job_id).progress_step > 0, 90, "the job never started")
    first.kill()
    assert store.get(job_id).status == JobStatus.RUNNING
    second = start_worker(quick)
    # Redis' unacked-restore brings the message back; the expired lease lets the new worker claim it.
    [job] = _wait_terminal(store, [job_id], timeout=180)
    assert job.status == JobStatus.SUCCEEDED, (job.error_type, job.error_message)
    assert job.attempts == 2 and len(job.artifacts) == 1
    assert job.worker_id is not None and second.log_text().count(f"job {job_id} succeeded") == 1


def test_hard_time_limit_fails_the_job_at_once_and_the_worker_keeps_serving(
    store: JobStore,
    publisher: CeleryPublisher,
    start_worker: Any,
    model_name: str,
) -> None:
    worker = start_worker()
    [stuck] = store.submit([{"kind": "t2i", "prompt": "stuck", "model_name": model_name, "params": SLOW}])
    job_id = stuck.job.id
    # Per-message limits (a Celery feature), so the worker's own 60/70 s stay for the next job.
    # The child is stopped right after its claim, so the soft limit (4 s) is never handled there
    # (as in a child stuck in native code) and only the hard path (7 s) can end the job.
    publisher.app.send_task(
        RUN_JOB_TASK_NAME,
        args=[job_id],
        queue=model_name,
        routing_key=model_name,
        time_limit=7,
        soft_time_limit=4,
    )
    wait_for(lambda: store.get(job_id).status != JobStatus.QUEUED, 60, "the job was never claimed")
    claimed = store.get(job_id)
    assert claimed.status == JobStatus.RUNNING and claimed.worker_id
    child_pid = int(claimed.worker_id.split(":")[1])
    assert child_pid != worker.process.pid  # the job runs in the prefork child
    os.kill(child_pid, signal.SIGSTOP)
    [job] = _wait_terminal(store, [job_id], timeout=60)  # promptly: not after the 3 s lease + retries
    assert job.status == JobStatus.FAILED and job.error_type == "TimeLimitExceeded", (
        job.error_type,
        job.error_message,
    )
    assert "hard time limit of 7 s" in (job.error_message or "") and job.attempts == 1
    assert "Hard time limit (7" in worker.log_text()
    # A new child serves the next job; the killed job is neither retried nor overwritten.
    [after] = submit_jobs(
        store, publisher, [{"kind": "t2i", "prompt": "after", "model_name": model_name, "params": FAST}]
    )
    assert _wait_terminal(store, [after.job.id], timeout=120)[0].status == JobStatus.SUCCEEDED
    again = store.get(job_id)
    assert (again.status, again.attempts, again.artifacts) == (JobStatus.FAILED, 1, [])


def test_duplicate_delivery_while_running_elsewhere_is_dropped_and_sigterm_finishes_the_job(
    store: JobStore,
    publisher: CeleryPublisher,
    start_worker: Any,
    model_name: str,
) -> None:
    first, second = start_worker(), start_worker()
    [submitted] = submit_jobs(
        store,
        publisher,
        [{"kind": "t2i", "prompt": "warm shutdown", "model_name": model_name, "params": SLOW}],
    )
    job_id = submitted.job.id
    # The same id again: the busy worker holds no second message (prefetch 1, acks late), so the
    # idle one takes it while the job runs with a live lease there.
    publisher.publish([publish_target(submitted.job)])
    wait_for(lambda: store.get(job_id).progress_step > 0, 90, "the job never started")
    owner, other = (first, second) if f"job {job_id} claimed" in first.log_text() else (second, first)
    before = store.get(job_id)
    assert before.status == JobStatus.RUNNING and before.progress_step < before.progress_total
    assert owner.warm_shutdown() == 0  # SIGTERM mid-job: finish the job, then exit
    [job] = _wait_terminal(store, [job_id])
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 1 and len(job.artifacts) == 1
    assert owner.log_text().count(f"job {job_id} succeeded") == 1
    wait_for(
        lambda: f"dropping delivery of job {job_id}: job is running" in other.log_text(),
        30,
        lambda: f"the duplicate was not dropped by the idle worker; log:\n{other.log_text()[-2000:]}",
    )
    assert f"job {job_id} claimed" not in other.log_text()


def test_sweeper_publishes_jobs_a_producer_left_unpublished(
    store: JobStore,
    start_worker: Any,
    model_name: str,
    worker_env: dict[str, str],
) -> None:
    start_worker()
    [submitted] = store.submit(
        [{"kind": "t2i", "prompt": "orphan", "model_name": model_name, "params": FAST}]
    )
    settings = load_settings(worker_env)
    wait_for(
        lambda: submitted.job.id in sweep_once(settings).unpublished, 10, "sweeper did not pick the job up"
    )
    [job] = _wait_terminal(store, [submitted.job.id])
    assert job.status == JobStatus.SUCCEEDED and job.published_at is not None


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server binary not installed")
def test_redis_restart_while_idle_then_the_next_job_runs(
    store: JobStore,
    start_worker: Any,
    model_name: str,
    tmp_path: Path,
) -> None:
    redis_server = RedisServer(tmp_path).start()
    publisher = CeleryPublisher(redis_server.url)
    try:
        start_worker({"DG_BROKER_URL": redis_server.url})
        [first] = submit_jobs(
            store, publisher, [{"kind": "t2i", "prompt": "before", "model_name": model_name, "params": FAST}]
        )
        assert _wait_terminal(store, [first.job.id])[0].status == JobStatus.SUCCEEDED
        redis_server.stop()
        redis_server.start()
        [second] = submit_jobs(
            store, publisher, [{"kind": "t2i", "prompt": "after", "model_name": model_name, "params": FAST}]
        )
        assert _wait_terminal(store, [second.job.id], timeout=90)[0].status == JobStatus.SUCCEEDED
    finally:
        publisher.close()
        redis_server.stop()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server binary not installed")
def test_broker_data_loss_recovers_with_default_settings(
    store: JobStore,
    start_worker: Any,
    model_name: str,
    worker_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """kill -9 of the broker with 20 queued jobs, restarted empty: every job succeeds once within 90 s."""
    import time

    redis_server = RedisServer(tmp_path).start()
    own_url = redis_server.url
    # The sweeper with every default (interval 30 s, grace 30 s, stale 7200 s).
    defaults = {
        k: v
        for k, v in worker_env.items()
        if not k.startswith("DG_")
        or k in {"DG_DATABASE_URL", "DG_STORAGE_URL", "DG_S3_ENDPOINT_URL", "DG_HOME"}
    }
    sweeper = WorkerProcess(
        [str(Path(sys.executable).parent / "diffgentor"), "sweep", "--loop"],
        {**defaults, "DG_BROKER_URL": own_url},
        tmp_path / "sweeper.log",
        cwd=REPO_ROOT,
    )
    publisher = CeleryPublisher(own_url)
    try:
        sweeper.start()
        wait_for(lambda: "re-published" in sweeper.log_text(), 30, lambda: sweeper.log_text()[-2000:])
        submitted = submit_jobs(
            store,
            publisher,
            [
                {"kind": "t2i", "prompt": f"queued {i}", "model_name": model_name, "params": FAST}
                for i in range(20)
            ],
        )
        job_ids = [s.job.id for s in submitted]
        assert all(job.published_at is not None for job in store.get_many(job_ids))
        redis_server.kill9()  # the 20 messages are gone with it
        redis_server.start()  # empty: no persistence
        restarted = time.monotonic()
        start_worker({"DG_BROKER_URL": own_url})
        jobs = _wait_terminal(store, job_ids, timeout=max(1.0, 90 - (time.monotonic() - restarted)))
        assert [job.status for job in jobs] == [JobStatus.SUCCEEDED] * 20
        assert all(job.attempts == 1 and len(job.artifacts) == 1 for job in jobs)  # each exactly once
        assert "the broker had lost its data" in sweeper.log_text()
    finally:
        sweeper.stop()
        publisher.close()
        redis_server.stop()


def test_kill_9_while_a_finish_is_pending_then_a_new_worker_completes_each_job_once(
    store: JobStore,
    publisher: CeleryPublisher,
    start_worker: Any,
    model_name: str,
    worker_env: dict[str, str],
    s3_endpoint: str,
    s3_bucket: str,
) -> None:
    """[issue 13] Job A's message is acked once its images exist; its finish (upload, completion)
    hangs on a hung S3 while job B generates; kill -9 of the whole worker. A is `running` with a
    lease that expires; the sweeper releases and re-publishes A (and B); a new worker completes
    each once: attempts 2, one artifact, only the winner's objects in the bucket."""
    from worker.faults import FaultProxy

    host, port = s3_endpoint.removeprefix("http://").split(":")
    with FaultProxy(host, int(port)) as proxy:
        through_proxy = {"DG_S3_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
        first = start_worker(through_proxy)
        proxy.hang()
        [a, b] = [
            s.job.id
            for s in submit_jobs(
                store,
                publisher,
                [
                    {"kind": "t2i", "prompt": f"pending finish {i}", "model_name": model_name, "params": FAST}
                    for i in range(2)
                ],
            )
        ]
        # A handed over (its message acked); B generated, waiting for A's finish.
        for marker in (f"job {a} generated", f"job {b} waits for the pending finish of {a}"):
            wait_for(
                lambda marker=marker: marker in first.log_text(),
                60,
                lambda: f"not handed over; log:\n{first.log_text()[-3000:]}",
            )
        assert [j.status for j in store.get_many([a, b])] == [JobStatus.RUNNING] * 2
        first.kill()
        proxy.restore()
        second = start_worker(through_proxy)
        settings = load_settings({**worker_env, **through_proxy})

        def swept_and_done() -> bool:
            sweep_once(settings)  # releases the expired leases (3 s) and publishes at top priority
            return all(j.status in TERMINAL_STATUSES for j in store.get_many([a, b]))

        wait_for(swept_and_done, 60, lambda: f"not finished: {store.get_many([a, b])}", interval=0.5)
    s3 = _s3(s3_endpoint)
    for job in store.get_many([a, b]):
        assert job.status == JobStatus.SUCCEEDED, (job.error_type, job.error_message)
        assert job.attempts == 2 and len(job.artifacts) == 1
        assert second.log_text().count(f"job {job.id} succeeded") == 1
        listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"e2e/jobs/{job.id}/")
        keys = sorted(o["Key"] for o in listed.get("Contents", []))
        [artifact] = job.artifacts
        named = sorted(
            uri.split(f"s3://{s3_bucket}/", 1)[1] for uri in (artifact.uri, artifact.thumbnail_uri) if uri
        )
        assert keys == named and all("/2/" in key for key in keys), keys
