"""Publish after commit, the sweeper as the safety net, and the embedded in-process mode."""

from __future__ import annotations

import time
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
    assert _pending(store) == {}  # [issue 13] the failed publish is recorded as "never published"
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


@pytest.mark.parametrize("keyed", [True, False], ids=["with-a-key", "streamed"])
def test_bulk_submit_rows_read_back_as_returned(
    store: JobStore, monkeypatch: pytest.MonkeyPatch, keyed: bool
) -> None:
    """[issue 13] A bulk submit (COPY on PostgreSQL, executemany elsewhere) writes exactly the rows
    whose views it returns: ids, seeds (drawn in one go, or the spec's own), batch fields, JSON spec.
    Without idempotency keys PostgreSQL streams each row into the COPY as it is made."""
    from worker import jobstore
    from worker.batches import NewBatch

    copied: list[int] = []
    real_copy = jobstore._copy_rows

    def spy(session: object, table: object, rows: object, **kwargs: object) -> tuple[bool, list[object]]:
        done, written = real_copy(session, table, rows, **kwargs)  # type: ignore[arg-type]
        copied.append(len(written) if done else 0)
        return done, written

    monkeypatch.setattr(jobstore, "_copy_rows", spy)
    specs = [{**T2I, "prompt": f'fox {i} ünïcode "q" \\ \t'} for i in range(jobstore.COPY_MIN_ROWS + 5)]
    specs[3] = {**T2I, "params": {**T2I["params"], "seed": 7}}
    if keyed:
        specs[4] = {**T2I, "idempotency_key": "bulk-key"}
    submitted = store.submit(specs, batch=NewBatch(name="bulk"), publishing=True)
    views = [s.job for s in submitted]
    assert store.get_many([v.id for v in views]) == views
    assert len({v.id for v in views}) == len(specs) and views[3].seed == 7
    assert all(v.batch_id == views[0].batch_id and v.batch_index == i for i, v in enumerate(views))
    assert len({v.seed for v in views}) > len(specs) // 2  # drawn, not one value for all
    assert all(v.published_at == v.created_at for v in views)
    # The jobs, then their pending-publish rows (COPY both on PostgreSQL).
    assert copied == ([len(specs)] * 2 if store.database.dialect == "postgresql" else [])
    assert _pending(store) == {v.id: v.created_at for v in views}
    if keyed:
        again = store.submit([{**T2I, "idempotency_key": "bulk-key"}] * 2)
        assert [s.created for s in again] == [False, False] and again[0].job.id == views[4].id


def _pending(store: JobStore) -> dict[str, object]:
    """The pending-publish rows (job id -> created_at)."""
    import sqlalchemy as sa

    from schemas.tables import PendingPublish

    with store.sessions() as session:
        return {row.job_id: row.created_at for row in session.scalars(sa.select(PendingPublish))}


def test_published_at_is_set_after_a_bulk_publish(store: JobStore) -> None:
    publisher = RecordingPublisher()
    submitted = submit_jobs(store, publisher, [T2I] * 60)
    assert [t.job_id for t in publisher.sent] == [s.job.id for s in submitted]
    assert all(job.published_at is not None for job in store.get_many([s.job.id for s in submitted]))
    assert store.flush_confirmations() and _pending(store) == {}  # confirmed after the publish


@pytest.mark.parametrize("count", [1, 60])
def test_a_producer_dead_between_commit_and_publish_leaves_pending_rows_the_sweeper_sends(
    store: JobStore, tmp_path: Path, count: int
) -> None:
    """[issue 13] The rows commit with `published_at` and a pending-publish row each; a producer that
    dies before its publish (here: never publishes) leaves the pending rows, and the sweeper sends
    each job once after the grace, then drops the rows (the next sweep sends nothing)."""
    made = [s.job for s in store.submit([T2I] * count, publishing=True)]
    assert all(job.published_at is not None for job in made) and set(_pending(store)) == {j.id for j in made}
    waiting = load_settings({"DG_HOME": str(tmp_path), "DG_PUBLISH_GRACE_SECONDS": "3600"})
    publisher = RecordingPublisher()
    assert sweep_once(waiting, store=store, publisher=publisher).republished == 0  # within the grace
    due = load_settings({"DG_HOME": str(tmp_path), "DG_PUBLISH_GRACE_SECONDS": "0"})
    report = sweep_once(due, store=store, publisher=publisher)
    assert sorted(report.unpublished) == sorted(j.id for j in made)
    assert sorted(t.job_id for t in publisher.sent) == sorted(j.id for j in made)
    assert _pending(store) == {} and sweep_once(due, store=store, publisher=publisher).republished == 0


def test_pending_rows_of_claimed_cancelled_or_pruned_jobs_are_dropped_not_sent(
    store: JobStore, tmp_path: Path
) -> None:
    """[issue 13] A pending row whose job is no longer queued (claimed, cancelled) or gone (pruned)
    has nothing left to publish: the sweep deletes it and publishes only the queued job."""
    import sqlalchemy as sa

    from schemas.tables import Job

    claimed, cancelled, pruned, queued = (s.job.id for s in store.submit([T2I] * 4, publishing=True))
    assert store.claim(claimed, "worker-a", 60) is not None
    store.cancel(cancelled)
    with store.database.transaction() as session:
        session.execute(sa.delete(Job).where(Job.id == pruned))
    publisher = RecordingPublisher()
    settings = load_settings({"DG_HOME": str(tmp_path), "DG_PUBLISH_GRACE_SECONDS": "0"})
    assert sweep_once(settings, store=store, publisher=publisher).unpublished == [queued]
    assert [t.job_id for t in publisher.sent] == [queued] and _pending(store) == {}


def test_group_writer_shares_one_write_and_keeps_each_callers_outcome() -> None:
    """[issue 13] Concurrent callers wait for one write holding all their items; a row error
    (here ValueError) makes each item be written alone, so only its caller fails."""
    import threading

    from worker.grouping import GroupWriter

    groups: list[list[int]] = []
    first_started, release = threading.Event(), threading.Event()

    def write(items: list[int]) -> str:
        groups.append(list(items))
        if items == [0]:
            first_started.set()
            assert release.wait(10)
        if 13 in items:
            raise ValueError(f"bad item 13 in {items}")
        return f"wrote {len(items)}"

    writer: GroupWriter[int, str] = GroupWriter(write, alone_on=(ValueError,))
    outcomes: dict[int, str] = {}

    def call(item: int) -> None:
        try:
            outcomes[item] = writer(item)
        except ValueError as exc:
            outcomes[item] = f"error: {exc}"

    threads = [threading.Thread(target=call, args=(0,))]
    threads[0].start()
    assert first_started.wait(10)
    threads += [threading.Thread(target=call, args=(i,)) for i in range(1, 20)]
    for thread in threads[1:]:
        thread.start()
    deadline = time.monotonic() + 10
    while len(writer._queue) < 19 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in threads:
        thread.join(10)
    assert groups[0] == [0] and sorted(groups[1]) == list(range(1, 20))  # one write for the 19 waiting
    assert outcomes[0] == "wrote 1" and outcomes[13] == "error: bad item 13 in [13]"
    assert all(outcomes[i] == "wrote 1" for i in range(1, 20) if i != 13)  # each written alone after
    assert writer(42) == "wrote 1" and not writer._busy


class GroupingPublisher(RecordingPublisher):
    """Lets concurrent single submits share a publish call, as CeleryPublisher does; records the calls."""

    groups_single_submits = True

    def __init__(self, fail: bool = False) -> None:
        super().__init__(fail)
        self.calls: list[int] = []

    def publish(self, targets: Sequence[PublishTarget]) -> None:
        self.calls.append(len(targets))
        time.sleep(0.005)  # a round trip: lets other producer threads queue behind this call
        super().publish(targets)


@pytest.mark.parametrize("grouping", [False, True], ids=["one-by-one", "grouped"])
def test_concurrent_single_submits_each_return_their_committed_row(store: JobStore, grouping: bool) -> None:
    """[issue 13] Eight producer threads: each caller gets the view of its own committed row; with a
    publisher that allows it, their submits share INSERT statements and publish calls."""
    from concurrent.futures import ThreadPoolExecutor

    publisher = GroupingPublisher() if grouping else RecordingPublisher()
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda i: submit_jobs(store, publisher, [{**T2I, "prompt": f"p{i}"}]), range(80))
        )
    views = [submitted.job for [submitted] in results]
    assert [v.spec["prompt"] for v in views] == [f"p{i}" for i in range(80)]
    stored = store.get_many([v.id for v in views])
    assert [s.spec["prompt"] for s in stored] == [f"p{i}" for i in range(80)]
    assert stored == views  # the views returned are the rows as written (JSON statement on PostgreSQL)
    assert all(s.published_at is not None and s.status == JobStatus.QUEUED for s in stored)
    assert sorted(t.job_id for t in publisher.sent) == sorted(v.id for v in views)
    assert store.flush_confirmations()  # [issue 13] deleted in rounds by a thread on PostgreSQL
    assert _pending(store) == {}  # inserted with the jobs, confirmed after each publish
    if isinstance(publisher, GroupingPublisher):
        assert sum(publisher.calls) == 80 and len(publisher.calls) < 80  # some calls carried several


def test_a_failed_publish_of_a_group_reaches_every_caller_and_unmarks_their_rows(store: JobStore) -> None:
    """[issue 13] Grouped single submits whose shared publish fails: every caller of the group sees the
    error, and their rows read as never published (the sweeper sends them after the grace)."""
    from concurrent.futures import ThreadPoolExecutor

    publisher = GroupingPublisher(fail=True)

    def submit(i: int) -> str:
        try:
            submit_jobs(store, publisher, [{**T2I, "prompt": f"p{i}"}])
        except ConnectionError as exc:
            return str(exc)
        return "sent"

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(submit, range(40)))
    assert outcomes == ["redis://127.0.0.1:1/0 is unreachable"] * 40
    stored = store.list(limit=100)
    assert len(stored) == 40 and all(j.published_at is None and j.status == JobStatus.QUEUED for j in stored)
    assert _pending(store) == {} and len(publisher.calls) < 40


def test_one_spec_object_submitted_from_many_threads_makes_a_job_per_call(store: JobStore) -> None:
    """[issue 13] Grouped single submits tell their callers apart by call, not by spec: the same
    parsed spec object sent by eight threads at once is eight jobs, each caller its own."""
    from concurrent.futures import ThreadPoolExecutor

    from schemas.specs import parse_job_spec

    spec = parse_job_spec(T2I)
    publisher = GroupingPublisher()
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: submit_jobs(store, publisher, [spec])[0].job.id, range(40)))
    assert len(set(ids)) == 40 and sorted(t.job_id for t in publisher.sent) == sorted(ids)
