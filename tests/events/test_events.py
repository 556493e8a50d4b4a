"""Job events (worker/events.py): published after each fenced change, consumed by `client.wait` and
`batch.wait`, which still finish when events are lost (no publisher, DG_EVENTS=0, Redis gone).

Timing: no test asserts a latency. "Woken by the event" is shown by waiting with poll and fallback
intervals of a minute under a 30 s timeout; speed is measured in bench/push.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from api_client import DiffgentorClient
from schemas.enums import JobStatus
from tests.support import T2I, FakeEngine, RedisServer, complete_job
from worker.batches import NewBatch
from worker.events import (
    LOCAL_HUB,
    JobEvent,
    Polling,
    RedisEventPublisher,
    RedisSubscription,
    batch_channel,
    events_for,
    job_channel,
    subscribe,
)
from worker.jobstore import JobStore
from worker.runner import JobRunner, RunOutcome
from worker.settings import Settings
from worker.storage import open_store
from worker.testing import free_port

SLOW = 60.0  # poll and fallback intervals that a test must not be waiting out


def _collect(
    subscription: Any, done: Callable[[list[JobEvent]], bool], timeout: float = 15
) -> list[JobEvent]:
    events: list[JobEvent] = []
    deadline = time.monotonic() + timeout
    while not done(events):
        assert time.monotonic() < deadline, f"events seen so far: {events}"
        events.extend(subscription.wait(0.2).events)
    return events


def _types(events: list[JobEvent], job_id: str) -> list[str]:
    return [event.type for event in events if event.job_id == job_id]


def test_each_fenced_change_is_published_on_the_job_and_batch_channels(
    settings: Settings, store: JobStore, runner: JobRunner, engine: FakeEngine
) -> None:
    ok, bad, queued, running = (s.job for s in store.submit([T2I] * 4, batch=NewBatch("events")))
    ids = [ok.id, bad.id, queued.id, running.id]
    assert settings.broker_url is not None
    jobs = RedisSubscription(settings.broker_url, [job_channel(job_id) for job_id in ids])
    batch = RedisSubscription(settings.broker_url, [batch_channel(str(ok.batch_id))])
    try:
        assert runner.run(ok.id, "w1") is RunOutcome.SUCCEEDED
        engine.error = ValueError("bad input")
        assert runner.run(bad.id, "w1") is RunOutcome.FAILED
        engine.error = None
        store.cancel(queued.id)  # queued: cancelled at once by the client's write
        engine.on_step = lambda step: store.cancel(running.id) if step == 2 else None
        assert runner.run(running.id, "w1") is RunOutcome.CANCELLED
        events = _collect(jobs, lambda seen: "cancelled" in _types(seen, running.id))
        # progress: every step but the last (DG_PROGRESS_INTERVAL_SECONDS=0; the completion writes the last)
        assert _types(events, ok.id) == ["running", "progress", "progress", "succeeded"]
        assert [(e.step, e.total) for e in events if e.job_id == ok.id and e.type == "progress"] == [
            (1, 3),
            (2, 3),
        ]
        assert _types(events, bad.id)[0] == "running" and _types(events, bad.id)[-1] == "failed"
        assert _types(events, queued.id) == ["cancelled"]
        assert _types(events, running.id)[0] == "running" and _types(events, running.id)[-1] == "cancelled"
        assert {event.batch_id for event in events} == {ok.batch_id}
        # The batch channel: starts and ends, no progress (a batch's counts do not change with it).
        on_batch = _collect(batch, lambda seen: len([e for e in seen if e.terminal]) == 4)
        assert "progress" not in {event.type for event in on_batch}
        assert sorted(e.type for e in on_batch if e.terminal) == [
            "cancelled",
            "cancelled",
            "failed",
            "succeeded",
        ]
    finally:
        jobs.close()
        batch.close()


def _queue_client(settings: Settings, **changes: Any) -> DiffgentorClient:
    return DiffgentorClient(replace(settings, **changes), poll_seconds=changes.pop("poll_seconds", SLOW))


def _later(seconds: float, action: Callable[[], Any]) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), action()), daemon=True)
    thread.start()
    return thread


def test_wait_wakes_on_the_event_not_the_poll(settings: Settings, store: JobStore, tmp_path: Path) -> None:
    job = store.submit([T2I])[0].job
    artifacts = open_store(settings.storage_url)
    with DiffgentorClient(replace(settings, events_fallback_seconds=SLOW), poll_seconds=SLOW) as client:
        finisher = _later(0.5, lambda: complete_job(store, artifacts, job.id))
        started = time.monotonic()
        view = client.wait(job.id, timeout=30)  # only an event can end this before the timeout
        finisher.join()
    assert view.status == JobStatus.SUCCEEDED and time.monotonic() - started < 30


def test_wait_still_returns_when_no_event_is_published(settings: Settings, quiet_store: JobStore) -> None:
    """A lost event only delays: the waiter reads every job again every fallback period."""
    job = quiet_store.submit([T2I])[0].job
    artifacts = open_store(settings.storage_url)
    with DiffgentorClient(replace(settings, events_fallback_seconds=0.5), poll_seconds=SLOW) as client:
        finisher = _later(0.3, lambda: complete_job(quiet_store, artifacts, job.id))
        assert client.wait(job.id, timeout=30).status == JobStatus.SUCCEEDED
        finisher.join()


def test_events_off_publishes_nothing_and_polls(settings: Settings, store: JobStore) -> None:
    off = replace(settings, events=False)
    assert events_for(off) is LOCAL_HUB  # no Redis publisher
    assert isinstance(subscribe(off, job_ids=["x"]), Polling)
    job = store.submit([T2I])[0].job
    with DiffgentorClient(off, poll_seconds=0.2) as client:
        finisher = _later(0.3, lambda: complete_job(store, open_store(settings.storage_url), job.id))
        assert client.wait([job.id], timeout=30)[0].status == JobStatus.SUCCEEDED
        finisher.join()


def test_wait_survives_losing_its_redis(settings: Settings, quiet_store: JobStore, tmp_path: Path) -> None:
    """The waiter's own Redis dies mid-wait (and another is never reachable): it polls instead."""
    server = RedisServer(tmp_path).start()
    try:
        job = quiet_store.submit([T2I])[0].job
        own = replace(settings, broker_url=server.url, events_fallback_seconds=SLOW)
        with DiffgentorClient(own, poll_seconds=0.2) as client:
            subscription = client._subscribe(job_ids=[job.id])
            assert subscription.push  # really subscribed before Redis goes
            subscription.close()

            def kill_then_finish() -> None:
                server.kill9()
                complete_job(quiet_store, open_store(settings.storage_url), job.id)

            finisher = _later(0.5, kill_then_finish)
            assert client.wait(job.id, timeout=30).status == JobStatus.SUCCEEDED
            finisher.join()
    finally:
        server.stop()
    nobody = replace(settings, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    assert isinstance(subscribe(nobody, job_ids=["x"]), Polling)  # refused at once: no hang
    assert time.monotonic() - started < 10


def test_a_dead_redis_neither_fails_nor_slows_jobs(
    settings: Settings, db_engine: Any, engine: FakeEngine
) -> None:
    from worker.db import session_factory
    from worker.events import Fanout

    publisher = RedisEventPublisher(f"redis://127.0.0.1:{free_port()}/0")
    store = JobStore(session_factory(db_engine), events=Fanout(LOCAL_HUB, publisher))
    runner = JobRunner(settings, lambda: engine, store=store, artifact_store=open_store(settings.storage_url))
    job = store.submit([{**T2I, "params": {**T2I["params"], "num_inference_steps": 20}}])[0].job
    assert runner.run(job.id, "w1") is RunOutcome.SUCCEEDED
    started = time.monotonic()
    for step in range(2000):  # emit() only queues: it never waits for the network
        publisher.emit(JobEvent("progress", job.id, step=step, total=2000))
    assert time.monotonic() - started < 1.0
    assert publisher.flush(timeout=20)
    assert publisher.dropped > 0 and publisher.published == 0


def test_embedded_waiters_are_woken_in_process(tmp_path: Path) -> None:
    """No Redis: the store's events reach subscriptions of the same process (`LocalHub`)."""
    from worker.db import make_engine, session_factory, upgrade
    from worker.settings import load_settings

    embedded = load_settings({"DG_HOME": str(tmp_path)})
    upgrade(embedded.database_url)
    engine = make_engine(embedded.database_url)
    try:
        store = JobStore(session_factory(engine))  # default sink: this process's hub
        job = store.submit([T2I], batch=NewBatch("local"))[0].job
        subscription = subscribe(embedded, job_ids=[job.id], batch_ids=[str(job.batch_id)])
        try:
            assert subscription.push
            store.claim(job.id, "w1", 30)
            store.record_progress(job.id, "w1", 1, 3)
            store.finish_cancelled(job.id, "w1")
            events = _collect(subscription, lambda seen: any(e.terminal for e in seen))
            assert [e.type for e in events] == ["running", "progress", "cancelled"]
            assert {e.batch_id for e in events} == {job.batch_id}
        finally:
            subscription.close()
    finally:
        engine.dispose()


def test_batch_wait_wakes_on_the_batch_channel(settings: Settings, store: JobStore) -> None:
    jobs = [s.job for s in store.submit([T2I] * 3, batch=NewBatch("wake"))]
    artifacts = open_store(settings.storage_url)

    def finish_all() -> None:
        for job in jobs:
            complete_job(store, artifacts, job.id)

    with DiffgentorClient(replace(settings, events_fallback_seconds=SLOW), poll_seconds=SLOW) as client:
        batch = client.batch(str(jobs[0].batch_id))
        finisher = _later(0.5, finish_all)
        assert batch.wait(timeout=30) == {
            "queued": 0,
            "running": 0,
            "succeeded": 3,
            "failed": 0,
            "cancelled": 0,
        }
        finisher.join()


@pytest.mark.parametrize("garbage", [b"not json", b'{"type": "x"}', b"[1, 2]"])
def test_stray_messages_are_ignored(garbage: bytes) -> None:
    assert JobEvent.from_json(garbage) is None
    event = JobEvent("progress", "j", "b", step=2, total=5)
    assert JobEvent.from_json(event.to_json()) == replace(event, at=round(event.at, 6))


def test_the_workers_own_wiring_publishes(settings: Settings, engine: FakeEngine) -> None:
    """`JobRunner.from_settings` (what a Celery worker builds) publishes to the broker's Redis."""
    production = JobRunner.from_settings(settings, lambda: engine)
    job = production.store.submit([T2I])[0].job
    assert settings.broker_url is not None
    subscription = RedisSubscription(settings.broker_url, [job_channel(job.id)])
    try:
        assert production.run(job.id, "w1") is RunOutcome.SUCCEEDED
        events = _collect(subscription, lambda seen: any(e.terminal for e in seen))
        assert _types(events, job.id) == ["running", "progress", "progress", "succeeded"]
    finally:
        subscription.close()
