"""Retention: delete finished jobs, their artifact rows and every object under their key prefix.

`Pruner.prune(older_than=..., statuses=..., batch_id=..., dry_run=...)` is `diffgentor prune`;
`RetentionSchedule` runs it from the sweeper when `DG_RETENTION_DAYS` is set (docs/retention.md).

Crash safety without a tombstone column: each chunk of at most 500 jobs goes through

1. a **manifest** object ``retention/pending/<stamp>-<id>.json`` listing the chunk's job ids is
   written to the artifact store (the intent: these jobs' prefixes must end up empty);
2. ONE database transaction deletes the jobs (only while finished), their artifact rows and the
   batch records left without a job (the rows vanish at once: a reader sees the whole job or none);
3. every object under ``jobs/<job_id>/`` is LISTED and deleted (so objects no row records go too:
   earlier attempts, a losing worker's upload, thumbnails), S3 in DeleteObjects of up to 1000 keys;
4. the manifest is deleted.

A crash between any two steps leaves a manifest, and every prune starts by finishing every pending
manifest (whatever its own filters): rows first, then the prefixes, then the manifest. So no row
ever points at a deleted object (rows go before objects), and no object becomes unreachable (its
job's row, or a manifest naming the job, exists until its prefix is empty). Every step is
idempotent, so two prunes at once (the sweeper and the CLI) are harmless. Objects are only deleted
for jobs whose row is gone: a manifest can never remove the images of a job that still exists.

Edit inputs uploaded by clients (``inputs/<sha256>.<ext>``) are content-addressed and shared by any
number of jobs: they are left alone (docs/retention.md says how to expire them).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa

from schemas.enums import JobStatus
from schemas.tables import Artifact, Batch, Job, UtcDateTime, utcnow
from worker.backoff import Backoff
from worker.claims import rowcount
from worker.jobstore import JobStore
from worker.storage import (
    ArtifactStore,
    FileArtifactStore,
    ObjectNotFoundError,
    S3ArtifactStore,
    StorageError,
    job_prefix,
    open_store,
)
from worker.transient import one_line

log = logging.getLogger(__name__)

FINISHED_STATUSES: tuple[str, ...] = (
    JobStatus.SUCCEEDED.value,
    JobStatus.FAILED.value,
    JobStatus.CANCELLED.value,
)
CHUNK_SIZE = 500  # jobs per manifest and per database transaction
S3_DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes
LIST_THREADS = 8  # prefixes listed at once (S3: one LIST request per job)
PENDING_PREFIX = "retention/pending/"
MAX_DAYS = 36_500.0  # a hundred years; more is a typo (and overflows timedelta soon after)
# The sweeper (DG_RETENTION_DAYS): a prune at most this often, for at most this long per sweep, in
# chunks this big; a run cut short by its time budget goes on at the next sweep.
SCHEDULE_EVERY_SECONDS = 3600.0
SCHEDULE_BUDGET_SECONDS = 10.0
SCHEDULE_CHUNK_SIZE = 100
SCHEDULE_RETRY_SECONDS = 60.0  # after a failed prune: 1, 2, 4 ... minutes, at most the hour

_JOBS = Job.metadata.tables[Job.__tablename__]
_ARTIFACTS = Artifact.metadata.tables[Artifact.__tablename__]
_BATCHES = Batch.metadata.tables[Batch.__tablename__]


# ------------------------------------------------------------------------------------------ report


@dataclass
class PruneReport:
    """What one prune deleted (or, with ``dry_run``, would delete)."""

    cutoff: datetime | None = None  # jobs finished before this
    statuses: tuple[str, ...] = FINISHED_STATUSES
    batch_id: str | None = None
    dry_run: bool = False
    jobs: int = 0
    artifact_rows: int = 0
    objects: int = 0
    bytes: int = 0  # of the objects listed under the jobs' prefixes
    batches: int = 0  # batch records deleted because none of their jobs was left
    resumed: int = 0  # manifests of interrupted prunes finished first
    pending: int = 0  # dry run: manifests of interrupted prunes a real prune would finish first
    complete: bool = True  # False: stopped at its chunk or time budget with jobs left to prune
    kept: list[str] = field(default_factory=list)  # manifest jobs found not finished: left alone

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cutoff"] = self.cutoff.isoformat() if self.cutoff else None
        data["statuses"] = list(self.statuses)
        return data


def check_days(days: float, what: str = "the retention age") -> float:
    """A finite number of days from 0 to `MAX_DAYS`; else ValueError naming ``what``."""
    if not isinstance(days, int | float) or days != days or not 0 <= days <= MAX_DAYS:
        raise ValueError(f"{what} must be a number of days from 0 to {MAX_DAYS:g}, got {days!r}")
    return float(days)


def check_statuses(statuses: Sequence[JobStatus | str] | None) -> tuple[str, ...]:
    """The finished statuses asked for (default: all three); queued or running raise ValueError."""
    if not statuses:
        return FINISHED_STATUSES
    wanted: list[str] = []
    for status in statuses:
        value = status.value if isinstance(status, JobStatus) else str(status).strip().lower()
        if value not in FINISHED_STATUSES:
            known = {s.value for s in JobStatus}
            why = (
                "queued and running jobs are never pruned"
                if value in known
                else f"{value!r} is not a job status"
            )
            raise ValueError(f"cannot prune status {value!r}: {why}; use {', '.join(FINISHED_STATUSES)}")
        if value not in wanted:
            wanted.append(value)
    return tuple(wanted)


# ------------------------------------------------------------------------------------------ objects


@dataclass(frozen=True)
class StoredObject:
    key: str  # relative to the store's prefix, e.g. "jobs/<id>/1/0.png"
    size: int


class ObjectOps(Protocol):
    """Listing and bulk deletion, which the `ArtifactStore` protocol does not have."""

    def list(self, key_prefix: str) -> list[StoredObject]: ...

    def delete(self, keys: Sequence[str]) -> None: ...


def object_ops(store: ArtifactStore) -> ObjectOps:
    """Listing and deletion for ``file://`` and ``s3://`` stores (or a store that has both itself)."""
    if isinstance(store, FileArtifactStore):
        return _FileObjects(store)
    if isinstance(store, S3ArtifactStore):
        return _S3Objects(store)
    if callable(getattr(store, "list", None)) and callable(getattr(store, "delete_keys", None)):
        return _DuckObjects(store)
    raise StorageError(f"retention cannot list objects of a {type(store).__name__}; use file:// or s3://")


class _DuckObjects:
    def __init__(self, store: Any) -> None:
        self._store = store

    def list(self, key_prefix: str) -> list[StoredObject]:
        return list(self._store.list(key_prefix))

    def delete(self, keys: Sequence[str]) -> None:
        self._store.delete_keys(list(keys))


class _FileObjects:
    def __init__(self, store: FileArtifactStore) -> None:
        self.root = store.root

    def list(self, key_prefix: str) -> list[StoredObject]:
        base = self.root / key_prefix
        try:
            if not base.is_dir():
                return []
            found = [
                StoredObject(path.relative_to(self.root).as_posix(), path.lstat().st_size)
                for path in sorted(base.rglob("*"))
                if not path.is_dir() or path.is_symlink()
            ]
        except OSError as exc:
            raise StorageError(f"cannot list {base}: {exc.strerror or exc}") from exc
        return found

    def delete(self, keys: Sequence[str]) -> None:
        folders: set[Path] = set()
        for key in keys:
            path = self.root / key
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot delete {path}: {exc.strerror or exc}") from exc
            folders.update(p for p in path.parents if p.is_relative_to(self.root) and p != self.root)
        # Empty folders left behind (jobs/<id>/<attempt>/, jobs/<id>/), deepest first; a folder a
        # writer just put a file into again stays.
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            if folder.parent == self.root:
                continue  # top-level folders (jobs/, retention/) stay
            with contextlib.suppress(OSError):
                folder.rmdir()


class _S3Objects:
    def __init__(self, store: S3ArtifactStore) -> None:
        self._store = store
        self._prefix = f"{store.prefix}/" if store.prefix else ""

    def list(self, key_prefix: str) -> list[StoredObject]:
        store = self._store
        found: list[StoredObject] = []
        with store._errors(f"s3://{store.bucket}/{self._prefix}{key_prefix}"):
            pages = store.client.get_paginator("list_objects_v2").paginate(
                Bucket=store.bucket, Prefix=self._prefix + key_prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    found.append(StoredObject(item["Key"][len(self._prefix) :], int(item.get("Size", 0))))
        return found

    def delete(self, keys: Sequence[str]) -> None:
        store = self._store
        for start in range(0, len(keys), S3_DELETE_BATCH):
            batch = keys[start : start + S3_DELETE_BATCH]
            with store._errors(f"s3://{store.bucket}/{self._prefix}{batch[0]}"):
                answer = store.client.delete_objects(
                    Bucket=store.bucket,
                    Delete={"Objects": [{"Key": self._prefix + key} for key in batch], "Quiet": True},
                )
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"S3 refused to delete {len(errors)} object(s), e.g. {first.get('Key')}: "
                    f"{first.get('Code')} {first.get('Message', '')}".rstrip()
                )


# ------------------------------------------------------------------------------------------- pruner


class Pruner:
    """Prunes one job database and its artifact store (module docstring: the order and why)."""

    def __init__(
        self,
        store: JobStore,
        artifacts: ArtifactStore,
        *,
        chunk_size: int = CHUNK_SIZE,
        list_threads: int = LIST_THREADS,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.store = store
        self.artifacts = artifacts
        self.objects = object_ops(artifacts)
        self.chunk_size = chunk_size
        self.list_threads = max(1, list_threads)
        self._db = store.database

    # ---- the whole run -------------------------------------------------------------------

    def prune(
        self,
        *,
        older_than: timedelta,
        statuses: Sequence[JobStatus | str] | None = None,
        batch_id: str | None = None,
        dry_run: bool = False,
        max_chunks: int | None = None,
        max_seconds: float | None = None,
        now: datetime | None = None,
    ) -> PruneReport:
        """Delete the jobs of ``statuses`` (default: every finished one) that finished more than
        ``older_than`` ago (only those of ``batch_id`` when given), in chunks. Interrupted prunes
        are finished first. ``max_chunks`` / ``max_seconds`` bound one call (``complete`` then
        says whether jobs are left). ``dry_run``: count what would go, delete nothing."""
        check_days(older_than.total_seconds() / 86400, "older_than")
        report = PruneReport(
            cutoff=(now or utcnow()) - older_than,
            statuses=check_statuses(statuses),
            batch_id=batch_id,
            dry_run=dry_run,
        )
        started = time.monotonic()
        if dry_run:
            report.pending = len(self.pending_manifests())
        else:
            self.resume(report)
        for chunks, ids in enumerate(self._candidate_pages(report), start=1):
            if dry_run:
                self._count(ids, report)
            else:
                self._prune_chunk(ids, report)
            out_of_chunks = max_chunks is not None and chunks >= max_chunks
            out_of_time = max_seconds is not None and time.monotonic() - started >= max_seconds
            if (out_of_chunks or out_of_time) and len(ids) == self.chunk_size:
                report.complete = False
                break
        return report

    def resume(self, report: PruneReport | None = None) -> PruneReport:
        """Finish every interrupted prune (its manifest's rows, prefixes, then the manifest)."""
        report = report if report is not None else PruneReport()
        for key in self.pending_manifests():
            ids = self._read_manifest(key)
            if ids is None:
                continue
            log.info("finishing an interrupted prune of %d job(s) (%s)", len(ids), key)
            self._finish(ids, key, report)
            report.resumed += 1
        return report

    def pending_manifests(self) -> list[str]:
        return sorted(obj.key for obj in self.objects.list(PENDING_PREFIX) if obj.key.endswith(".json"))

    # ---- one chunk -----------------------------------------------------------------------

    def _prune_chunk(self, ids: list[str], report: PruneReport) -> None:
        key = self._write_manifest(ids)
        self._finish(ids, key, report)

    def _finish(self, ids: list[str], manifest_key: str, report: PruneReport) -> None:
        """Steps 2-4: the rows in one transaction, then the prefixes of the jobs whose row is gone,
        then the manifest."""
        gone, kept = self._delete_rows(ids, report)
        if kept:
            log.warning("prune left %d job(s) that are not finished: %s", len(kept), ", ".join(kept[:5]))
            report.kept.extend(kept)
        objects = self._list_prefixes(gone)
        self.objects.delete([obj.key for obj in objects])
        report.objects += len(objects)
        report.bytes += sum(obj.size for obj in objects)
        self.objects.delete([manifest_key])

    def _delete_rows(self, ids: list[str], report: PruneReport) -> tuple[list[str], list[str]]:
        """One transaction: the finished jobs among ``ids``, their artifact rows, and the batch
        records none of whose jobs is left. Returns (ids with no row now, ids kept: not finished)."""
        with self._db.transaction() as session:
            # Locked in id order (PostgreSQL), so two prunes of overlapping chunks never deadlock.
            found = session.execute(
                sa.select(_JOBS.c.id, _JOBS.c.status, _JOBS.c.batch_id)
                .where(_JOBS.c.id.in_(ids))
                .order_by(_JOBS.c.id)
                .with_for_update()
            ).all()
            deletable = [job_id for job_id, status, _ in found if status in FINISHED_STATUSES]
            kept = [job_id for job_id, status, _ in found if status not in FINISHED_STATUSES]
            batch_ids = sorted({batch for job_id, status, batch in found if batch and job_id in deletable})
            if deletable:
                artifacts = session.execute(sa.delete(_ARTIFACTS).where(_ARTIFACTS.c.job_id.in_(deletable)))
                jobs = session.execute(
                    sa.delete(_JOBS).where(_JOBS.c.id.in_(deletable), _JOBS.c.status.in_(FINISHED_STATUSES))
                )
                report.artifact_rows += rowcount(artifacts)
                report.jobs += rowcount(jobs)
            if batch_ids:
                emptied = session.execute(
                    sa.delete(_BATCHES).where(
                        _BATCHES.c.id.in_(batch_ids),
                        ~sa.exists().where(_JOBS.c.batch_id == _BATCHES.c.id),
                    )
                )
                report.batches += rowcount(emptied)
        kept_set = set(kept)
        return [job_id for job_id in ids if job_id not in kept_set], kept

    def _list_prefixes(self, ids: Sequence[str]) -> list[StoredObject]:
        if not ids:
            return []
        prefixes = [job_prefix(job_id) for job_id in ids]
        if self.list_threads == 1 or len(prefixes) == 1 or isinstance(self.objects, _FileObjects):
            listings: Iterator[list[StoredObject]] = map(self.objects.list, prefixes)
            return [obj for listing in listings for obj in listing]
        with ThreadPoolExecutor(self.list_threads, thread_name_prefix="dg-prune-list") as pool:
            return [obj for listing in pool.map(self.objects.list, prefixes) for obj in listing]

    def _count(self, ids: list[str], report: PruneReport) -> None:
        """Dry run: what `_finish` would delete for these jobs."""
        query = sa.select(sa.func.count()).select_from(_ARTIFACTS).where(_ARTIFACTS.c.job_id.in_(ids))
        report.artifact_rows += int(self._db.read(lambda conn: conn.execute(query).scalar_one()))
        report.jobs += len(ids)
        objects = self._list_prefixes(ids)
        report.objects += len(objects)
        report.bytes += sum(obj.size for obj in objects)

    # ---- manifests -----------------------------------------------------------------------

    def _write_manifest(self, ids: list[str]) -> str:
        stamp = utcnow().strftime("%Y%m%dT%H%M%S")
        key = f"{PENDING_PREFIX}{stamp}-{uuid.uuid4().hex}.json"
        body = {"version": 1, "created_at": utcnow().isoformat(), "job_ids": ids}
        self.artifacts.put_bytes(key, json.dumps(body).encode(), "application/json")
        return key

    def _read_manifest(self, key: str) -> list[str] | None:
        try:
            body = json.loads(self.artifacts.get_bytes(self.artifacts.uri_for(key)))
            ids = body["job_ids"]
            if not isinstance(ids, list) or not all(isinstance(job_id, str) for job_id in ids):
                raise ValueError("job_ids is not a list of strings")
        except ObjectNotFoundError:
            return None  # another prune finished it meanwhile
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable retention manifest %s: %s", key, one_line(exc))
            return None
        return ids

    # ---- selection -----------------------------------------------------------------------

    def _candidate_pages(self, report: PruneReport) -> Iterator[list[str]]:
        """Pages of matching job ids, keyset-paginated (a dry run deletes nothing, so it must
        move on; a real run deletes what it read, so the next page starts after it anyway)."""
        cutoff = report.cutoff
        assert cutoff is not None
        if report.batch_id is not None:
            yield from self._pages(
                sa.and_(
                    Job.batch_id == report.batch_id,
                    Job.finished_at < cutoff,
                    Job.status.in_(report.statuses),
                ),
                Job.finished_at,
            )
            return
        for status in report.statuses:
            # `ix_jobs_status_created_at` (status, created_at, id): a job finished before the cutoff
            # was created before it, so the range is `created_at < cutoff` in index order, and
            # `finished_at` is checked on the rows read (no index on finished_at needed).
            yield from self._pages(
                sa.and_(
                    Job.status == status,
                    Job.created_at < cutoff,
                    sa.or_(Job.finished_at < cutoff, Job.finished_at.is_(None)),
                ),
                Job.created_at,
            )

    def _pages(self, where: sa.ColumnElement[bool], order: Any) -> Iterator[list[str]]:
        after: tuple[datetime, str] | None = None
        while True:
            query = sa.select(Job.id, order).where(where)
            if after is not None:
                query = query.where(
                    sa.tuple_(order, Job.id)
                    > sa.tuple_(sa.literal(after[0], UtcDateTime()), sa.literal(after[1], sa.String()))
                )
            query = query.order_by(order, Job.id).limit(self.chunk_size)
            rows = self._db.read(_reader(query))
            if not rows:
                return
            yield [str(row[0]) for row in rows]
            if len(rows) < self.chunk_size:
                return
            last: Any = rows[-1]
            after = (last[1], str(last[0]))


def _reader(query: sa.Select[Any]) -> Callable[[sa.Connection], list[sa.Row[Any]]]:
    def read(conn: sa.Connection) -> list[sa.Row[Any]]:
        return list(conn.execute(query).all())

    return read


# ----------------------------------------------------------------------------------------- schedule


class RetentionSchedule:
    """`DG_RETENTION_DAYS` in the sweeper (the beat task and `diffgentor sweep --loop`).

    `run_if_due(store)` prunes at most every `every_seconds`, for at most `budget_seconds` per
    call (a run cut short goes on at the next sweep), and never raises: a failure is logged (one
    line per back-off step) and tried again after 1, 2, 4 ... minutes, at most `every_seconds`.
    """

    def __init__(
        self,
        days: float,
        *,
        artifacts: Callable[[], ArtifactStore],
        every_seconds: float = SCHEDULE_EVERY_SECONDS,
        budget_seconds: float = SCHEDULE_BUDGET_SECONDS,
        chunk_size: int = SCHEDULE_CHUNK_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.days = check_days(days, "DG_RETENTION_DAYS")
        self._artifacts_factory = artifacts
        self._artifacts: ArtifactStore | None = None
        self.every_seconds = every_seconds
        self.budget_seconds = budget_seconds
        self.chunk_size = chunk_size
        self._clock = clock
        self._next_at: float | None = None  # None: due at the first sweep
        self._backoff = Backoff(
            "retention prune", log, max_factor=max(1, int(every_seconds // SCHEDULE_RETRY_SECONDS))
        )
        self.last_report: PruneReport | None = None

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> RetentionSchedule | None:
        """None when `DG_RETENTION_DAYS` is unset (retention off)."""
        days = getattr(settings, "retention_days", None)
        if days is None:
            return None

        def artifacts() -> ArtifactStore:
            return open_store(
                settings.storage_url,
                endpoint_url=settings.s3_endpoint_url,
                public_endpoint_url=settings.s3_public_endpoint_url,
            )

        return cls(days, artifacts=artifacts, **kwargs)

    def due(self) -> bool:
        return self._next_at is None or self._clock() >= self._next_at

    def run_if_due(self, store: JobStore) -> PruneReport | None:
        """A bounded prune when due; None when not due or when it failed (logged)."""
        if not self.due():
            return None
        try:
            if self._artifacts is None:
                self._artifacts = self._artifacts_factory()
            pruner = Pruner(store, self._artifacts, chunk_size=self.chunk_size)
            report = pruner.prune(older_than=timedelta(days=self.days), max_seconds=self.budget_seconds)
        except Exception as exc:
            self._next_at = self._clock() + min(
                self.every_seconds, self._backoff.failed(exc, SCHEDULE_RETRY_SECONDS)
            )
            return None
        self._backoff.succeeded()
        # Cut short by the budget: go on at the next sweep; else wait the full period.
        self._next_at = self._clock() + (0.0 if not report.complete else self.every_seconds)
        self.last_report = report
        if report.jobs or report.objects or report.resumed:
            log.info(
                "retention (DG_RETENTION_DAYS=%g) pruned %d job(s), %d artifact row(s), %d object(s)%s",
                self.days,
                report.jobs,
                report.artifact_rows,
                report.objects,
                "" if report.complete else "; more next sweep",
            )
        return report
