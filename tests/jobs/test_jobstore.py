"""Job lifecycle semantics on SQLite and PostgreSQL: claim, lease, fencing, poison, cancel, retry."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from schemas.enums import JobStatus
from schemas.tables import Job, utcnow
from schemas.views import ArtifactView
from worker.claims import POISON_ERROR_TYPE, ClaimRefusal
from worker.db import make_engine, session_factory
from worker.jobstore import IdempotencyConflict, InvalidTransition, JobNotFound, JobStore

T2I = {"kind": "t2i", "prompt": "a red fox", "params": {"height": 500, "width": 64, "num_inference_steps": 4}}


def _expire_lease(engine: sa.Engine, job_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def _artifact(index: int, uri: str = "file:///x.png") -> ArtifactView:
    return ArtifactView(index=index, uri=uri, width=64, height=512, bytes=10, sha256="ab" * 32)


def test_submit_records_rounded_size_and_a_seed(store: JobStore) -> None:
    [submitted] = store.submit([T2I])
    job = submitted.job
    assert submitted.created
    assert (job.status, job.kind, job.model_name) == (JobStatus.QUEUED, "t2i", "deepgen")
    assert (job.height, job.width) == (512, 64)
    assert job.seed is not None and 0 <= job.seed < 2**32
    assert job.progress_total == 4 and job.attempts == 0 and job.max_attempts == 3
    assert job.spec["params"]["guidance_scale"] == 4.0
    assert store.get(job.id) == job


def test_idempotency_key_returns_the_existing_job(store: JobStore) -> None:
    spec = {**T2I, "idempotency_key": "batch-7/row-1"}
    first, again_in_batch = store.submit([spec, spec])
    assert first.created and not again_in_batch.created
    assert again_in_batch.job.id == first.job.id
    [later] = store.submit([{**spec, "priority": 5}])  # scheduling, not the request: the same job
    assert not later.created and later.job.id == first.job.id
    assert len(store.list()) == 1


def test_reusing_an_idempotency_key_with_another_spec_is_an_error_naming_it(
    store: JobStore, db_engine: sa.Engine
) -> None:
    spec = {**T2I, "idempotency_key": "row-1"}
    [first] = store.submit([spec])
    with pytest.raises(IdempotencyConflict, match=r"'row-1'.*prompt") as raised:
        store.submit([{**spec, "prompt": "something else"}])
    assert raised.value.key == "row-1"
    changed = {**spec, "params": {**T2I["params"], "num_images_per_prompt": 2}}
    with pytest.raises(IdempotencyConflict, match=r"params\.num_images_per_prompt"):
        store.submit([changed])
    with pytest.raises(IdempotencyConflict):  # inside one call too
        store.submit(
            [{**spec, "idempotency_key": "row-2"}, {**spec, "idempotency_key": "row-2", "prompt": "b"}]
        )
    assert len(store.list()) == 1  # nothing of the refused calls was written
    # A row stored before a parameter existed equals a spec with that parameter's default.
    with db_engine.begin() as connection:
        stored = connection.execute(sa.select(Job.spec).where(Job.id == first.job.id)).scalar_one()
        del stored["params"]["num_images_per_prompt"]
        connection.execute(sa.update(Job).where(Job.id == first.job.id).values(spec=stored))
    [again] = store.submit([spec])
    assert not again.created and again.job.id == first.job.id


def test_claim_is_exclusive_and_finish_is_fenced(store: JobStore, db_engine: sa.Engine) -> None:
    job_id = store.submit([T2I])[0].job.id
    claimed = store.claim(job_id, "worker-a", lease_seconds=60)
    assert claimed is not None and claimed.attempts == 1 and claimed.worker_id == "worker-a"
    # A duplicate delivery while the lease is live is refused.
    refusal = store.claim_or_refusal(job_id, "worker-b", lease_seconds=60)
    assert isinstance(refusal, ClaimRefusal) and refusal.status == "running"
    # The lease expires (worker-a hung); worker-b takes over with a second attempt.
    _expire_lease(db_engine, job_id)
    takeover = store.claim(job_id, "worker-b", lease_seconds=60)
    assert takeover is not None and takeover.attempts == 2
    # worker-a wakes up: every write it tries is fenced off.
    assert not store.heartbeat(job_id, "worker-a", 60).owned
    assert not store.record_progress(job_id, "worker-a", 1, 4).owned
    assert not store.finish_succeeded(
        job_id,
        "worker-a",
        artifacts=[_artifact(0, "file:///a.png")],
        seed=1,
        width=64,
        height=512,
        provenance=None,
    )
    assert store.get(job_id).artifacts == []
    assert store.finish_succeeded(
        job_id,
        "worker-b",
        artifacts=[_artifact(0, "file:///b.png")],
        seed=5,
        width=64,
        height=512,
        provenance={"device": "cpu"},
    )
    job = store.get(job_id)
    assert job.status == JobStatus.SUCCEEDED and job.worker_id == "worker-b" and job.attempts == 2
    assert [a.uri for a in job.artifacts] == ["file:///b.png"]
    assert job.progress_step == job.progress_total == 4
    # A finished job is never claimed again, and a late finish cannot change it.
    assert store.claim(job_id, "worker-c", 60) is None
    assert not store.finish_failed(job_id, "worker-b", error_type="X", error_message="late")


def test_attempts_cap_turns_a_poison_job_failed(store: JobStore, db_engine: sa.Engine) -> None:
    job_id = store.submit([T2I])[0].job.id
    for attempt in range(1, 4):
        claimed = store.claim(job_id, f"worker-{attempt}", 60)
        assert claimed is not None and claimed.attempts == attempt
        _expire_lease(db_engine, job_id)  # the worker died mid-job
    refusal = store.claim_or_refusal(job_id, "worker-4", 60)
    assert isinstance(refusal, ClaimRefusal) and refusal.status == "failed"
    job = store.get(job_id)
    assert job.status == JobStatus.FAILED and job.attempts == 3
    assert job.error_type == POISON_ERROR_TYPE and "3 attempts" in (job.error_message or "")


def test_cancel_queued_job_never_starts(store: JobStore) -> None:
    job_id = store.submit([T2I])[0].job.id
    assert store.cancel(job_id).status == JobStatus.CANCELLED
    assert store.claim(job_id, "worker-a", 60) is None
    assert store.get(job_id).finished_at is not None


def test_cancel_running_job_is_seen_by_the_worker(store: JobStore, db_engine: sa.Engine) -> None:
    job_id = store.submit([T2I])[0].job.id
    store.claim(job_id, "worker-a", 60)
    view = store.cancel(job_id)
    assert view.status == JobStatus.RUNNING and view.cancel_requested
    assert store.record_progress(job_id, "worker-a", 2, 4).cancel_requested
    assert store.heartbeat(job_id, "worker-a", 60).cancel_requested
    assert store.finish_cancelled(job_id, "worker-a")
    assert store.get(job_id).status == JobStatus.CANCELLED


def test_expired_job_with_a_cancel_request_ends_cancelled_at_reclaim(
    store: JobStore, db_engine: sa.Engine
) -> None:
    job_id = store.submit([T2I])[0].job.id
    store.claim(job_id, "worker-a", 60)
    store.cancel(job_id)
    _expire_lease(db_engine, job_id)
    assert store.claim(job_id, "worker-b", 60) is None
    assert store.get(job_id).status == JobStatus.CANCELLED


def test_retry_creates_a_linked_job(store: JobStore) -> None:
    job_id = store.submit([T2I])[0].job.id
    with pytest.raises(InvalidTransition, match="only failed or cancelled"):
        store.retry(job_id)
    store.cancel(job_id)
    retried = store.retry(job_id)
    original = store.get(job_id)
    assert retried.id != job_id and retried.retry_of == job_id
    assert retried.status == JobStatus.QUEUED and retried.seed == original.seed
    assert retried.spec == original.spec
    with pytest.raises(JobNotFound):
        store.retry("no-such-job")


def test_list_filters_and_pages(store: JobStore) -> None:
    ids = [s.job.id for s in store.submit([T2I, {**T2I, "model_name": "other"}, T2I])]
    store.cancel(ids[0])
    assert {j.id for j in store.list(status="queued")} == {ids[1], ids[2]}
    assert [j.id for j in store.list(model_name="other")] == [ids[1]]
    assert len(store.list(limit=2)) == 2 and len(store.list(limit=2, offset=2)) == 1
    assert store.list(created_after=utcnow() + timedelta(seconds=5)) == []
    assert len(store.list(created_before=utcnow() + timedelta(seconds=5))) == 3
    with pytest.raises(ValueError, match="limit"):
        store.list(limit=0)


def test_artifacts_upsert_on_job_and_index(store: JobStore) -> None:
    job_id = store.submit([T2I])[0].job.id
    store.record_artifacts(job_id, [_artifact(0, "file:///first.png")])
    store.record_artifacts(job_id, [_artifact(0, "file:///second.png"), _artifact(1)])
    assert [(a.index, a.uri) for a in store.get(job_id).artifacts] == [
        (0, "file:///second.png"),
        (1, "file:///x.png"),
    ]


def _ids(targets: list[Any]) -> set[str]:
    return {t.job_id for t in targets}


def test_sweep_candidates(store: JobStore, db_engine: sa.Engine) -> None:
    unpublished, published, running = (s.job.id for s in store.submit([T2I, T2I, T2I]))
    store.mark_published([published, running])
    store.claim(running, "worker-a", 60)
    found = store.sweep_candidates(publish_grace_seconds=60)  # all within the grace
    assert found.unpublished == found.stale == found.expired == []
    found = store.sweep_candidates(publish_grace_seconds=0, republish_stale_seconds=3600)
    assert (_ids(found.unpublished), found.stale, found.expired) == ({unpublished}, [], [])
    assert found.unpublished[0].priority == 0  # never ran: its own priority
    _expire_lease(db_engine, running)
    found = store.sweep_candidates(publish_grace_seconds=0, republish_stale_seconds=0)
    assert (_ids(found.unpublished), _ids(found.stale), _ids(found.expired)) == (
        {unpublished},
        {published},
        {running},
    )
    assert found.expired[0].priority == 9  # ran once already: ahead of new work


def test_expired_job_is_released_once_and_the_old_owner_is_fenced_out(
    store: JobStore, db_engine: sa.Engine
) -> None:
    job_id = store.submit([T2I])[0].job.id
    store.mark_published([job_id])
    claimed = store.claim(job_id, "worker-a", 60)
    assert claimed is not None
    _expire_lease(db_engine, job_id)
    assert store.release_expired([job_id]) == [job_id]
    assert store.release_expired([job_id]) == []  # once per expiry
    view = store.get(job_id)
    assert (view.status, view.worker_id, view.published_at, view.attempts) == ("queued", None, None, 1)
    assert not store.heartbeat(job_id, "worker-a", 60).owned
    assert not store.finish_failed(job_id, "worker-a", error_type="X", error_message="late")
    again = store.claim(job_id, "worker-b", 60)
    assert again is not None and again.attempts == 2


def test_requeue_does_not_count_as_an_attempt(store: JobStore) -> None:
    job_id = store.submit([T2I])[0].job.id
    for round_number in range(1, 6):  # more hand-backs than max_attempts (3)
        claimed = store.claim(job_id, f"worker-{round_number}", 60)
        assert (
            claimed is not None and claimed.attempts == round_number and claimed.requeues == round_number - 1
        )
        assert store.requeue(
            job_id,
            claimed.worker_id,
            delay_seconds=0,
            error_type="StorageUnavailable",
            error_message="store down",
        )
        assert not store.requeue(
            job_id, claimed.worker_id, delay_seconds=0, error_type="X", error_message="fenced"
        )
        view = store.get(job_id)
        assert (view.status, view.requeues, view.error_type, view.published_at) == (
            "queued",
            round_number,
            "StorageUnavailable",
            None,
        )
        assert view.available_at is not None
    found = store.sweep_candidates(publish_grace_seconds=3600)
    assert _ids(found.unpublished) == {job_id}  # due now, though younger than the grace
    claimed = store.claim(job_id, "worker-last", 60)
    assert claimed is not None and store.get(job_id).error_type is None


def test_requeued_job_waits_until_it_is_due(store: JobStore) -> None:
    job_id = store.submit([T2I])[0].job.id
    claimed = store.claim(job_id, "worker-a", 60)
    assert claimed is not None
    store.requeue(job_id, "worker-a", delay_seconds=600, error_type="X", error_message="down")
    assert store.sweep_candidates(publish_grace_seconds=0).unpublished == []


def test_broker_loss_makes_published_queued_jobs_due(store: JobStore) -> None:
    queued, running, fresh = (s.job.id for s in store.submit([T2I, T2I, T2I]))
    store.mark_published([queued, running])
    store.claim(running, "worker-a", 60)
    assert store.requeue_published_queued() == 1
    found = store.sweep_candidates(publish_grace_seconds=3600)
    assert _ids(found.unpublished) == {queued}  # due now; `fresh` (never published) waits for its grace
    assert store.get(running).status == "running" and store.get(fresh).published_at is None


def test_two_concurrent_claimers_never_both_win(db_url: str) -> None:
    engines = [make_engine(db_url), make_engine(db_url)]
    stores = [JobStore(session_factory(e)) for e in engines]
    job_ids = [s.job.id for s in stores[0].submit([T2I] * 20)]
    wins: dict[str, list[str]] = {"a": [], "b": []}
    barrier = threading.Barrier(2)

    def claimer(name: str, store: JobStore) -> None:
        barrier.wait()
        for job_id in job_ids:
            if store.claim(job_id, name, 60) is not None:
                wins[name].append(job_id)
            time.sleep(0)

    threads = [threading.Thread(target=claimer, args=(n, s)) for n, s in zip("ab", stores, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for engine in engines:
        engine.dispose()
    assert sorted(wins["a"] + wins["b"]) == sorted(job_ids)
    assert not set(wins["a"]) & set(wins["b"])
    assert all(j.attempts == 1 for j in stores[0].list(limit=100))


# ---- leases on the database's clock ------------------------------------------------------------


def test_db_now_plus_is_the_database_clock_in_the_stored_format(
    store: JobStore, db_engine: sa.Engine
) -> None:
    from worker.claims import db_now_plus

    with db_engine.connect() as conn:
        before = utcnow()
        now, later = conn.execute(sa.select(db_now_plus(0), db_now_plus(60.25))).one()
        after = utcnow()
    assert now.tzinfo is not None and later - now == timedelta(seconds=60.25)
    assert before - timedelta(seconds=2) <= now <= after + timedelta(seconds=2)  # same machine here
    # Compared with stored values at sub-second precision (SQLite compares the stored text).
    job_id = store.submit([T2I])[0].job.id
    assert store.claim(job_id, "worker-a", 60) is not None
    with db_engine.begin() as conn:
        conn.execute(
            sa.update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() + timedelta(seconds=0.4))
        )
    assert isinstance(store.claim_or_refusal(job_id, "worker-b", 60), ClaimRefusal)
    time.sleep(0.5)
    assert store.claim(job_id, "worker-b", 0.25) is not None
    time.sleep(0.4)  # a fractional lease expires too
    assert store.claim(job_id, "worker-c", 60) is not None


@pytest.mark.parametrize("host_offset_hours", [1, -1])
def test_leases_are_judged_on_the_database_clock_not_the_hosts(
    store: JobStore, db_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch, host_offset_hours: int
) -> None:
    """A worker or sweeper host whose clock runs ahead must not take over a live lease; one whose
    clock lags must not keep an expired lease from being taken over."""
    import worker.claims
    import worker.jobstore

    job_id = store.submit([T2I])[0].job.id
    offset = timedelta(hours=host_offset_hours)
    monkeypatch.setattr(worker.claims, "utcnow", lambda: utcnow() + offset)
    monkeypatch.setattr(worker.jobstore, "utcnow", lambda: utcnow() + offset)

    claimed = store.claim(job_id, "worker-a", 60)
    assert claimed is not None
    expected = utcnow() + timedelta(seconds=60)
    assert abs((claimed.lease_expires_at - expected).total_seconds()) < 5  # not shifted by the host clock
    assert isinstance(store.claim_or_refusal(job_id, "worker-b", 60), ClaimRefusal)
    assert store.release_expired([job_id]) == []  # even when the sweeper's own scan thinks it expired
    assert store.heartbeat(job_id, "worker-a", 60).owned
    assert abs((_lease(db_engine, job_id) - expected).total_seconds()) < 5

    _expire_lease(db_engine, job_id)  # a second ago on the database's clock
    if host_offset_hours > 0:
        assert store.release_expired([job_id]) == [job_id]
    taken = store.claim(job_id, "worker-b", 60)
    assert taken is not None and taken.worker_id == "worker-b" and taken.attempts == 2
    assert not store.heartbeat(job_id, "worker-a", 60).owned


def _lease(engine: sa.Engine, job_id: str) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(Job.lease_expires_at).where(Job.id == job_id)).scalar_one()


def test_health_measures_and_warns_about_clock_skew(
    db_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import health

    sessions = session_factory(db_engine)
    assert abs(health.clock_skew_seconds(sessions)) < 2  # the database runs on this machine
    assert health.clock_skew_warning(1.5) is None and health.clock_skew_warning(-2.0) is None
    monkeypatch.setattr(health, "utcnow", lambda: utcnow() + timedelta(seconds=30))
    skew = health.clock_skew_seconds(sessions)
    assert 28 < skew < 32
    warning = health.clock_skew_warning(skew)
    assert warning is not None and "ahead of the job database's" in warning and "NTP" in warning
    assert "behind" in (health.clock_skew_warning(-3.0) or "")
