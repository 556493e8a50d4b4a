"""Client-side fixes: naive datetimes in list(), per-job embedded errors, rerun after an interrupted retry."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from api_client.client import DiffgentorClient
from api_client.embedded import EmbeddedRunner
from api_client.generation import GenerationOptions, run_t2i
from api_client.inputs import PromptRow
from worker.db import upgrade
from worker.jobstore import JobStore, PublishTarget


@pytest.fixture
def queue_client(tmp_path: Path) -> Iterator[DiffgentorClient]:
    """A queue-mode client on SQLite with kombu's in-memory broker: nothing runs the jobs."""
    db = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    upgrade(db)
    with DiffgentorClient(
        database_url=db, broker_url="memory://", storage_url=(tmp_path / "art").as_uri(), home=tmp_path
    ) as client:
        yield client


def test_list_takes_naive_datetimes_as_utc(queue_client: DiffgentorClient) -> None:
    job = queue_client.submit_t2i("x", num_inference_steps=2, height=64, width=64)
    naive_now = datetime.now(timezone.utc).replace(tzinfo=None)
    assert [j.id for j in queue_client.list(created_after=naive_now - timedelta(minutes=1))] == [job.id]
    assert queue_client.list(created_after=naive_now + timedelta(minutes=1)) == []
    assert [j.id for j in queue_client.list(created_before=naive_now + timedelta(minutes=1))] == [job.id]


def test_rerun_reattaches_to_the_retry_instead_of_retrying_again(
    queue_client: DiffgentorClient, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    client = queue_client
    opts = GenerationOptions(
        model_name="deepgen",
        output_dir=tmp_path / "out",
        guidance_scale=4.0,
        num_inference_steps=2,
        height=64,
        width=64,
        negative_prompt="",
        seed=1,
        priority=0,
        wait=False,
    )
    rows = [PromptRow(0, "a fox")]
    run_t2i(client, rows, opts)  # run 1: job A
    (a,) = client.list()
    client.store.claim(a.id, "w", 60)
    client.store.finish_failed(a.id, "w", error_type="X", error_message="boom")  # A fails on a worker
    run_t2i(client, rows, opts)  # run 2: A retried as B (queued), then interrupted
    run_t2i(client, rows, opts)  # run 3: the same command again reattaches to B
    retries = [j for j in client.list(limit=50) if j.retry_of == a.id]
    assert len(retries) == 1, [j.status.value for j in retries]
    (b,) = retries
    # B fails too: the next rerun retries once more, and the rerun after that reattaches to it.
    client.store.claim(b.id, "w", 60)
    client.store.finish_failed(b.id, "w", error_type="X", error_message="boom")
    run_t2i(client, rows, opts)
    run_t2i(client, rows, opts)
    family = [j for j in client.list(limit=50) if j.retry_of is not None]
    live = [j for j in family if j.status.value == "queued"]
    assert len(family) == 2 and len(live) == 1


class _FailingFor:
    """Publisher whose run of one job raises (as the in-process runner would on a database error)."""

    def __init__(self, store: JobStore, bad: str) -> None:
        self.store, self.bad, self.ran = store, bad, []

    def publish(self, targets: Sequence[PublishTarget]) -> None:
        for target in targets:
            if target.job_id == self.bad:
                raise RuntimeError("database is locked")
            self.ran.append(target.job_id)
            self.store.claim(target.job_id, "embedded", 60)
            self.store.finish_cancelled(target.job_id, "embedded")


def test_embedded_runner_error_is_scoped_to_its_job(tmp_path: Path) -> None:
    from worker.db import make_engine, session_factory

    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    upgrade(url)
    store = JobStore(session_factory(make_engine(url)))
    spec: dict[str, Any] = {"kind": "t2i", "prompt": "p", "params": {"num_inference_steps": 2}}
    bad, good = (item.job for item in store.submit([spec, spec]))
    publisher = _FailingFor(store, bad.id)
    runner = EmbeddedRunner(store, publisher, lease_seconds=1)
    runner.enqueue([bad])
    runner.join()
    assert isinstance(runner.error_for([bad.id]), RuntimeError)
    runner.enqueue([good])
    runner.join()
    assert runner.error_for([good.id]) is None and publisher.ran == [good.id]  # not aborted by bad's error
    publisher.bad = ""
    runner.enqueue([bad])  # a later wait enqueues the job again: it runs, its old error is gone
    runner.join()
    assert runner.error_for([bad.id]) is None and publisher.ran == [good.id, bad.id]
