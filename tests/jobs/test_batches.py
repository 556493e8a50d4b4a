"""Batches on SQLite and PostgreSQL: created with their jobs in one transaction, the latest job of
each row after retries, counts, throughput, cancel, paging, prefixes, export and fetch."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from api_client.batches import Batch
from api_client.client import DiffgentorClient
from api_client.errors import BatchNotFound, UsageError
from schemas.enums import JobStatus
from schemas.tables import Batch as BatchRow
from schemas.tables import Job, utcnow
from tests.support import complete_job, fail_job
from worker.batches import BatchStore, NewBatch, default_owner
from worker.jobstore import JobStore, PublishTarget
from worker.storage import FileArtifactStore
from worker.submission import retry_failed_batch, submit_jobs

T2I = {"kind": "t2i", "prompt": "a red fox", "params": {"num_inference_steps": 2, "height": 32, "width": 32}}


class RecordingPublisher:
    def __init__(self) -> None:
        self.sent: list[PublishTarget] = []

    def publish(self, targets: Sequence[PublishTarget]) -> None:
        self.sent.extend(targets)


def _specs(count: int, **extra: Any) -> list[dict[str, Any]]:
    return [{**T2I, "prompt": f"prompt {i}", **extra} for i in range(count)]


@pytest.fixture(autouse=True)
def no_batches_left(db_engine: sa.Engine) -> None:
    """The session's PostgreSQL database is emptied per test by TRUNCATE of the job tables
    (tests/conftest.py `db_url`), which leaves `batches`: empty it too."""
    with db_engine.begin() as conn:
        conn.execute(sa.delete(BatchRow))


@pytest.fixture
def artifacts(tmp_path: Path) -> FileArtifactStore:
    return FileArtifactStore((tmp_path / "artifacts").as_uri())


@pytest.fixture
def batches(store: JobStore) -> BatchStore:
    return BatchStore(store)


@pytest.fixture
def client(
    db_url: str, tmp_path: Path, artifacts: FileArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    for name in ("DG_BROKER_URL", "DG_DATABASE_URL", "DG_STORAGE_URL"):
        monkeypatch.delenv(name, raising=False)
    with DiffgentorClient(database_url=db_url, storage_url=artifacts.url, home=tmp_path / "home") as made:
        yield made


def test_a_batch_and_its_jobs_commit_together(
    store: JobStore, batches: BatchStore, db_engine: sa.Engine
) -> None:
    publisher = RecordingPublisher()
    batch = NewBatch("run-1", owner="alice")
    submitted = submit_jobs(store, publisher, _specs(3), batch=batch, batch_indexes=[7, 2, 40])
    batch_id = submitted[0].job.batch_id
    assert batch_id is not None and all(item.created and item.job.batch_id == batch_id for item in submitted)
    assert [item.job.batch_index for item in submitted] == [7, 2, 40]
    assert len(publisher.sent) == 3
    view = batches.get(batch_id)
    assert (view.name, view.owner, view.model_name, view.job_count) == ("run-1", "alice", "deepgen", 3)
    assert batches.counts(batch_id).as_dict() == {
        "queued": 3,
        "running": 0,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert [job.batch_index for job in batches.jobs(batch_id)] == [2, 7, 40]

    # The jobs INSERT fails after the batch INSERT: neither is left behind.
    def refuse_jobs(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO JOBS"):
            raise RuntimeError("the jobs insert failed")

    engine = store.sessions.kw["bind"]
    sa.event.listen(engine, "before_cursor_execute", refuse_jobs)
    try:
        with pytest.raises(RuntimeError, match="jobs insert failed"):
            store.submit(_specs(2), batch=NewBatch("run-2", owner="alice"))
    finally:
        sa.event.remove(engine, "before_cursor_execute", refuse_jobs)
    assert [b.name for b in batches.list()] == ["run-1"]
    with db_engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(Job)) == 3

    # Bad indexes are refused before anything is written.
    with pytest.raises(ValueError, match="given twice"):
        store.submit(_specs(2), batch=NewBatch("run-3"), batch_indexes=[1, 1])
    with pytest.raises(ValueError, match="2 batch indexes given for 3"):
        store.submit(_specs(3), batch=NewBatch("run-3"), batch_indexes=[1, 2])
    assert [b.name for b in batches.list()] == ["run-1"]


def test_jobs_found_by_idempotency_key_keep_their_batch(store: JobStore, batches: BatchStore) -> None:
    keyed = [{**spec, "idempotency_key": f"k{i}"} for i, spec in enumerate(_specs(2))]
    first = store.submit(keyed, batch=NewBatch("first"))
    again = store.submit([*keyed, {**T2I, "idempotency_key": "k2"}], batch=NewBatch("second"))
    assert [item.created for item in again] == [False, False, True]
    assert again[0].job.batch_id == again[1].job.batch_id == first[0].job.batch_id
    second_id = again[2].job.batch_id
    assert second_id not in (None, first[0].job.batch_id) and again[2].job.batch_index == 2
    assert batches.get(second_id).job_count == 1  # only the job created with it
    all_found = store.submit(keyed, batch=NewBatch("third"))  # nothing created: no batch record
    assert not any(item.created for item in all_found)
    assert [b.name for b in batches.list()] == ["second", "first"]
    plain = store.submit(_specs(2))  # no batch asked: none made
    assert all(item.job.batch_id is None and item.job.batch_index is None for item in plain)


def test_retries_take_their_rows_place_and_counts_follow_the_latest_job(
    store: JobStore, batches: BatchStore, artifacts: FileArtifactStore
) -> None:
    jobs = [item.job for item in store.submit(_specs(5), batch=NewBatch("retry"))]
    batch_id = jobs[0].batch_id
    assert batch_id is not None
    complete_job(store, artifacts, jobs[0].id)
    complete_job(store, artifacts, jobs[1].id)
    fail_job(store, jobs[2].id)
    store.cancel(jobs[3].id)
    counts = batches.counts(batch_id)
    assert counts.as_dict() == {"queued": 1, "running": 0, "succeeded": 2, "failed": 1, "cancelled": 1}
    assert (counts.finished, counts.unfinished, counts.unsuccessful) == (4, 1, 2)

    # One job retried by hand: the new job takes row 2, the old one is superseded.
    retried = store.retry(jobs[2].id)
    assert (retried.batch_id, retried.batch_index, retried.retry_of) == (batch_id, 2, jobs[2].id)
    assert store.get(jobs[2].id).superseded and not retried.superseded
    assert batches.counts(batch_id).as_dict() == {
        "queued": 2,
        "running": 0,
        "succeeded": 2,
        "failed": 0,
        "cancelled": 1,
    }
    # It fails again; retrying the ORIGINAL job retries the row once more (its latest job is the
    # second failure), and retrying it again returns that live retry instead of a third job.
    fail_job(store, retried.id)
    again = store.retry(jobs[2].id)
    assert again.batch_index == 2 and store.get(retried.id).superseded
    assert store.retry_or_existing(jobs[2].id).job.id == again.id

    # The whole batch: every failed/cancelled latest row (here row 3) gets a new job, published.
    publisher = RecordingPublisher()
    made = retry_failed_batch(store, publisher, batch_id)
    assert [(job.batch_index, job.retry_of) for job in made] == [(3, jobs[3].id)]
    assert [target.job_id for target in publisher.sent] == [made[0].id] and made[0].published_at is not None
    assert retry_failed_batch(store, publisher, batch_id) == []  # nothing failed any more
    assert batches.counts(batch_id).as_dict() == {
        "queued": 3,
        "running": 0,
        "succeeded": 2,
        "failed": 0,
        "cancelled": 0,
    }
    latest = list(batches.jobs(batch_id))
    assert [job.batch_index for job in latest] == [0, 1, 2, 3, 4]
    assert [job.id for job in latest] == [jobs[0].id, jobs[1].id, again.id, made[0].id, jobs[4].id]
    assert latest[0].artifacts and not latest[2].superseded
    assert [job.id for job in batches.jobs(batch_id, statuses=["succeeded"])] == [jobs[0].id, jobs[1].id]

    # Throughput: the batch's jobs that succeeded or failed in the window (superseded ones too: work done).
    progress = batches.progress(batch_id, window_seconds=600)
    assert progress.finished_in_window == 4  # 2 succeeded + 2 failures of row 2; the cancel is not work
    # The batch is seconds old: the rate is over its age, not over the whole window.
    assert 1.0 <= progress.window_seconds < 600
    assert progress.per_minute == pytest.approx(4 * 60 / progress.window_seconds)
    assert progress.eta_seconds == pytest.approx(3 * progress.window_seconds / 4)
    with store.database.transaction() as session:  # an older batch: the whole window
        session.execute(
            sa.update(BatchRow)
            .where(BatchRow.id == batch_id)
            .values(created_at=utcnow() - timedelta(hours=1))
        )
    progress = batches.progress(batch_id, window_seconds=600)
    assert progress.per_minute == pytest.approx(0.4)
    assert progress.eta_seconds == pytest.approx(3 * 600 / 4)
    assert batches.finished_since([batch_id], utcnow()) == {batch_id: 0}


def test_cancel_stops_every_unfinished_row_and_nothing_else(
    store: JobStore, batches: BatchStore, artifacts: FileArtifactStore
) -> None:
    jobs = [item.job for item in store.submit(_specs(4), batch=NewBatch("cancel"))]
    other = store.submit(_specs(1))[0].job  # not in the batch
    batch_id = jobs[0].batch_id
    assert batch_id is not None
    complete_job(store, artifacts, jobs[0].id)
    assert store.claim(jobs[1].id, "worker-a", 60) is not None  # running, live lease
    result = batches.cancel(batch_id)
    assert (result.cancelled, result.stopping) == (2, 1)
    assert [store.get(job.id).status for job in jobs] == [
        JobStatus.SUCCEEDED,
        JobStatus.RUNNING,
        JobStatus.CANCELLED,
        JobStatus.CANCELLED,
    ]
    assert (
        store.get(jobs[1].id).cancel_requested
        and store.heartbeat(jobs[1].id, "worker-a", 60).cancel_requested
    )
    assert store.finish_cancelled(jobs[1].id, "worker-a")
    assert store.get(other.id).status == JobStatus.QUEUED
    assert batches.counts(batch_id).as_dict() == {
        "queued": 0,
        "running": 0,
        "succeeded": 1,
        "failed": 0,
        "cancelled": 3,
    }
    assert batches.progress(batch_id).eta_seconds == 0.0


def test_rows_are_read_in_index_order_a_page_at_a_time(store: JobStore, batches: BatchStore) -> None:
    indexes = [9, 3, 100, 0, 5, 41, 7]
    store.submit(_specs(7), batch=NewBatch("pages"), batch_indexes=indexes)
    [view] = batches.list()
    pages = list(batches.job_pages(view.id, page_size=3))
    assert [[job.batch_index for job in page] for page in pages] == [[0, 3, 5], [7, 9, 41], [100]]
    assert [job.batch_index for job in batches.jobs(view.id, page_size=2)] == sorted(indexes)


def test_batches_list_newest_first_per_owner_and_resolve_prefixes(
    store: JobStore, batches: BatchStore, client: Any, db_engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DG_USER", "carol")
    store.submit(_specs(1), batch=NewBatch("mine"))
    store.submit(_specs(1), batch=NewBatch("theirs", owner="dave"))
    assert [(b.name, b.owner) for b in batches.list()] == [("theirs", "dave"), ("mine", "carol")]
    assert [b.name for b in batches.list(owner="carol")] == ["mine"]
    assert [b.name for b in batches.list(limit=1, offset=1)] == ["mine"]
    monkeypatch.delenv("DG_USER")
    assert default_owner({}) not in ("", None) and default_owner({"DG_USER": " eve "}) == "eve"

    with db_engine.begin() as conn:  # two ids that share a prefix
        for suffix in ("0000", "1111"):
            conn.execute(
                sa.insert(BatchRow).values(
                    id=f"abcd{suffix}-0000-4000-8000-000000000000",
                    name=f"b{suffix}",
                    owner="x",
                    model_name="deepgen",
                    created_at=utcnow(),
                    job_count=0,
                )
            )
    assert batches.resolve_prefix("ABCD") == [
        "abcd0000-0000-4000-8000-000000000000",
        "abcd1111-0000-4000-8000-000000000000",
    ]
    assert batches.resolve_prefix("abcd%") == []  # no LIKE wildcard gets in
    assert client.batch("abcd1").name == "b1111"
    assert client.batch("abcd0000-0000-4000-8000-000000000000").name == "b0000"
    with pytest.raises(UsageError, match=r"ambiguous: it matches abcd0000-.*abcd1111-"):
        client.batch("abcd")
    with pytest.raises(UsageError, match="too short"):
        client.batch("abc")
    with pytest.raises(BatchNotFound) as unknown:
        client.batch("ffff")
    assert unknown.value.exit_code == 6 and "`diffgentor batches`" in str(unknown.value)
    with pytest.raises(BatchNotFound):
        client.batch("ffffffff-0000-4000-8000-000000000000")
    assert [b.name for b in client.batches(owner="x")] == ["b1111", "b0000"]
    with pytest.raises(UsageError, match="limit"):
        client.batches(limit=0)


def test_export_and_fetch_name_each_row_by_its_index(
    store: JobStore, client: Any, artifacts: FileArtifactStore, tmp_path: Path
) -> None:
    specs = _specs(4)
    specs[1] = {**specs[1], "params": {**specs[1]["params"], "seed": 11}}
    jobs = [item.job for item in store.submit(specs, batch=NewBatch("export"), batch_indexes=[0, 1, 2, 12])]
    one = complete_job(store, artifacts, jobs[0].id)
    three = complete_job(store, artifacts, jobs[1].id, images=3)
    fail_job(store, jobs[2].id, message='bad, "quoted" input')
    batch = client.batch(jobs[0].batch_id[:8])
    assert isinstance(batch, Batch) and batch.job_count == 4 and batch.name == "export"
    assert batch.counts() == {"queued": 1, "running": 0, "succeeded": 2, "failed": 1, "cancelled": 0}

    paths = batch.fetch(tmp_path / "out")
    names = ["000000.png", "000001_00.png", "000001_01.png", "000001_02.png"]
    assert [path.name for path in paths] == names
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names
    assert (tmp_path / "out" / "000001_02.png").read_bytes() == artifacts.get_bytes(three.artifacts[2].uri)

    assert batch.export(tmp_path / "rows.csv") == 4
    with open(tmp_path / "rows.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["index"] for row in rows] == ["0", "1", "2", "12"]
    assert (
        rows[0]["job_id"] == one.id and rows[0]["status"] == "succeeded" and rows[0]["seed"] == str(one.seed)
    )
    assert json.loads(rows[0]["artifact_uris"]) == [one.artifacts[0].uri]
    assert json.loads(rows[1]["sha256"]) == [a.sha256 for a in three.artifacts] and rows[1]["seed"] == "11"
    assert json.loads(rows[1]["params"])["num_inference_steps"] == 2 and rows[1]["prompt"] == "prompt 1"
    assert (
        rows[2]["error"] == 'ValueError: bad, "quoted" input' and json.loads(rows[2]["artifact_uris"]) == []
    )
    assert rows[3]["status"] == "queued" and rows[3]["error"] == ""

    assert batch.export(tmp_path / "rows.data", format="jsonl") == 4
    records = [json.loads(line) for line in (tmp_path / "rows.data").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 12]
    assert records[1]["artifact_uris"] == [a.uri for a in three.artifacts] and records[1]["seed"] == 11
    assert records[2]["error"].startswith("ValueError") and records[3]["seed"] == jobs[3].seed

    with pytest.raises(UsageError, match="from its suffix"):
        batch.export(tmp_path / "rows.txt")
