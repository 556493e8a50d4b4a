"""`DiffgentorClient` on the embedded default, in this process: submit, idempotency, wait, results,
list filters, cancel and retry, timeouts and parameter errors."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image

from api_client import DiffgentorClient
from api_client.errors import ConfigurationError, WaitTimeout
from schemas.views import JobView
from tests.support import embedded_client

FAST = {"num_inference_steps": 2, "height": 64, "width": 64}
SLOW = {"num_inference_steps": 200, "height": 256, "width": 256}


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory, tiny_environ: dict[str, str]
) -> Iterator[DiffgentorClient]:
    with embedded_client(tmp_path_factory.mktemp("client_home"), tiny_environ) as embedded:
        yield embedded


def wait_until_running(client: DiffgentorClient, job: JobView, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.get(job).status.value != "running":
        assert time.monotonic() < deadline, client.get(job)
        time.sleep(0.05)


def test_submit_many_keeps_order_and_idempotency(client: DiffgentorClient, tmp_path: Path) -> None:
    specs = [
        client.t2i_spec("a cat", **FAST),
        client.t2i_spec("a dog", idempotency_key="dog-1", **FAST),
        client.t2i_spec("a dog", idempotency_key="dog-1", **FAST),
    ]
    submitted = client.submit_many(specs)
    assert [item.created for item in submitted] == [True, True, False]
    assert submitted[1].job.id == submitted[2].job.id
    assert submitted[0].job.spec["prompt"] == "a cat"
    later = client.submit_t2i("a dog", idempotency_key="dog-1", **FAST)
    assert later.id == submitted[1].job.id

    done = client.wait([item.job for item in submitted[:2]], timeout=60, progress=True)
    assert [job.status.value for job in done] == ["succeeded", "succeeded"]
    uris = client.artifact_uris(done[0])
    assert (
        len(uris) == 1 and uris[0].startswith("file://") and uris[0].endswith(f"/jobs/{done[0].id}/1/0.png")
    )
    assert client.presigned_urls(done[0]) == uris
    assert [image.size for image in client.open_images(done[0])] == [(64, 64)]
    paths = client.download(done[0], tmp_path / "dl")
    assert paths == [tmp_path / "dl" / f"{done[0].id}-0.png"] and paths[0].stat().st_size > 0


def test_edit_accepts_paths_pil_images_and_bytes(client: DiffgentorClient, tmp_path: Path) -> None:
    local = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 0, 0)).save(local)
    pil = Image.new("RGB", (64, 64), (0, 0, 200))
    job = client.submit_edit("make it green", [local, pil, local.read_bytes()], **FAST)
    refs = job.spec["images"]
    assert refs[0] == str(local.resolve())  # embedded: the in-process worker reads our file
    inputs = client.settings.home / "artifacts" / "inputs"
    assert Path(refs[1]).parent == inputs and Path(refs[2]).parent == inputs
    assert Path(refs[2]).read_bytes() == local.read_bytes()  # content-addressed copy
    assert client.wait(job, timeout=60).status.value == "succeeded"


def test_cancel_a_running_job_then_retry_it(client: DiffgentorClient) -> None:
    job = client.submit_t2i("a long one", **SLOW)
    wait_until_running(client, job)
    client.cancel(job)
    cancelled = client.wait(job, timeout=60)
    assert cancelled.status.value == "cancelled" and cancelled.artifacts == []
    retried = client.retry(cancelled)
    assert retried.retry_of == job.id and retried.seed == job.seed
    assert client.wait(retried, timeout=120).status.value == "succeeded"


def test_wait_timeout_names_the_unfinished_jobs(client: DiffgentorClient) -> None:
    job = client.submit_t2i("another long one", **SLOW)
    with pytest.raises(WaitTimeout) as info:
        client.wait([job], timeout=0.3)
    assert info.value.pending_ids == [job.id]
    assert f"diffgentor wait {job.id}" in str(info.value)
    client.cancel(job)
    assert client.wait(job, timeout=60).status.value == "cancelled"


def test_list_filters_and_pages(client: DiffgentorClient) -> None:
    # Two jobs of its own: the module's client may hold no other (xdist worksteal runs the module's
    # tests in any order and on several workers), and the page at offset 1 needs one.
    older = client.submit_t2i("listed before", model_name="deepgen", **FAST)
    job = client.submit_t2i("listed", model_name="deepgen", **FAST)
    client.wait([older, job], timeout=60)
    succeeded = client.list(status="succeeded", limit=1000)
    assert job.id in {j.id for j in succeeded} and all(j.status.value == "succeeded" for j in succeeded)
    assert client.list(model_name="some-other-model") == []
    assert client.list(created_after=datetime.now(timezone.utc) + timedelta(minutes=1)) == []
    assert client.list(created_before=job.created_at) == client.list(
        created_before=job.created_at, limit=1000
    )
    first, second = client.list(limit=1), client.list(limit=1, offset=1)
    assert first[0].id == job.id and second[0].id != job.id
    with pytest.raises(ConfigurationError, match="unknown job status"):
        client.list(status="done")


def test_bad_parameters_name_the_field(client: DiffgentorClient) -> None:
    with pytest.raises(
        ConfigurationError, match="num_inference_steps: Input should be greater than or equal to 1"
    ):
        client.submit_t2i("x", num_inference_steps=0)
    with pytest.raises(ConfigurationError, match="prompt"):
        client.submit_t2i("   ")
