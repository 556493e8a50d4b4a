"""Recovery paths: database errors at claim time, stale publishes, SQLite write locks, idempotent
retry and claim, lease checks before upload, soft time limits, cancel of an abandoned job, and
the beat sweep's resources."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery.exceptions import Reject, SoftTimeLimitExceeded

from schemas.enums import JobStatus
from schemas.specs import T2ISpec
from schemas.tables import Job, utcnow
from tests.support import T2I, FakeEngine
from worker.claims import ClaimedJob, ClaimRefusal
from worker.db import make_engine, session_factory, upgrade
from worker.jobstore import JobStore, PublishTarget
from worker.runner import JobRunner, RunOutcome
from worker.settings import load_settings
from worker.storage import open_store


def _set(engine: sa.Engine, job_id: str, **values: Any) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(Job).where(Job.id == job_id).values(**values))


def _db_down(*_args: Any, **_kwargs: Any) -> Any:
    raise sa.exc.OperationalError("UPDATE jobs ...", {}, Exception("could not connect to server"))


class _Recording:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def publish(self, targets: Sequence[PublishTarget]) -> None:
        self.sent.extend(t.job_id for t in targets)


@pytest.fixture
def runner(store: JobStore, tmp_path: Path) -> JobRunner:
    settings = replace(
        load_settings({"DG_HOME": str(tmp_path)}),
        progress_interval_seconds=0.0,
        heartbeat_seconds=0.2,
        lease_seconds=30,
    )
    return JobRunner(settings, FakeEngine, store=store, artifact_store=open_store(settings.storage_url))


# ---- 1. a database error at claim time must not lose the job ---------------------------------


def test_claim_database_error_requeues_the_delivery_and_the_worker_keeps_serving(
    store: JobStore, runner: JobRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import tasks

    job_id = store.submit([T2I])[0].job.id
    store.mark_published([job_id])
    sleeps: list[float] = []
    monkeypatch.setattr(tasks, "_runner", runner)
    monkeypatch.setattr(tasks, "_db_failures", 0)
    monkeypatch.setattr(tasks.time, "sleep", sleeps.append)
    with monkeypatch.context() as down:
        down.setattr(store, "claim_or_refusal", _db_down)
        for _ in range(2):
            with pytest.raises(Reject) as rejected:  # not acked away: Celery puts the message back
                tasks.run_job.run(job_id)
            assert rejected.value.requeue
    assert sleeps == [tasks.DB_RETRY_MIN_SECONDS, 2 * tasks.DB_RETRY_MIN_SECONDS]  # growing pause
    assert store.get(job_id).status == JobStatus.QUEUED
    assert tasks.run_job.run(job_id) == RunOutcome.SUCCEEDED.value  # the database is back
    assert tasks._db_failures == 0


def test_sweeper_republishes_a_queued_job_published_long_ago(
    store: JobStore, db_engine: sa.Engine, tmp_path: Path
) -> None:
    from worker.sweeper import sweep_once

    settings = load_settings(
        {"DG_HOME": str(tmp_path), "DG_PUBLISH_GRACE_SECONDS": "0", "DG_REPUBLISH_STALE_SECONDS": "600"}
    )
    lost, recent = (s.job.id for s in store.submit([T2I, T2I]))
    store.mark_published([lost, recent])
    publisher = _Recording()
    assert sweep_once(settings, store=store, publisher=publisher).republished == 0  # both recent
    _set(db_engine, lost, published_at=utcnow() - timedelta(seconds=601))  # its message was acked away
    report = sweep_once(settings, store=store, publisher=publisher)
    assert report.stale == [lost] and report.unpublished == [] and publisher.sent == [lost]
    assert sweep_once(settings, store=store, publisher=publisher).republished == 0  # published_at renewed


# ---- 2. SQLite: read-then-write transactions wait for the write lock -------------------------


def _sqlite(tmp_path: Path) -> tuple[sa.Engine, JobStore, JobStore]:
    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    return engine, JobStore(session_factory(engine)), JobStore(session_factory(make_engine(url)))


def _write_after_first_select(
    engine: sa.Engine, other: JobStore, job_id: str, needle: str = ""
) -> tuple[list[threading.Thread], list[BaseException]]:
    """Between this engine's first matching SELECT and its write, another connection writes
    progress (what the embedded runner thread does). In a deferred transaction that write
    commits at once and the later INSERT fails with SQLITE_BUSY_SNAPSHOT; under BEGIN IMMEDIATE
    it waits for our commit (so the wait here is bounded)."""
    started: list[threading.Thread] = []
    errors: list[BaseException] = []

    def write() -> None:
        try:
            other.record_progress(job_id, "w1", 3, 50)
        except BaseException as exc:
            errors.append(exc)

    @sa.event.listens_for(engine, "after_cursor_execute")
    def _after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and needle in statement and not started:
            started.append(threading.Thread(target=write))
            started[0].start()
            started[0].join(timeout=1.0)

    return started, errors


def _finish(started: list[threading.Thread], errors: list[BaseException]) -> None:
    assert started, "the concurrent write did not happen"
    started[0].join(timeout=60)
    assert errors == []  # the other writer waited for the lock and then wrote


def test_sqlite_submit_with_keys_survives_a_concurrent_writer(tmp_path: Path) -> None:
    engine, store, other = _sqlite(tmp_path)
    running = store.submit([T2ISpec(prompt="x")])[0].job
    assert other.claim(running.id, "w1", 60) is not None
    started, errors = _write_after_first_select(engine, other, running.id, "idempotency_key")
    out = store.submit([T2ISpec(prompt="a", idempotency_key="k1"), T2ISpec(prompt="b", idempotency_key="k2")])
    _finish(started, errors)
    assert len(out) == 2 and all(item.created for item in out)
    assert store.get(running.id).progress_step == 3


def test_sqlite_retry_survives_a_concurrent_writer(tmp_path: Path) -> None:
    engine, store, other = _sqlite(tmp_path)
    running = store.submit([T2ISpec(prompt="x")])[0].job
    assert other.claim(running.id, "w1", 60) is not None
    dead = store.submit([T2ISpec(prompt="y")])[0].job
    store.cancel(dead.id)
    started, errors = _write_after_first_select(engine, other, running.id)
    new = store.retry(dead.id)
    _finish(started, errors)
    assert new.retry_of == dead.id


def test_sqlite_concurrent_submits_of_one_key_make_one_job(tmp_path: Path) -> None:
    _engine, store, _other = _sqlite(tmp_path)
    barrier = threading.Barrier(6)
    ids: list[str] = []
    errors: list[BaseException] = []

    def submit() -> None:
        barrier.wait()
        try:
            ids.append(store.submit([T2ISpec(prompt="p", idempotency_key="same")])[0].job.id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and len(ids) == 6 and len(set(ids)) == 1


# ---- 3. retry is idempotent: a live retry of the job is returned, not a second one ------------


def test_retry_returns_the_live_retry_of_the_chain(store: JobStore) -> None:
    a = store.submit([T2I])[0].job
    store.cancel(a.id)
    b = store.retry(a.id)
    assert store.retry(a.id).id == b.id  # interrupted and run again: same retry
    store.cancel(b.id)
    c = store.retry(a.id)  # b ended too: a new retry
    assert c.id != b.id and store.retry(b.id).id == c.id and store.retry(a.id).id == c.id
    assert len([j for j in store.list() if j.retry_of is not None]) == 2


# ---- 6. a worker that lost its lease does not upload ------------------------------------------


def test_lease_lost_during_generation_uploads_nothing(
    store: JobStore, runner: JobRunner, db_engine: sa.Engine, tmp_path: Path
) -> None:
    engine = FakeEngine()
    runner.engine_provider = lambda: engine
    job_id = store.submit([T2I])[0].job.id
    # Taken over at the last step: no progress write sees it, the heartbeat may not have either.
    engine.on_step = lambda step: _set(db_engine, job_id, worker_id="w-other") if step == 3 else None
    assert runner.run(job_id, "w1") is RunOutcome.LOST
    assert list((tmp_path / "artifacts").rglob("*.png")) == []
    assert store.get(job_id).artifacts == []


# ---- 7. the claim is idempotent for the worker that made it -----------------------------------


def test_claim_retried_by_the_same_worker_is_granted_without_a_second_attempt(store: JobStore) -> None:
    job_id = store.submit([T2I])[0].job.id
    first = store.claim_or_refusal(job_id, "w1", 60)
    assert isinstance(first, ClaimedJob) and first.attempts == 1
    again = store.claim_or_refusal(job_id, "w1", 60)  # the reply of the first one was lost
    assert isinstance(again, ClaimedJob) and again.attempts == 1
    assert isinstance(store.claim_or_refusal(job_id, "w2", 60), ClaimRefusal)  # others still refused


def test_same_worker_reclaim_at_the_attempts_cap_is_not_poison(store: JobStore, db_engine: sa.Engine) -> None:
    job_id = store.submit([T2I])[0].job.id
    _set(db_engine, job_id, attempts=2)
    assert store.claim(job_id, "w1", 60) is not None  # attempt 3 of 3
    again = store.claim_or_refusal(job_id, "w1", 60)
    assert isinstance(again, ClaimedJob) and again.attempts == 3
    assert store.get(job_id).status == JobStatus.RUNNING


# ---- 8. the soft time limit is not swallowed by the progress writer ---------------------------


def test_soft_time_limit_during_a_progress_write_fails_the_job(
    store: JobStore, runner: JobRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = FakeEngine()
    runner.engine_provider = lambda: engine
    steps: list[int] = []
    engine.on_step = steps.append
    job_id = store.submit([{**T2I, "params": {**T2I["params"], "num_inference_steps": 10}}])[0].job.id

    def late(*_args: Any) -> Any:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(store, "record_progress", late)
    assert runner.run(job_id, "w1") is RunOutcome.FAILED
    job = store.get(job_id)
    assert job.status == JobStatus.FAILED and job.error_type == "TimeLimitExceeded"
    assert steps == [1]  # stopped at the first progress write, not after all ten steps


# ---- 9. cancel of a running job whose worker is gone ------------------------------------------


def test_cancel_of_a_running_job_with_an_expired_lease_ends_it_at_once(
    store: JobStore, db_engine: sa.Engine
) -> None:
    job_id = store.submit([T2I])[0].job.id
    assert store.claim(job_id, "w1", 60) is not None
    _set(db_engine, job_id, lease_expires_at=utcnow() - timedelta(seconds=1))
    job = store.cancel(job_id)
    assert job.status == JobStatus.CANCELLED and job.finished_at is not None
    assert not store.finish_cancelled(job_id, "w1")  # a late write of the old worker is fenced
    live = store.submit([T2I])[0].job.id
    assert store.claim(live, "w2", 60) is not None
    assert store.cancel(live).status == JobStatus.RUNNING  # live lease: the worker stops it


# ---- 10. the beat sweep keeps one engine and one publisher per process ------------------------


def test_beat_sweep_reuses_its_engine_and_publisher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import process, tasks
    from worker import sweeper as sweeper_module

    settings = load_settings(
        {"DG_HOME": str(tmp_path), "DG_BROKER_URL": "memory://", "DG_PUBLISH_GRACE_SECONDS": "0"}
    )
    upgrade(settings.database_url)
    store = JobStore(session_factory(make_engine(settings.database_url)))
    engines: list[sa.Engine] = []
    publishers: list[_Recording] = []

    def counting_engine(url: str, **kwargs: Any) -> sa.Engine:
        engines.append(make_engine(url, **kwargs))
        return engines[-1]

    def counting_publisher(_settings: Any) -> _Recording:
        publishers.append(_Recording())
        return publishers[-1]

    monkeypatch.setattr("worker.db.make_engine", counting_engine)
    monkeypatch.setattr(sweeper_module, "default_publisher", counting_publisher)
    monkeypatch.setattr(process, "_settings", settings)
    monkeypatch.setattr(tasks, "_sweeper", None)
    created_by_first_sweep = 0
    for _ in range(3):
        store.submit([T2I])  # unpublished, past the zero grace
        assert tasks.sweep.run()["unpublished"] == 1
        created_by_first_sweep = created_by_first_sweep or len(engines)
    assert len(engines) == created_by_first_sweep and len(publishers) == 1 and len(publishers[0].sent) == 3
    assert tasks._sweeper is not None
    tasks._sweeper.close()
