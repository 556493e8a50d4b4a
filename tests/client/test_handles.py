"""Job handles on the embedded default: `result`, `done`, `status`, `cancel`, `as_completed` and
`wait(return_when=...)`, shaped like `concurrent.futures`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from api_client import (
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    DiffgentorClient,
    JobCancelled,
    JobFailed,
    JobHandle,
    WaitTimeout,
    as_completed,
    wait,
)
from api_client.errors import JobStateError
from schemas.enums import JobStatus
from schemas.specs import EditParams, EditSpec
from tests.support import embedded_client

FAST = {"num_inference_steps": 2, "height": 64, "width": 64}
SLOW = {"num_inference_steps": 200, "height": 256, "width": 256}


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory, tiny_environ: dict[str, str]
) -> Iterator[DiffgentorClient]:
    with embedded_client(
        tmp_path_factory.mktemp("handles_home"), tiny_environ, poll_seconds=0.05
    ) as embedded:
        yield embedded


def broken_edit(client: DiffgentorClient) -> JobHandle:
    """A job that fails on the worker: its local input image does not exist there."""
    spec = EditSpec(
        instruction="x", images=["/nonexistent/input.png"], params=EditParams(num_inference_steps=2)
    )
    return client.submit_many([spec])[0]


def test_result_returns_the_images_metadata(client: DiffgentorClient) -> None:
    handle = client.submit_t2i("a fox", seed=3, num_images_per_prompt=2, **FAST)
    assert isinstance(handle, JobHandle) and handle.created
    artifacts = handle.result(timeout=120)
    assert [artifact.index for artifact in artifacts] == [0, 1]
    assert all(artifact.width == 64 and len(artifact.sha256) == 64 for artifact in artifacts)
    assert handle.done() and handle.status == JobStatus.SUCCEEDED and handle.exception() is None
    assert [image.size for image in handle.open_images()] == [(64, 64), (64, 64)]
    assert client.get(handle).id == handle.id  # a handle is a job reference everywhere
    assert handle.seed == 3 and handle.spec["prompt"] == "a fox"  # the row's fields read through
    with pytest.raises(AttributeError, match="sede"):
        handle.sede  # noqa: B018  # a typo is an error, not None


def test_result_raises_on_failure_and_cancel_and_open_images_refuses(client: DiffgentorClient) -> None:
    failed = broken_edit(client)
    with pytest.raises(JobFailed, match=failed.id) as raised:
        failed.result(timeout=120)
    assert raised.value.job.status == JobStatus.FAILED and "input.png" in str(raised.value)
    assert isinstance(failed.exception(), JobFailed)
    with pytest.raises(JobStateError, match="failed, not succeeded"):
        client.open_images(failed)
    with pytest.raises(JobStateError):
        failed.open_images()

    slow = client.submit_t2i("slow", **SLOW)
    queued = client.submit_t2i("never runs", **FAST)
    assert queued.cancel() and queued.cancelled()
    with pytest.raises(JobCancelled):
        queued.result(timeout=5)
    assert slow.cancel()
    with pytest.raises(JobCancelled):
        slow.result(timeout=120)
    assert not failed.cancel()  # finished: False, as Future.cancel


def test_as_completed_yields_in_finishing_order_and_times_out(client: DiffgentorClient) -> None:
    # The embedded runner takes jobs in submission order, one at a time.
    handles = [client.submit_t2i(f"p{i}", **FAST) for i in range(3)]
    order = [handle.id for handle in as_completed(reversed(handles), timeout=120)]
    assert order == [handle.id for handle in handles]

    slow = client.submit_t2i("slow", **SLOW)
    with pytest.raises(WaitTimeout, match=slow.id):
        list(as_completed([slow], timeout=0.2))
    slow.cancel()
    slow.exception(timeout=120)


def test_wait_return_when(client: DiffgentorClient) -> None:
    fast = client.submit_t2i("fast", **FAST)
    slow = client.submit_t2i("slow", **SLOW)
    done, not_done = wait([fast, slow], timeout=120, return_when=FIRST_COMPLETED)
    assert done == {fast} and not_done == {slow}
    done, not_done = wait([slow], timeout=0.2)  # a timeout returns what is done: it does not raise
    assert done == set() and not_done == {slow}
    slow.cancel()

    failing = broken_edit(client)
    later = client.submit_t2i("after the failure", **SLOW)
    done, not_done = wait([failing, later], timeout=120, return_when=FIRST_EXCEPTION)
    assert failing in done and isinstance(failing.exception(), JobFailed)
    later.cancel()
    done, not_done = wait([failing, later], timeout=120)  # ALL_COMPLETED
    assert done == {failing, later} and not not_done
    with pytest.raises(ValueError, match="return_when"):
        wait([later], return_when="SOMETIMES")


def test_submit_many_makes_a_batch_and_a_reused_key_with_another_spec_is_refused(
    client: DiffgentorClient,
) -> None:
    from api_client import IdempotencyConflict

    handles = client.submit_many([client.t2i_spec(p, idempotency_key=f"k-{p}", **FAST) for p in ("a", "b")])
    batch_ids = {handle.job.batch_id for handle in handles}
    assert len(batch_ids) == 1 and None not in batch_ids
    assert [handle.job.batch_index for handle in handles] == [0, 1]
    with pytest.raises(IdempotencyConflict, match="'k-a'") as raised:
        client.submit_t2i("not a", idempotency_key="k-a", **FAST)
    assert raised.value.exit_code == 8
    assert client.submit_t2i("a", idempotency_key="k-a", **FAST).id == handles[0].id
    wait(handles, timeout=120)
