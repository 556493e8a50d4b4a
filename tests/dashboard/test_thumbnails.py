"""Thumbnails (worker/thumbnails.py): size and byte limits, and the worker storing one beside each PNG,
recorded with the artifact, cleaned up with the PNGs of lost or earlier attempts, never failing a job."""

from __future__ import annotations

import io
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from PIL import Image

from schemas.enums import JobStatus
from tests.support import T2I, FakeEngine, png_bytes
from worker.claims import ClaimedJob
from worker.jobstore import JobStore, open_job_store
from worker.runner import JobRunner, RunOutcome
from worker.settings import load_settings
from worker.storage import artifact_key, open_store
from worker.thumbnails import (
    THUMBNAIL_CONTENT_TYPE,
    THUMBNAIL_MAX_BYTES,
    ThumbnailError,
    make_thumbnail,
    thumbnail_key,
)

T2I_2 = {**T2I, "params": {**T2I["params"], "num_images_per_prompt": 2}}


def noise(width: int, height: int, mode: str = "RGB") -> Image.Image:
    return Image.frombytes(mode, (width, height), os.urandom(width * height * len(mode)))


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(
    ("size", "expected"),
    [((1024, 1024), (256, 256)), ((1024, 512), (256, 128)), ((300, 900), (85, 256)), ((64, 96), (64, 96))],
)
def test_thumbnail_fits_256_pixels_and_30_kb(size: tuple[int, int], expected: tuple[int, int]) -> None:
    thumbnail = make_thumbnail(png_bytes(noise(*size)))  # noise: the hardest case for the byte limit
    image = decoded(thumbnail.data)
    assert image.size == expected == (thumbnail.width, thumbnail.height)  # never enlarged
    assert len(thumbnail.data) <= THUMBNAIL_MAX_BYTES
    assert image.format == "WEBP" and thumbnail.content_type == THUMBNAIL_CONTENT_TYPE == "image/webp"


def test_tight_byte_limit_shrinks_quality_then_size() -> None:
    thumbnail = make_thumbnail(png_bytes(noise(512, 512)), max_bytes=4_000)
    assert len(thumbnail.data) <= 4_000 and thumbnail.width < 256


def test_transparency_is_kept() -> None:
    image = noise(40, 40, "RGBA")
    assert decoded(make_thumbnail(png_bytes(image)).data).mode == "RGBA"


def test_bytes_that_are_no_image_raise_thumbnail_error() -> None:
    with pytest.raises(ThumbnailError, match="not a readable image"):
        make_thumbnail(b"not a png at all")


def test_thumbnail_key_sits_beside_the_png() -> None:
    assert thumbnail_key("jobs/abc/2/0.png") == "jobs/abc/2/0.thumb.webp"
    assert thumbnail_key("s3://b/p/jobs/abc/1/3.png") == "s3://b/p/jobs/abc/1/3.thumb.webp"
    with pytest.raises(ValueError):
        thumbnail_key("jobs/abc/1/0.webp")


# ------------------------------------------------------------------------------- the worker side


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return open_job_store(load_settings({"DG_HOME": str(tmp_path)}))


@pytest.fixture
def runner(store: JobStore, tmp_path: Path) -> JobRunner:
    settings = replace(
        load_settings({"DG_HOME": str(tmp_path)}), progress_interval_seconds=0.0, heartbeat_seconds=0.2
    )
    return JobRunner(settings, FakeEngine, store=store, artifact_store=open_store(settings.storage_url))


def test_the_worker_stores_a_thumbnail_beside_each_png(store: JobStore, runner: JobRunner) -> None:
    job_id = store.submit([T2I_2])[0].job.id
    assert runner.run(job_id, "w1") is RunOutcome.SUCCEEDED
    artifacts = store.get(job_id).artifacts
    assert len(artifacts) == 2
    for index, artifact in enumerate(artifacts):
        key = artifact_key(job_id, index, attempt=1)
        assert artifact.thumbnail_uri == runner.artifact_store.uri_for(thumbnail_key(key))
        image = decoded(runner.artifact_store.get_bytes(artifact.thumbnail_uri))
        assert image.format == "WEBP" and image.size == (64, 96)


def test_a_thumbnail_that_cannot_be_made_never_fails_the_job(
    store: JobStore, runner: JobRunner, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import worker.thumbnails

    def broken(image: Any, **_: Any) -> Any:
        raise ThumbnailError("no codec")

    monkeypatch.setattr(worker.thumbnails, "shrink_image", broken)  # the worker shrinks its own image
    job_id = store.submit([T2I])[0].job.id
    with caplog.at_level(logging.WARNING, logger="worker.runner"):
        assert runner.run(job_id, "w1") is RunOutcome.SUCCEEDED
    [artifact] = store.get(job_id).artifacts
    assert artifact.thumbnail_uri is None and runner.artifact_store.exists(artifact.uri)
    assert "no thumbnail for image 0 (ThumbnailError: no codec)" in caplog.text


def test_a_lost_completion_removes_the_runs_thumbnails_too(
    store: JobStore, runner: JobRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = store.submit([T2I_2])[0].job.id
    monkeypatch.setattr(store, "finish_succeeded", lambda *args, **kwargs: False)  # taken over meanwhile
    assert runner.run(job_id, "w1") is RunOutcome.LOST
    root = Path(runner.artifact_store.root)  # type: ignore[attr-defined]
    assert [path for path in root.rglob("*") if path.is_file()] == []


def test_a_retried_attempt_removes_the_earlier_attempts_thumbnails(
    store: JobStore, runner: JobRunner
) -> None:
    from schemas.tables import Job, utcnow

    job_id = store.submit([T2I_2])[0].job.id
    dead = store.claim_or_refusal(job_id, "w-dead", 30)  # attempt 1 stores its objects, then dies
    assert isinstance(dead, ClaimedJob)
    old = runner.artifact_store
    left = []
    for index in range(2):
        key = artifact_key(job_id, index, attempt=1)
        left += [old.put_bytes(key, b"png"), old.put_bytes(thumbnail_key(key), b"webp", "image/webp")]
    with store.sessions() as session, session.begin():
        session.execute(sa.update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow()))
    assert runner.run(job_id, "w2") is RunOutcome.SUCCEEDED
    job = store.get(job_id)
    assert job.status == JobStatus.SUCCEEDED and job.attempts == 2
    assert not any(old.exists(uri) for uri in left)
    assert all(old.exists(a.thumbnail_uri) for a in job.artifacts if a.thumbnail_uri)
    assert all("/2/" in (a.thumbnail_uri or "") for a in job.artifacts)
