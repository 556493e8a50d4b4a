"""JobRunner with an injected engine: outcomes, cancel, failures, duplicates, lost leases."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from schemas.enums import JobStatus
from tests.support import T2I, FakeEngine
from worker.jobstore import JobStore
from worker.png import read_png_metadata
from worker.runner import JobRunner, ResidentEngine, RunOutcome
from worker.settings import load_settings
from worker.storage import open_store


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
