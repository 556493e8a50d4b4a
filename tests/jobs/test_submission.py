"""Publish after commit, the sweeper as the safety net, and the embedded in-process mode."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from schemas.enums import JobStatus
from tests.support import FakeEngine
from worker.jobstore import JobStore, PublishTarget
from worker.settings import load_settings
from worker.submission import retry_job, submit_jobs
from worker.sweeper import sweep_once

T2I = {"kind": "t2i", "prompt": "a fox", "params": {"num_inference_steps": 2, "height": 32, "width": 32}}


class RecordingPublisher:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[PublishTarget] = []

    def publish(self, targets: Sequence[PublishTarget]) -> None:
        if self.fail:
            raise ConnectionError("redis://127.0.0.1:1/0 is unreachable")
        self.sent.extend(targets)


def test_publish_failure_leaves_rows_for_the_sweeper(store: JobStore, tmp_path: Path) -> None:
    with pytest.raises(ConnectionError):
        submit_jobs(store, RecordingPublisher(fail=True), [T2I, {**T2I, "priority": 9}])
    [low, high] = sorted(store.list(), key=lambda j: j.priority)
    assert low.status == JobStatus.QUEUED and low.published_at is None
    settings = load_settings({"DG_HOME": str(tmp_path), "DG_PUBLISH_GRACE_SECONDS": "0"})
    publisher = RecordingPublisher()
    report = sweep_once(settings, store=store, publisher=publisher)
    assert sorted(report.unpublished) == sorted([low.id, high.id]) and report.expired == []
    assert {(t.job_id, t.priority) for t in publisher.sent} == {(low.id, 0), (high.id, 9)}
    assert all(j.published_at is not None for j in store.list())
    assert sweep_once(settings, store=store, publisher=publisher).republished == 0


def test_idempotent_submit_publishes_only_new_jobs(store: JobStore) -> None:
    publisher = RecordingPublisher()
    first = submit_jobs(store, publisher, [{**T2I, "idempotency_key": "k1"}])
    again = submit_jobs(store, publisher, [{**T2I, "idempotency_key": "k1"}])
    assert again[0].job.id == first[0].job.id and not again[0].created
    assert [t.job_id for t in publisher.sent] == [first[0].job.id]


def test_in_process_publisher_runs_jobs_during_publish(tmp_path: Path) -> None:
    from worker.embedded import InProcessPublisher
    from worker.jobstore import open_job_store

    settings = load_settings({"DG_HOME": str(tmp_path)})
    engine = FakeEngine()
    store = open_job_store(settings)  # creates and migrates DG_HOME/jobs.sqlite3
    publisher = InProcessPublisher.from_settings(settings, engine_provider=lambda: engine)
    [submitted] = submit_jobs(store, publisher, [T2I])
    assert submitted.job.status == JobStatus.QUEUED  # submit_jobs returns the rows as inserted
    done = store.get(submitted.job.id)  # ... the job itself ran inside publish()
    assert done.status == JobStatus.SUCCEEDED
    assert done.artifacts[0].uri.startswith((tmp_path / "artifacts").as_uri())
    store.cancel(done.id)  # no effect on a finished job
    engine.error = ValueError("boom")
    [submitted] = submit_jobs(store, publisher, [T2I])
    failed = store.get(submitted.job.id)
    assert failed.status == JobStatus.FAILED and failed.error_message == "boom"
    engine.error = None
    retried = retry_job(store, publisher, failed.id)
    assert retried.status == JobStatus.SUCCEEDED and retried.retry_of == failed.id
    assert retried.seed == failed.seed
