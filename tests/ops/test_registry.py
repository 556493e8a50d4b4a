"""The workers table: registration, heartbeat with the current job, expiry, waiting jobs."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from schemas.tables import WorkerRecord, utcnow
from worker.jobstore import JobStore
from worker.registry import Presence, WorkerRegistry


def _job(store: JobStore, model: str = "m1") -> str:
    [submitted] = store.submit([{"kind": "t2i", "prompt": "a fox", "model_name": model}])
    return submitted.job.id


def test_register_heartbeat_and_list(registry: WorkerRegistry, store: JobStore) -> None:
    registry.register("w1", model_name="m1", queue="m1")
    registry.register("w2", model_name="m2", queue="m2")
    job_id = _job(store)
    assert registry.heartbeat("w1", current_job_id=job_id, jobs_done=3, last_job_at=utcnow())
    [w1] = registry.list(worker_id="w1")
    assert (w1.current_job_id, w1.jobs_done, w1.model_name) == (job_id, 3, "m1")
    assert w1.last_job_at is not None and w1.heartbeat_at >= w1.started_at
    assert [w.worker_id for w in registry.list(model_name="m2")] == ["w2"]
    # A delivery whose id has no row must not break the foreign key: recorded as no job.
    assert registry.heartbeat("w1", current_job_id=str(uuid.uuid4()), jobs_done=3, last_job_at=None)
    assert registry.list(worker_id="w1")[0].current_job_id is None
    registry.unregister("w1")
    assert registry.heartbeat("w1", current_job_id=None, jobs_done=0, last_job_at=None) is False


def test_stale_entries_expire(registry: WorkerRegistry, sessions: sessionmaker[Session]) -> None:
    registry.register("old", model_name="m1", queue="m1")
    registry.register("new", model_name="m1", queue="m1")
    with sessions.begin() as session:
        session.execute(
            sa.update(WorkerRecord)
            .where(WorkerRecord.worker_id == "old")
            .values(heartbeat_at=utcnow() - timedelta(hours=1))
        )
    assert registry.prune(600) == 1
    assert [w.worker_id for w in registry.list()] == ["new"]


def test_oldest_waiting_counts_only_published_queued_jobs(registry: WorkerRegistry, store: JobStore) -> None:
    unpublished = _job(store)
    first, second = _job(store), _job(store)
    store.mark_published([first])
    time.sleep(0.01)
    store.mark_published([second])
    other = _job(store, "m2")
    store.mark_published([other])
    store.cancel(other)
    waiting = registry.oldest_waiting(["m1", "m2"])
    assert set(waiting) == {"m1"}  # m2's only job is cancelled
    assert waiting["m1"] == store.get(first).published_at
    assert store.get(unpublished).published_at is None


def test_presence_writes_current_job_and_counts(registry: WorkerRegistry, store: JobStore) -> None:
    presence = Presence(registry, "w-live", model_name="m1", queue="m1", interval_seconds=30)
    presence.start()
    job_id = _job(store)
    try:
        _eventually(lambda: registry.list(worker_id="w-live"))  # registered by its thread
        presence.job_started(job_id)
        _eventually(lambda: registry.list(worker_id="w-live")[0].current_job_id == job_id)
        presence.job_finished(job_id, "succeeded")
        presence.job_finished("dup", "skipped")  # a dropped duplicate: consumed, but no job done
        _eventually(lambda: registry.list(worker_id="w-live")[0].current_job_id is None)
        [row] = registry.list(worker_id="w-live")
        assert row.jobs_done == 1 and row.last_job_at is not None
        # Expired by another worker meanwhile: the next beat registers it again.
        registry.unregister("w-live")
        presence.flush()
        assert registry.list(worker_id="w-live")[0].jobs_done == 1
    finally:
        presence.stop()
    assert registry.list(worker_id="w-live") == []


def _eventually(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")
