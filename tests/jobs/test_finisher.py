"""[issue 13] The overlapped finish: `worker.finisher.Finisher` alone (bounded hand-off, order,
errors, deadline, drain), then `JobRunner.run(..., finisher)` on a real job store (the lease is
renewed until the completion commits, errors and cancels of the finish end the job as in line)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from schemas.enums import JobStatus
from tests.support import T2I
from tests.support import FakeEngine as _FakeEngine
from worker.finisher import Finisher
from worker.jobstore import JobStore
from worker.runner import JobRunner, RunOutcome
from worker.settings import load_settings
from worker.storage import StorageUnavailable, open_store

T2I_3 = {**T2I, "params": {**T2I["params"], "num_images_per_prompt": 3}}


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.lock = threading.Lock()

    def add(self, event: str) -> None:
        with self.lock:
            self.events.append(event)

    def work(self, name: str, gate: threading.Event | None = None, result: str = "succeeded") -> Any:
        def run() -> str:
            self.add(f"start {name}")
            if gate is not None:
                assert gate.wait(10)
            self.add(f"end {name}")
            return result

        return run

    def release(self, name: str) -> Any:
        return lambda: self.add(f"release {name}")

    def done(self, job_id: str, status: str, seconds: float) -> None:
        self.add(f"done {job_id} {status}")


# ---- the finisher alone -----------------------------------------------------------------------


def test_submit_returns_at_once_and_blocks_while_one_finish_is_pending() -> None:
    rec, finisher = Recorder(), Finisher(capacity=1)
    gate = threading.Event()
    started = time.monotonic()
    finisher.submit("a", rec.work("a", gate), release=rec.release("a"), on_done=rec.done)
    assert time.monotonic() - started < 0.5  # handed over, not run in line
    second_in = threading.Event()

    def second() -> None:
        finisher.submit("b", rec.work("b"), release=rec.release("b"), on_done=rec.done)
        second_in.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert not second_in.wait(0.3)  # bounded: "b" waits for "a"'s finish
    assert finisher.pending() == ["a"]
    gate.set()
    assert second_in.wait(5)
    thread.join()
    assert finisher.close(5)
    # In order; the lease of each job is let go after its work, before its end is reported.
    assert rec.events == [
        "start a",
        "end a",
        "release a",
        "done a succeeded",
        "start b",
        "end b",
        "release b",
        "done b succeeded",
    ]


def test_finishes_run_in_hand_over_order_with_capacity_two() -> None:
    rec, finisher = Recorder(), Finisher(capacity=2)
    for name in "abcdef":
        finisher.submit(name, rec.work(name), release=rec.release(name), on_done=rec.done)
    assert finisher.drain(5)
    assert [e.split()[1] for e in rec.events if e.startswith("done")] == list("abcdef")
    finisher.close(1)


def test_an_error_in_a_finish_still_releases_and_reports_and_the_next_one_runs() -> None:
    rec, finisher = Recorder(), Finisher()

    def boom() -> str:
        raise RuntimeError("bug in the finish")

    finisher.submit("a", boom, release=rec.release("a"), on_done=rec.done)
    finisher.submit("b", rec.work("b"), release=rec.release("b"), on_done=rec.done)
    assert finisher.close(5)
    assert rec.events == ["release a", "done a error", "start b", "end b", "release b", "done b succeeded"]


def test_a_finish_past_its_deadline_is_abandoned_and_the_next_one_runs_on_a_fresh_thread() -> None:
    rec, finisher = Recorder(), Finisher(timeout_seconds=0.3)
    stuck = threading.Event()
    finisher.submit("a", rec.work("a", stuck), release=rec.release("a"), on_done=rec.done)
    started = time.monotonic()
    finisher.submit("b", rec.work("b"), release=rec.release("b"), on_done=rec.done)  # waits for a's deadline
    assert 0.2 < time.monotonic() - started < 3
    assert finisher.drain(5)
    assert finisher.abandoned == 1
    stuck.set()  # the stuck finish comes back late: nothing is released or reported twice
    time.sleep(0.1)
    assert rec.events.count("release a") == 1 and rec.events.count("done a lost") == 1
    assert "done b succeeded" in rec.events
    finisher.close(1)


def test_drain_waits_for_the_pending_finish() -> None:
    rec, finisher = Recorder(), Finisher()
    gate = threading.Event()
    finisher.submit("a", rec.work("a", gate), release=rec.release("a"), on_done=rec.done)
    assert not finisher.drain(0.2)
    threading.Timer(0.2, gate.set).start()
    assert finisher.close(5)
    assert rec.events[-1] == "done a succeeded"
    with pytest.raises(RuntimeError):
        finisher.submit("b", rec.work("b"), release=rec.release("b"))


# ---- the runner with a finisher ---------------------------------------------------------------


class GatedStore:
    """The artifact store, with uploads that wait for `gate` (a slow S3) or raise `error`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.in_upload = threading.Event()
        self.error: Exception | None = None
        self.puts = 0

    def put_bytes(self, key: str, data: bytes, content_type: str) -> str:
        if key.endswith(".png"):
            self.puts += 1
            self.in_upload.set()
            assert self.gate.wait(20)
            if self.error is not None:
                raise self.error
        return str(self.inner.put_bytes(key, data, content_type))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def settings(tmp_path: Path) -> Any:
    return replace(
        load_settings({"DG_HOME": str(tmp_path)}),
        progress_interval_seconds=0.0,
        heartbeat_seconds=0.2,
        lease_seconds=1.0,
        transient_retry_seconds=0.0,
        allow_local_inputs=True,
    )


@pytest.fixture
def objects(settings: Any) -> GatedStore:
    return GatedStore(open_store(settings.storage_url))


@pytest.fixture
def runner(store: JobStore, settings: Any, objects: GatedStore) -> JobRunner:
    engine = _FakeEngine()
    return JobRunner(settings, lambda: engine, store=store, artifact_store=objects)


@pytest.fixture
def finisher() -> Any:
    finisher = Finisher(timeout_seconds=30)
    yield finisher
    finisher.close(10)


def _ends(runner: JobRunner) -> list[tuple[str, str]]:
    ends: list[tuple[str, str]] = []
    runner.on_done = lambda job_id, status, seconds: ends.append((job_id, status))
    return ends


def test_the_job_is_handed_over_and_its_lease_is_renewed_until_the_completion_commits(
    store: JobStore, runner: JobRunner, objects: GatedStore, finisher: Finisher, settings: Any
) -> None:
    ends = _ends(runner)
    [first, second] = [v.job.id for v in store.submit([T2I, {**T2I, "prompt": "next"}])]
    objects.gate.clear()  # the first job's upload hangs
    assert runner.run(first, "w1", finisher) is RunOutcome.FINISHING
    assert objects.in_upload.wait(5)
    time.sleep(3 * settings.lease_seconds)  # three lease lengths inside the upload
    # Still ours: the heartbeat goes on, so no other worker can take the job over meanwhile.
    refused = store.claim_or_refusal(first, "w2", settings.lease_seconds)
    assert getattr(refused, "reason", None) is not None, refused
    assert store.get(first).status == JobStatus.RUNNING
    # The next job generates meanwhile; its hand-over waits for the first job's finish.
    outcome: list[RunOutcome] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run(second, "w1", finisher)))
    thread.start()
    time.sleep(0.3)
    assert outcome == [] and store.get(second).status == JobStatus.RUNNING
    objects.gate.set()
    thread.join(10)
    assert outcome == [RunOutcome.FINISHING]
    assert finisher.drain(10)
    jobs = store.get_many([first, second])
    assert [j.status for j in jobs] == [JobStatus.SUCCEEDED, JobStatus.SUCCEEDED]
    assert all(j.attempts == 1 and len(j.artifacts) == 1 for j in jobs)
    assert ends == [(first, "succeeded"), (second, "succeeded")]


def test_a_permanent_error_in_the_finish_fails_the_job(
    store: JobStore, runner: JobRunner, objects: GatedStore, finisher: Finisher
) -> None:
    ends = _ends(runner)
    job_id = store.submit([T2I])[0].job.id
    objects.error = ValueError("the bucket refused the object")
    assert runner.run(job_id, "w1", finisher) is RunOutcome.FINISHING
    assert finisher.drain(10)
    job = store.get(job_id)
    assert job.status == JobStatus.FAILED and job.error_class == "permanent" and job.artifacts == []
    assert ends == [(job_id, "failed")]


def test_a_transient_error_in_the_finish_requeues_the_job(
    store: JobStore, runner: JobRunner, objects: GatedStore, finisher: Finisher
) -> None:
    ends = _ends(runner)
    job_id = store.submit([T2I])[0].job.id
    objects.error = StorageUnavailable("S3 is down")
    assert runner.run(job_id, "w1", finisher) is RunOutcome.FINISHING
    assert finisher.drain(10)
    job = store.get(job_id)
    assert job.status == JobStatus.QUEUED and job.requeues == 1
    assert ends == [(job_id, "requeued")]


def test_a_cancel_during_the_finish_of_a_three_image_job_cancels_it(
    store: JobStore, runner: JobRunner, objects: GatedStore, finisher: Finisher, settings: Any
) -> None:
    """The heartbeat still carries cancel requests to a handed-over job: its finish stops between
    two uploads and removes what it stored (a one-image job whose upload already began succeeds)."""
    ends = _ends(runner)
    job_id = store.submit([T2I_3])[0].job.id
    objects.gate.clear()
    assert runner.run(job_id, "w1", finisher) is RunOutcome.FINISHING
    assert objects.in_upload.wait(5)
    store.cancel(job_id)
    time.sleep(3 * settings.heartbeat_seconds)  # the heartbeat sees the request
    objects.gate.set()
    assert finisher.drain(10)
    job = store.get(job_id)
    assert job.status == JobStatus.CANCELLED and job.artifacts == []
    assert ends == [(job_id, "cancelled")] and objects.puts == 1


def test_without_a_finisher_the_job_finishes_in_line(store: JobStore, runner: JobRunner) -> None:
    job_id = store.submit([T2I])[0].job.id
    assert runner.run(job_id, "w1") is RunOutcome.SUCCEEDED
    assert store.get(job_id).status == JobStatus.SUCCEEDED


def test_a_redelivery_while_the_finish_is_pending_is_dropped_not_run_again(
    store: JobStore, runner: JobRunner, objects: GatedStore, finisher: Finisher
) -> None:
    """The claim would grant the job again to this same worker id (a retried claim)."""
    job_id = store.submit([T2I])[0].job.id
    objects.gate.clear()
    assert runner.run(job_id, "w1", finisher) is RunOutcome.FINISHING
    assert finisher.holds(job_id)
    assert runner.run(job_id, "w1", finisher) is RunOutcome.SKIPPED
    objects.gate.set()
    assert finisher.drain(10) and not finisher.holds(job_id)
    job = store.get(job_id)
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 1 and objects.puts == 1


def test_an_abandoned_finish_that_comes_back_late_writes_nothing(
    store: JobStore, runner: JobRunner, objects: GatedStore, settings: Any
) -> None:
    finisher = Finisher(timeout_seconds=0.5)
    ends = _ends(runner)
    job_id = store.submit([T2I])[0].job.id
    objects.gate.clear()
    assert runner.run(job_id, "w1", finisher) is RunOutcome.FINISHING
    assert objects.in_upload.wait(5)
    assert finisher.drain(5)  # past the deadline: abandoned, the lease let go
    assert ends == [(job_id, "lost")] and finisher.holds(job_id)
    time.sleep(settings.lease_seconds + 0.5)  # nobody renews the lease now
    objects.gate.set()  # the hung upload returns
    time.sleep(0.5)
    job = store.get(job_id)
    assert job.status == JobStatus.RUNNING and job.artifacts == []  # left to the sweeper
    assert not finisher.holds(job_id) and ends == [(job_id, "lost")]
    finisher.close(1)
