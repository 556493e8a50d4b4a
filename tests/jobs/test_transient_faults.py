"""Infrastructure faults on the job path: an object store that refuses connections, a worker that
stalls inside its upload and resumes after another worker completed the job.

The store is a real moto S3 endpoint behind `worker.faults.FaultProxy`; the job table is SQLite
and PostgreSQL (`db_url`).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from schemas.enums import JobStatus
from schemas.tables import Job, utcnow
from tests.support import FakeEngine
from worker.embedded import InProcessPublisher
from worker.faults import FaultProxy
from worker.jobstore import JobStore
from worker.runner import JobRunner, RunOutcome
from worker.settings import Settings, load_settings
from worker.storage import S3ArtifactStore, S3ClientOptions, artifact_key, open_store
from worker.sweeper import sweep_once

pytestmark = pytest.mark.integration

T2I: dict[str, Any] = {
    "kind": "t2i",
    "prompt": "a red fox",
    "params": {"num_inference_steps": 2, "width": 64, "height": 64, "seed": 7},
}
FAST_FAIL = S3ClientOptions(connect_timeout_seconds=1, read_timeout_seconds=3, max_attempts=1)


@pytest.fixture
def proxy(s3_endpoint: str) -> Any:
    host, port = s3_endpoint.removeprefix("http://").split(":")
    with FaultProxy(host, int(port)) as running:
        yield running


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    base = load_settings({"DG_HOME": str(tmp_path)})
    return replace(
        base,
        progress_interval_seconds=0.0,
        heartbeat_seconds=30,
        lease_seconds=60,
        requeue_delay_seconds=0.0,
        **overrides,
    )


def _store_through(proxy: FaultProxy, bucket: str) -> S3ArtifactStore:
    store = open_store(
        f"s3://{bucket}/t", endpoint_url=f"http://127.0.0.1:{proxy.port}", s3_options=FAST_FAIL
    )
    assert isinstance(store, S3ArtifactStore)
    return store


def test_short_outage_is_retried_in_place(
    store: JobStore, proxy: FaultProxy, s3_bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runner = JobRunner(
        _settings(tmp_path, transient_retry_seconds=30),
        FakeEngine,
        store=store,
        artifact_store=_store_through(proxy, s3_bucket),
    )
    job_id = store.submit([T2I])[0].job.id
    proxy.refuse()
    threading.Timer(2.0, proxy.restore).start()
    assert runner.run(job_id, "worker-a") == RunOutcome.SUCCEEDED
    job = store.get(job_id)
    assert (job.status, job.attempts, job.requeues, job.error_class) == (JobStatus.SUCCEEDED, 1, 0, None)
    assert "uploading the image of job" in caplog.text and "unreachable" in caplog.text  # the outage was real
    assert "Traceback" not in caplog.text  # one line per failed try


def test_long_outage_requeues_then_succeeds_once(
    store: JobStore, proxy: FaultProxy, s3_bucket: str, tmp_path: Path
) -> None:
    settings = _settings(tmp_path, transient_retry_seconds=0.5)
    artifacts = _store_through(proxy, s3_bucket)
    runner = JobRunner(settings, FakeEngine, store=store, artifact_store=artifacts)
    job_id = store.submit([T2I])[0].job.id
    with proxy.refusing():
        assert runner.run(job_id, "worker-a") == RunOutcome.REQUEUED
    job = store.get(job_id)
    assert (job.status, job.requeues, job.error_type, job.published_at) == (
        "queued",
        1,
        "StorageUnavailable",
        None,
    )
    assert "requeued after an infrastructure fault" in (job.error_message or "")
    assert job.available_at is not None

    report = sweep_once(settings, store=store, publisher=InProcessPublisher(runner, "worker-b"))
    assert report.unpublished == [job_id]
    job = store.get(job_id)
    assert (job.status, job.attempts, job.requeues, job.error_type) == (JobStatus.SUCCEEDED, 2, 1, None)
    [artifact] = job.artifacts
    assert artifact.uri == artifacts.uri_for(artifact_key(job_id, 0, attempt=2))
    assert hashlib.sha256(artifacts.get_bytes(artifact.uri)).hexdigest() == artifact.sha256


def test_outage_past_every_requeue_fails_as_transient(
    store: JobStore, proxy: FaultProxy, s3_bucket: str, tmp_path: Path
) -> None:
    runner = JobRunner(
        _settings(tmp_path, transient_retry_seconds=0.2, max_requeues=0),
        FakeEngine,
        store=store,
        artifact_store=_store_through(proxy, s3_bucket),
    )
    job_id = store.submit([T2I])[0].job.id
    with proxy.refusing():
        assert runner.run(job_id, "worker-a") == RunOutcome.FAILED
    job = store.get(job_id)
    assert (job.status, job.error_class, job.error_type) == (
        JobStatus.FAILED,
        "transient",
        "StorageUnavailable",
    )
    assert "gave up after 0 requeue(s): an infrastructure fault outlasted every retry" in (
        job.error_message or ""
    )


def test_user_error_fails_at_once_as_permanent(store: JobStore, tmp_path: Path) -> None:
    engine = FakeEngine()
    engine.error = ValueError("prompt is too long for the model")
    runner = JobRunner(
        _settings(tmp_path), lambda: engine, store=store, artifact_store=open_store((tmp_path / "a").as_uri())
    )
    job_id = store.submit([T2I])[0].job.id
    assert runner.run(job_id, "worker-a") == RunOutcome.FAILED
    job = store.get(job_id)
    assert (job.status, job.error_class, job.requeues) == (JobStatus.FAILED, "permanent", 0)


class StallingStore:
    """An artifact store whose uploads wait for `release`: a worker stalled inside its PUT."""

    def __init__(self, inner: S3ArtifactStore) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()

    def put_bytes(self, key: str, data: bytes, content_type: str = "image/png") -> str:
        self.entered.set()
        assert self.release.wait(60)
        return self.inner.put_bytes(key, data, content_type)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_stalled_uploader_cannot_change_the_winners_object(
    store: JobStore, db_engine: sa.Engine, s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    artifacts = open_store(f"s3://{s3_bucket}/late", endpoint_url=s3_endpoint)
    assert isinstance(artifacts, S3ArtifactStore)
    artifacts.client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    settings = _settings(tmp_path)
    stalling = StallingStore(artifacts)
    first = JobRunner(settings, lambda: FakeEngine((10, 200, 10)), store=store, artifact_store=stalling)
    second = JobRunner(settings, lambda: FakeEngine((10, 10, 200)), store=store, artifact_store=artifacts)
    job_id = store.submit([T2I])[0].job.id

    outcome: list[RunOutcome] = []
    late = threading.Thread(target=lambda: outcome.append(first.run(job_id, "worker-a")))
    late.start()
    assert stalling.entered.wait(30)  # past its lease check, inside the upload
    with db_engine.begin() as conn:  # its lease runs out while it stalls
        conn.execute(sa.update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow()))
    assert second.run(job_id, "worker-b") == RunOutcome.SUCCEEDED
    stalling.release.set()  # the late PUT lands now
    late.join(30)
    assert outcome == [RunOutcome.LOST]

    job = store.get(job_id)
    [artifact] = job.artifacts
    assert (job.status, job.worker_id, job.attempts) == (JobStatus.SUCCEEDED, "worker-b", 2)
    assert artifact.uri == artifacts.uri_for(artifact_key(job_id, 0, attempt=2))
    assert hashlib.sha256(artifacts.get_bytes(artifact.uri)).hexdigest() == artifact.sha256
    # The loser's object was written beside the winner's, then removed by the loser itself.
    versions = artifacts.client.list_object_versions(Bucket=s3_bucket, Prefix=f"late/jobs/{job_id}/")
    live = [v["Key"] for v in versions.get("Versions", []) if v["IsLatest"]]
    # [issue 12] each PNG with its thumbnail beside it (worker/thumbnails.py), removed with it
    assert sorted(live) == [f"late/jobs/{job_id}/2/0.png", f"late/jobs/{job_id}/2/0.thumb.webp"]
    puts = sorted(v["Key"] for v in versions.get("Versions", []))
    assert puts == [
        f"late/jobs/{job_id}/1/0.png",
        f"late/jobs/{job_id}/1/0.thumb.webp",
        f"late/jobs/{job_id}/2/0.png",
        f"late/jobs/{job_id}/2/0.thumb.webp",
    ]  # one PUT each, none over the other


def test_database_outage_at_progress_and_finish_does_not_fail_the_job(
    migrated_pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy.engine import make_url

    from worker.db import make_engine, session_factory

    url = make_url(migrated_pg_url)
    with FaultProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        engine = make_engine(url.set(port=proxy.port).render_as_string(hide_password=False))
        store = JobStore(session_factory(engine))
        fake = FakeEngine()
        outage = threading.Event()

        def cut_on_first_step(step: int) -> None:
            if not outage.is_set():
                outage.set()
                proxy.refuse()  # in the middle of generation: progress writes and the finish meet it
                threading.Timer(3.0, proxy.restore).start()

        fake.on_step = cut_on_first_step
        runner = JobRunner(
            _settings(tmp_path, transient_retry_seconds=30),
            lambda: fake,
            store=store,
            artifact_store=open_store((tmp_path / "a").as_uri()),
        )
        job_id = store.submit([T2I])[0].job.id
        try:
            assert runner.run(job_id, "worker-a") == RunOutcome.SUCCEEDED
            job = store.get(job_id)
            assert (job.status, job.attempts, job.error_class) == (JobStatus.SUCCEEDED, 1, None)
            assert (
                f"completing job {job_id} failed" in caplog.text
            )  # the finish met the outage and was retried
        finally:
            engine.dispose()
