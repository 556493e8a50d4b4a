"""`worker.retention.Pruner`: finished jobs go with their artifact rows and every object under their
prefix (on S3 via moto and on the file store, on SQLite and PostgreSQL); queued, running and recent
jobs never; an interrupted prune is finished by the next one and never leaves a row that points at
a deleted object, nor an object no later prune would delete."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from schemas.tables import Artifact, Batch, Job, utcnow
from tests.support import complete_job, fail_job
from worker import retention
from worker.batches import BatchStore, NewBatch
from worker.jobstore import JobNotFound, JobStore
from worker.retention import PENDING_PREFIX, Pruner, check_statuses, object_ops
from worker.storage import ArtifactStore, FileArtifactStore, S3ArtifactStore, content_addressed_key

SPEC = {"kind": "t2i", "prompt": "a fox", "params": {"width": 64, "height": 64, "num_inference_steps": 2}}
MONTH = timedelta(days=30)


def submit(store: JobStore, count: int = 1, **kwargs: Any) -> list[str]:
    return [s.job.id for s in store.submit([dict(SPEC, prompt=f"p{i}") for i in range(count)], **kwargs)]


def age(engine: sa.Engine, job_id: str, days: float, *, finished: bool = True) -> None:
    """Make a job look `days` old: created then, and (when it finished) finished a minute later."""
    created = utcnow() - timedelta(days=days)
    values: dict[str, Any] = {"created_at": created}
    if finished:
        values["finished_at"] = created + timedelta(minutes=1)
    with engine.begin() as conn:
        conn.execute(sa.update(Job).where(Job.id == job_id).values(**values))


def all_keys(artifacts: ArtifactStore) -> set[str]:
    """Every object in the store, read without the code under test (keys relative to its prefix)."""
    if isinstance(artifacts, S3ArtifactStore):
        prefix = f"{artifacts.prefix}/"
        pages = artifacts.client.get_paginator("list_objects_v2").paginate(Bucket=artifacts.bucket)
        return {
            item["Key"][len(prefix) :]
            for page in pages
            for item in page.get("Contents", [])
            if item["Key"].startswith(prefix)
        }
    assert isinstance(artifacts, FileArtifactStore)
    root = artifacts.root
    return {
        (Path(folder) / name).relative_to(root).as_posix()
        for folder, _, names in os.walk(root)
        for name in names
    }


def job_keys(keys: set[str], job_id: str) -> set[str]:
    return {key for key in keys if key.startswith(f"jobs/{job_id}/")}


def extras(artifacts: ArtifactStore, job_id: str) -> None:
    """What no row records: an earlier attempt's object (a worker died between PUT and delete)
    and a thumbnail beside the PNG (the dashboard's)."""
    artifacts.put_bytes(f"jobs/{job_id}/7/0.png", b"orphan of a lost attempt")
    artifacts.put_bytes(f"jobs/{job_id}/1/0.thumb.webp", b"thumbnail", "image/webp")


def assert_consistent(store: JobStore, engine: sa.Engine, artifacts: ArtifactStore) -> None:
    """No artifact row points at a missing object, and every object under jobs/ belongs to a job
    that still has a row or that a pending manifest names (so a later prune deletes it)."""
    with engine.connect() as conn:
        uris = list(conn.scalars(sa.select(Artifact.uri)))
        job_ids = set(conn.scalars(sa.select(Job.id)))
    for uri in uris:
        assert artifacts.exists(uri), f"artifact row points at a deleted object: {uri}"
    keys = all_keys(artifacts)
    pending: set[str] = set()
    for key in keys:
        if key.startswith(PENDING_PREFIX):
            pending.update(json.loads(artifacts.get_bytes(artifacts.uri_for(key)))["job_ids"])
    for key in keys:
        if key.startswith("jobs/"):
            owner = key.split("/")[1]
            assert owner in job_ids or owner in pending, f"unreachable object {key}"


@pytest.fixture
def scene(store: JobStore, db_engine: sa.Engine, artifacts: ArtifactStore) -> dict[str, str]:
    """Old succeeded (2 images + orphan + thumbnail), failed (with an orphan) and cancelled jobs;
    an old queued job, an old running job (objects of an earlier attempt), a recent succeeded one."""
    ids = submit(store, 7)
    names = ["succeeded", "failed", "cancelled", "queued", "running", "recent", "middle"]
    jobs = dict(zip(names, ids, strict=True))
    complete_job(store, artifacts, jobs["succeeded"], images=2)
    extras(artifacts, jobs["succeeded"])
    fail_job(store, jobs["failed"])
    artifacts.put_bytes(f"jobs/{jobs['failed']}/1/0.png", b"left by a worker that died")
    store.cancel(jobs["cancelled"])
    assert store.claim(jobs["running"], "w-live", 600) is not None
    artifacts.put_bytes(f"jobs/{jobs['running']}/1/0.png", b"earlier attempt")
    complete_job(store, artifacts, jobs["recent"])
    complete_job(store, artifacts, jobs["middle"])
    for name in ("succeeded", "failed", "cancelled"):
        age(db_engine, jobs[name], 40)
    age(db_engine, jobs["queued"], 40, finished=False)
    age(db_engine, jobs["running"], 40, finished=False)
    age(db_engine, jobs["middle"], 10)
    artifacts.put_bytes(content_addressed_key(b"input", "png"), b"input")  # shared edit input
    return jobs


def test_prune_deletes_old_finished_jobs_and_everything_under_their_prefix(
    store: JobStore, db_engine: sa.Engine, artifacts: ArtifactStore, scene: dict[str, str]
) -> None:
    before = all_keys(artifacts)
    old = [scene["succeeded"], scene["failed"], scene["cancelled"]]
    report = Pruner(store, artifacts).prune(older_than=MONTH)

    assert (report.jobs, report.artifact_rows, report.objects) == (3, 2, 5)
    assert report.bytes > 0 and report.complete and not report.dry_run
    for job_id in old:
        with pytest.raises(JobNotFound):
            store.get(job_id)
    keys = all_keys(artifacts)
    assert not any(job_keys(keys, job_id) for job_id in old)
    expected = {"queued": "queued", "running": "running", "recent": "succeeded", "middle": "succeeded"}
    for name, status in expected.items():  # never, and not yet
        assert store.get(scene[name]).status.value == status
        assert job_keys(keys, scene[name]) == job_keys(before, scene[name])
    assert all(job_keys(keys, scene[name]) for name in ("running", "recent", "middle"))
    assert content_addressed_key(b"input", "png") in keys  # shared inputs stay
    assert not any(key.startswith(PENDING_PREFIX) for key in keys)
    assert {job.id for job in store.list(limit=100)} == {
        scene[n] for n in ("queued", "running", "recent", "middle")
    }
    assert_consistent(store, db_engine, artifacts)

    again = Pruner(store, artifacts).prune(older_than=MONTH)  # idempotent
    assert (again.jobs, again.objects, again.resumed) == (0, 0, 0)
    fewer = Pruner(store, artifacts).prune(older_than=timedelta(days=5))
    assert fewer.jobs == 1 and not job_keys(all_keys(artifacts), scene["middle"])


def test_dry_run_counts_what_a_prune_deletes_and_deletes_nothing(
    store: JobStore, db_engine: sa.Engine, artifacts: ArtifactStore, scene: dict[str, str]
) -> None:
    keys = all_keys(artifacts)
    dry = Pruner(store, artifacts, chunk_size=2).prune(older_than=MONTH, dry_run=True)

    assert dry.dry_run and all_keys(artifacts) == keys
    assert len(store.list(limit=100)) == 7
    real = Pruner(store, artifacts).prune(older_than=MONTH)
    assert (dry.jobs, dry.artifact_rows, dry.objects, dry.bytes) == (
        real.jobs,
        real.artifact_rows,
        real.objects,
        real.bytes,
    )


def test_status_filter_and_refused_statuses(
    store: JobStore, db_engine: sa.Engine, file_artifacts: ArtifactStore
) -> None:
    succeeded, failed, cancelled = submit(store, 3)
    complete_job(store, file_artifacts, succeeded)
    fail_job(store, failed)
    store.cancel(cancelled)
    for job_id in (succeeded, failed, cancelled):
        age(db_engine, job_id, 40)

    report = Pruner(store, file_artifacts).prune(older_than=MONTH, statuses=["failed", "cancelled"])
    assert report.jobs == 2 and report.statuses == ("failed", "cancelled")
    assert [job.id for job in store.list(limit=10)] == [succeeded]
    for refused in (["running"], ["queued"], ["done"]):
        with pytest.raises(ValueError, match="cannot prune status"):
            check_statuses(refused)


def test_batch_filter_and_emptied_batch_records(
    store: JobStore, db_engine: sa.Engine, file_artifacts: ArtifactStore
) -> None:
    first = submit(store, 3, batch=NewBatch("first"))
    second = submit(store, 2, batch=NewBatch("second"))
    for job_id in first + second:
        complete_job(store, file_artifacts, job_id)
        age(db_engine, job_id, 40)
    batches = BatchStore(store)
    first_batch = store.get(first[0]).batch_id
    second_batch = store.get(second[0]).batch_id
    assert first_batch and second_batch

    fail_only = Pruner(store, file_artifacts).prune(
        older_than=MONTH, statuses=["failed"], batch_id=first_batch
    )
    assert fail_only.jobs == 0
    report = Pruner(store, file_artifacts, chunk_size=2).prune(older_than=timedelta(0), batch_id=first_batch)

    assert (report.jobs, report.batches) == (3, 1)
    assert list(batches.jobs(first_batch)) == []
    with pytest.raises(LookupError):
        batches.get(first_batch)  # no job left: the record goes too
    assert [job.id for job in batches.jobs(second_batch)] == second
    assert not any(job_keys(all_keys(file_artifacts), job_id) for job_id in first)

    # A batch that keeps some jobs keeps its record (its counts show what is left).
    with db_engine.begin() as conn:
        conn.execute(sa.update(Job).where(Job.id == second[0]).values(status="failed"))
    kept = Pruner(store, file_artifacts).prune(older_than=MONTH, statuses=["failed"], batch_id=second_batch)
    assert (kept.jobs, kept.batches) == (1, 0)
    assert batches.get(second_batch).job_count == 2 and batches.counts(second_batch).succeeded == 1


class Crash(Exception):
    """Stands for the process dying at this point."""


class CrashingObjects:
    """The store's listing/deletion, dying at the first delete of keys under ``crash_prefix``."""

    def __init__(self, inner: Any, crash_prefix: str) -> None:
        self.inner = inner
        self.crash_prefix = crash_prefix

    def list(self, key_prefix: str) -> Any:
        return self.inner.list(key_prefix)

    def delete(self, keys: Any) -> None:
        if keys and keys[0].startswith(self.crash_prefix):
            raise Crash(f"died deleting {keys[0]}")
        self.inner.delete(keys)


@pytest.mark.parametrize("crash_at", ["rows", "objects", "manifest"])
def test_an_interrupted_prune_is_finished_by_the_next_one(
    store: JobStore,
    db_engine: sa.Engine,
    artifacts: ArtifactStore,
    scene: dict[str, str],
    crash_at: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Died after the manifest (before the rows), after the rows (before the objects), or after
    the objects (before the manifest is removed): readers never see a job whose images are gone,
    and the next prune, whatever its own filters, finishes the interrupted chunk."""
    pruner = Pruner(store, artifacts)
    if crash_at == "rows":

        def die(*_: Any) -> Any:
            raise Crash("died before the row transaction")

        monkeypatch.setattr(pruner, "_delete_rows", die)
    else:
        pruner.objects = CrashingObjects(pruner.objects, "jobs/" if crash_at == "objects" else PENDING_PREFIX)
    with pytest.raises(Crash):
        pruner.prune(older_than=MONTH)

    assert_consistent(store, db_engine, artifacts)
    manifests = [key for key in all_keys(artifacts) if key.startswith(PENDING_PREFIX)]
    assert len(manifests) == 1
    chunk = json.loads(artifacts.get_bytes(artifacts.uri_for(manifests[0])))["job_ids"]
    assert chunk == [scene["succeeded"]]  # the first chunk: one status at a time
    if crash_at == "rows":  # nothing visible changed: whole jobs, with their images
        assert store.get(scene["succeeded"]).artifacts and len(store.list(limit=100)) == 7
    else:  # the rows are gone at once: no reader shows these jobs, with or without images
        with pytest.raises(JobNotFound):
            store.get(scene["succeeded"])
        assert scene["succeeded"] not in {job.id for job in store.list(limit=100)}

    # The next prune asks for something else entirely, and still finishes the interrupted chunk.
    report = Pruner(store, artifacts).prune(older_than=timedelta(days=365), statuses=["cancelled"])
    assert (report.resumed, report.jobs) == (1, 0 if crash_at != "rows" else 1)
    keys = all_keys(artifacts)
    assert not job_keys(keys, scene["succeeded"])
    assert job_keys(keys, scene["failed"])  # not in the interrupted chunk, nor asked for now
    assert not any(key.startswith(PENDING_PREFIX) for key in keys)
    assert job_keys(keys, scene["running"]) and job_keys(keys, scene["recent"])
    assert_consistent(store, db_engine, artifacts)


def test_a_manifest_never_removes_a_job_that_is_not_finished(
    store: JobStore, db_engine: sa.Engine, file_artifacts: ArtifactStore
) -> None:
    running, gone = submit(store, 2)
    assert store.claim(running, "w-live", 600) is not None
    file_artifacts.put_bytes(f"jobs/{running}/1/0.png", b"in progress")
    file_artifacts.put_bytes(f"jobs/{gone}/1/0.png", b"row already deleted")
    with db_engine.begin() as conn:
        conn.execute(sa.delete(Job).where(Job.id == gone))
    body = json.dumps({"version": 1, "job_ids": [running, gone]}).encode()
    file_artifacts.put_bytes(f"{PENDING_PREFIX}20260101T000000-x.json", body, "application/json")

    report = Pruner(store, file_artifacts).resume()

    assert report.kept == [running] and report.resumed == 1 and report.objects == 1
    assert store.get(running).status.value == "running"
    assert job_keys(all_keys(file_artifacts), running) and not job_keys(all_keys(file_artifacts), gone)


def test_s3_deletes_go_in_batches_of_the_deleteobjects_limit(
    s3_artifacts: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeleteObjects takes at most 1000 keys: the keys go in requests of at most that many (the
    limit made 4 here, so 10 objects take 3 requests without writing 1001 of them)."""
    assert isinstance(s3_artifacts, S3ArtifactStore)
    client = s3_artifacts.client
    for index in range(10):
        client.put_object(Bucket=s3_artifacts.bucket, Key=f"team/dg/jobs/many/1/{index}.png", Body=b"x")
    client.put_object(Bucket=s3_artifacts.bucket, Key="team/dg/jobs/many-other/1/0.png", Body=b"x")
    monkeypatch.setattr(retention, "S3_DELETE_BATCH", 4)
    sizes: list[int] = []
    real = client.delete_objects

    def counting(**kwargs: Any) -> Any:
        sizes.append(len(kwargs["Delete"]["Objects"]))
        return real(**kwargs)

    monkeypatch.setattr(client, "delete_objects", counting)
    ops = object_ops(s3_artifacts)
    listed = ops.list("jobs/many/")
    assert sorted(obj.key for obj in listed) == sorted(f"jobs/many/1/{i}.png" for i in range(10))
    ops.delete([obj.key for obj in listed])
    assert sizes == [4, 4, 2] and ops.list("jobs/many/") == []
    assert [obj.key for obj in ops.list("jobs/many-other/")] == ["jobs/many-other/1/0.png"]


def test_file_store_leaves_no_empty_job_folders(
    store: JobStore, db_engine: sa.Engine, file_artifacts: FileArtifactStore
) -> None:
    job_id = submit(store)[0]
    complete_job(store, file_artifacts, job_id, images=2)
    extras(file_artifacts, job_id)
    age(db_engine, job_id, 40)
    Pruner(store, file_artifacts).prune(older_than=MONTH)
    assert not (file_artifacts.root / "jobs" / job_id).exists()
    assert (file_artifacts.root / "jobs").is_dir()


def test_batch_rows_are_gone_from_counts_and_exports(
    store: JobStore, db_engine: sa.Engine, file_artifacts: ArtifactStore
) -> None:
    ids = submit(store, 2, batch=NewBatch("half"))
    for job_id in ids:
        complete_job(store, file_artifacts, job_id)
    age(db_engine, ids[0], 40)
    batch_id = store.get(ids[0]).batch_id
    assert batch_id
    Pruner(store, file_artifacts).prune(older_than=MONTH)
    batches = BatchStore(store)
    assert [job.id for job in batches.jobs(batch_id)] == [ids[1]]
    assert batches.counts(batch_id).total == 1
    with db_engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(Batch)) == 1
