"""JobRunner with an injected engine: outcomes, cancel, failures, duplicates, lost leases."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from schemas.enums import JobStatus
from tests.support import T2I, FakeEngine
from worker.claims import ClaimedJob
from worker.jobstore import JobStore
from worker.png import read_generation_metadata, read_png_metadata
from worker.runner import JobRunner, ResidentEngine, RunOutcome
from worker.settings import load_settings
from worker.storage import artifact_key, open_store

# T2I with three images per prompt.
T2I_3 = {**T2I, "params": {**T2I["params"], "num_images_per_prompt": 3}}


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def runner(store: JobStore, engine: FakeEngine, tmp_path: Path) -> JobRunner:
    settings = replace(
        load_settings({"DG_HOME": str(tmp_path)}),
        progress_interval_seconds=0.0,
        heartbeat_seconds=0.2,
        lease_seconds=30,
        allow_local_inputs=True,
    )
    return JobRunner(settings, lambda: engine, store=store, artifact_store=open_store(settings.storage_url))


def test_t2i_job_succeeds_with_artifact_and_metadata(store: JobStore, runner: JobRunner) -> None:
    job_id = store.submit([T2I])[0].job.id
    assert runner.run(job_id, "w1") is RunOutcome.SUCCEEDED
    job = store.get(job_id)
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 1
    assert (job.width, job.height, job.seed) == (64, 96, 7)
    assert job.progress_step == job.progress_total == 3
    assert job.provenance == {"config": "fake", "device": "cpu"}
    [artifact] = job.artifacts
    data = runner.artifact_store.get_bytes(artifact.uri)
    assert artifact.uri.endswith(f"jobs/{job_id}/1/0.png") and artifact.bytes == len(data)
    meta = read_png_metadata(data)
    assert meta["prompt"] == "a red fox" and meta["seed"] == "7" and meta["job_id"] == job_id
    # The same message delivered again: dropped, the engine is not called a second time.
    assert runner.run(job_id, "w2") is RunOutcome.SKIPPED


def test_engine_error_fails_the_job_and_the_runner_keeps_serving(
    store: JobStore, runner: JobRunner, engine: FakeEngine
) -> None:
    bad, good = (s.job.id for s in store.submit([T2I, T2I]))
    engine.error = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert runner.run(bad, "w1") is RunOutcome.FAILED
    failed = store.get(bad)
    assert failed.status == JobStatus.FAILED and failed.error_type == "OutOfMemoryError"
    assert "ran out of memory" in (failed.error_message or "")
    engine.error = None
    assert runner.run(good, "w1") is RunOutcome.SUCCEEDED


def test_cancel_while_running_stops_at_the_next_step(
    store: JobStore, runner: JobRunner, engine: FakeEngine
) -> None:
    job_id = store.submit([{**T2I, "params": {"num_inference_steps": 10}}])[0].job.id
    engine.on_step = lambda step: store.cancel(job_id) if step == 2 else None
    assert runner.run(job_id, "w1") is RunOutcome.CANCELLED
    job = store.get(job_id)
    assert job.status == JobStatus.CANCELLED and job.artifacts == [] and job.progress_step < 10


def test_error_after_a_cancel_ends_the_job_cancelled_not_failed(
    store: JobStore, runner: JobRunner, engine: FakeEngine
) -> None:
    """E.g. an embedded model load cut short at interpreter exit, after the exit hook cancelled the job."""
    job_id = store.submit([T2I])[0].job.id

    def cancel_then_break(step: int) -> None:
        store.cancel(job_id)
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    engine.on_step = cancel_then_break
    assert runner.run(job_id, "w1") is RunOutcome.CANCELLED
    job = store.get(job_id)
    assert (job.status, job.error_type) == (JobStatus.CANCELLED, None)


def test_lost_lease_writes_nothing(
    store: JobStore, runner: JobRunner, engine: FakeEngine, db_engine: Any
) -> None:
    import sqlalchemy as sa

    from schemas.tables import Job

    job_id = store.submit([T2I])[0].job.id

    def steal(step: int) -> None:
        if step == 1:
            with db_engine.begin() as conn:
                conn.execute(sa.update(Job).where(Job.id == job_id).values(worker_id="w-other"))

    engine.on_step = steal
    assert runner.run(job_id, "w1") is RunOutcome.LOST
    assert store.get(job_id).artifacts == []


def test_edit_inputs_that_cannot_be_read_fail_with_a_reason(
    store: JobStore, runner: JobRunner, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    good = tmp_path / "good.png"
    Image.new("RGB", (80, 48), (0, 0, 255)).save(good)
    ids = [
        s.job.id
        for s in store.submit(
            [
                {"kind": "edit", "instruction": "make it blue", "images": [str(corrupt)]},
                {"kind": "edit", "instruction": "make it blue", "images": [str(tmp_path / "missing.png")]},
                {
                    "kind": "edit",
                    "instruction": "make it blue",
                    "images": [str(good)],
                    "params": {"num_inference_steps": 2},
                },
            ]
        )
    ]
    assert [runner.run(i, "w1") for i in ids] == [RunOutcome.FAILED, RunOutcome.FAILED, RunOutcome.SUCCEEDED]
    corrupt_job, missing_job, good_job = (store.get(i) for i in ids)
    assert corrupt_job.error_type == "InputImageError" and "corrupt.png" in (corrupt_job.error_message or "")
    assert missing_job.error_type == "InputImageError" and "missing.png" in (missing_job.error_message or "")
    assert (good_job.width, good_job.height) == (80, 48)


def test_local_inputs_are_refused_when_not_allowed(
    store: JobStore, runner: JobRunner, tmp_path: Path
) -> None:
    runner.settings = replace(runner.settings, allow_local_inputs=False)
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32)).save(image)
    job_id = store.submit([{"kind": "edit", "instruction": "x", "images": [str(image)]}])[0].job.id
    assert runner.run(job_id, "w1") is RunOutcome.FAILED
    assert store.get(job_id).error_type == "InputImageError"


def test_resident_engine_loads_once() -> None:
    built: list[FakeEngine] = []
    provider = ResidentEngine(lambda: built.append(FakeEngine()) or built[-1])
    assert provider() is provider() and provider.load_count == 1 and len(built) == 1


def _stored(runner: JobRunner, job_id: str, attempt: int, count: int) -> list[bool]:
    store = runner.artifact_store
    return [
        store.exists(store.uri_for(artifact_key(job_id, index, attempt=attempt))) for index in range(count)
    ]


def test_n_images_become_n_artifacts_in_one_completion(
    store: JobStore, runner: JobRunner, engine: FakeEngine
) -> None:
    job_id = store.submit([T2I_3])[0].job.id
    assert runner.run(job_id, "w1") is RunOutcome.SUCCEEDED
    assert [call.num_images_per_prompt for call in engine.calls] == [3]
    job = store.get(job_id)
    assert job.status == JobStatus.SUCCEEDED and (job.width, job.height, job.seed) == (64, 96, 7)
    assert [artifact.index for artifact in job.artifacts] == [0, 1, 2]
    digests = set()
    for index, artifact in enumerate(job.artifacts):
        assert artifact.uri == runner.artifact_store.uri_for(artifact_key(job_id, index, attempt=1))
        data = runner.artifact_store.get_bytes(artifact.uri)
        assert (artifact.width, artifact.height, artifact.bytes) == (64, 96, len(data))
        digests.add(artifact.sha256)
        record = read_generation_metadata(data)
        assert (record["seed"], record["image_index"], record["job_id"]) == (7, index, job_id)
        assert record["parameters"]["num_images_per_prompt"] == 3
        a1111 = read_png_metadata(data)["parameters"]
        assert a1111.endswith(f"Model: deepgen, Batch size: 3, Batch pos: {index}")
    assert len(digests) == 3  # three different images, not one stored three times


def test_one_image_job_keeps_its_single_artifact_and_no_batch_fields(
    store: JobStore, runner: JobRunner
) -> None:
    job_id = store.submit([T2I])[0].job.id
    assert runner.run(job_id, "w1") is RunOutcome.SUCCEEDED
    [artifact] = store.get(job_id).artifacts
    data = runner.artifact_store.get_bytes(artifact.uri)
    assert read_generation_metadata(data)["image_index"] == 0
    assert "Batch" not in read_png_metadata(data)["parameters"]


def test_a_retried_attempt_removes_every_image_of_the_earlier_attempt(
    store: JobStore, runner: JobRunner, db_engine: Any
) -> None:
    import sqlalchemy as sa

    from schemas.tables import Job, utcnow

    job_id = store.submit([T2I_3])[0].job.id
    # Attempt 1: a worker claims the job, stores all three images and dies before completing.
    dead = store.claim_or_refusal(job_id, "w-dead", 30)
    assert isinstance(dead, ClaimedJob) and dead.attempts == 1
    for index in range(3):
        runner.artifact_store.put_bytes(artifact_key(job_id, index, attempt=1), b"left over", "image/png")
    assert _stored(runner, job_id, 1, 3) == [True] * 3
    with db_engine.begin() as conn:  # its lease runs out
        conn.execute(sa.update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow()))
    assert runner.run(job_id, "w2") is RunOutcome.SUCCEEDED
    job = store.get(job_id)
    assert job.attempts == 2
    assert [artifact.uri for artifact in job.artifacts] == [
        runner.artifact_store.uri_for(artifact_key(job_id, index, attempt=2)) for index in range(3)
    ]
    assert _stored(runner, job_id, 1, 3) == [False] * 3
    assert _stored(runner, job_id, 2, 3) == [True] * 3


@pytest.mark.parametrize(
    ("steal_after", "puts_made"), [(1, 1), (3, 3)], ids=["between-uploads", "at-completion"]
)
def test_a_job_taken_over_during_the_uploads_leaves_none_of_its_images(
    store: JobStore, runner: JobRunner, db_engine: Any, steal_after: int, puts_made: int
) -> None:
    """Taken over once `steal_after` images are stored: seen by the lease check between two uploads
    (the heartbeat had time to notice) or only by the fenced completion, every object of this run is
    removed and the job row names none."""
    import sqlalchemy as sa

    from schemas.tables import Job

    job_id = store.submit([T2I_3])[0].job.id
    inner = runner.artifact_store
    puts: list[str] = []

    class StealingStore:
        def put_bytes(self, key: str, data: bytes, content_type: str = "image/png") -> str:
            uri = inner.put_bytes(key, data, content_type)
            if not key.endswith(".png"):  # [issue 12] a thumbnail: stored after its PNG, not counted
                return uri
            puts.append(key)
            if len(puts) == steal_after:
                with db_engine.begin() as conn:
                    conn.execute(sa.update(Job).where(Job.id == job_id).values(worker_id="w-other"))
                if steal_after < 3:
                    time.sleep(4 * runner.settings.heartbeat_seconds)  # the heartbeat sees it
            return uri

        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

    runner.artifact_store = StealingStore()
    assert runner.run(job_id, "w1") is RunOutcome.LOST
    assert store.get(job_id).artifacts == []
    assert len(puts) == puts_made
    assert _stored(runner, job_id, 1, 3) == [False] * 3
    assert not list(Path(inner.root).rglob("*.thumb.*"))  # [issue 12] their thumbnails went too


def test_a_failed_upload_removes_the_images_already_stored(store: JobStore, runner: JobRunner) -> None:
    job_id = store.submit([T2I_3])[0].job.id
    inner = runner.artifact_store

    class FailingStore:
        def put_bytes(self, key: str, data: bytes, content_type: str = "image/png") -> str:
            if key.endswith("/2.png"):
                raise PermissionError("access denied to the bucket")
            return inner.put_bytes(key, data, content_type)

        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

    runner.artifact_store = FailingStore()
    assert runner.run(job_id, "w1") is RunOutcome.FAILED
    job = store.get(job_id)
    assert job.status == JobStatus.FAILED and job.artifacts == []
    assert _stored(runner, job_id, 1, 3) == [False] * 3


def test_an_engine_that_returns_too_few_images_fails_the_job(
    store: JobStore, runner: JobRunner, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = engine.generate

    def one_short(request: Any, step_callback: Any = None) -> Any:
        result = original(request, step_callback)
        return replace(result, images=result.images[:-1])

    monkeypatch.setattr(engine, "generate", one_short)
    job_id = store.submit([T2I_3])[0].job.id
    assert runner.run(job_id, "w1") is RunOutcome.FAILED
    job = store.get(job_id)
    assert "returned 2 image(s) for num_images_per_prompt=3" in (job.error_message or "")
    assert job.artifacts == []


def test_a_job_deleted_during_its_uploads_leaves_none_of_its_images(
    store: JobStore, runner: JobRunner, db_engine: Any
) -> None:
    """A prune (or an operator) deletes the row while the worker uploads: nothing can record this
    run's objects any more, so the worker removes them instead of leaving orphans."""
    import sqlalchemy as sa

    from schemas.tables import Job

    job_id = store.submit([T2I])[0].job.id
    inner = runner.artifact_store

    class DeletingStore:
        def put_bytes(self, key: str, data: bytes, content_type: str = "image/png") -> str:
            uri = inner.put_bytes(key, data, content_type)
            if key.endswith(".png"):
                with db_engine.begin() as conn:
                    conn.execute(sa.delete(Job).where(Job.id == job_id))
            return uri

        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

    runner.artifact_store = DeletingStore()
    assert runner.run(job_id, "w1") is RunOutcome.LOST
    assert not [path for path in Path(inner.root).rglob("*") if path.is_file()]
