"""Batch records: jobs submitted together, read and acted on as one.

A batch row is created by `JobStore.submit(..., batch=NewBatch(...))` in the same transaction as
its jobs. Each job carries its row in the batch (`batch_index`); a retry of a row's job stays in
the batch under the same index and marks the job it replaces `superseded` in its own
transaction, so everything here reads "the latest job of each row" as `superseded = false`:

- counts per status: one index-only GROUP BY on `ix_jobs_batch_status` (bench/batches.py);
- throughput: the batch's jobs finished in the last minutes (`ix_jobs_batch_finished_at`);
- jobs in `batch_index` order, in pages (keyset on the index), so 100,000 rows never load at once;
- cancel every unfinished row, retry every failed or cancelled row (pages of new linked jobs).

Publishing the retries is the caller's (`worker.submission.retry_failed_batch`).
"""

from __future__ import annotations

import builtins
import getpass
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from schemas.enums import JobStatus
from schemas.specs import parse_job_spec
from schemas.tables import Batch, Job, utcnow
from schemas.views import BatchCounts, BatchProgress, BatchView, JobView
from worker import claims
from worker.jobstore import (
    _JOBS_TABLE,
    _VIEW_MANY,
    MAX_LIST_LIMIT,
    JobStore,
    _views_from_rows,
    new_job_values,
    new_job_view,
)

DEFAULT_WINDOW_SECONDS = 600.0  # throughput and ETA: jobs finished in the last 10 minutes
PAGE_SIZE = 500  # rows per page of `jobs()` and per transaction of `retry_failed_page()`
MIXED_MODELS = "mixed"
UNKNOWN_OWNER = "unknown"
_RETRYABLE = (JobStatus.FAILED.value, JobStatus.CANCELLED.value)
# Throughput counts work done: a cancelled job finishes at once and would make the rate a spike.
_DONE = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value)
_BATCHES = Batch.metadata.tables[Batch.__tablename__]
_BATCH_COLUMNS = [_BATCHES.c[name] for name in BatchView.model_fields]


class BatchNotFound(LookupError):
    def __init__(self, batch_id: str) -> None:
        super().__init__(f"no batch with id {batch_id!r}")
        self.batch_id = batch_id


@dataclass(frozen=True)
class NewBatch:
    """What a submit is told to record about the batch it creates."""

    name: str
    owner: str | None = None  # None: `default_owner()`
    model_name: str | None = None  # None: the jobs' model (`mixed` when they differ)


@dataclass(frozen=True)
class BatchCancel:
    cancelled: int  # queued (or running with an expired lease): cancelled at once
    stopping: int  # running: asked to stop at the next step


def default_owner(environ: Mapping[str, str] | None = None) -> str:
    """`DG_USER`, else the OS user (getpass), else `unknown` (never raises)."""
    env = os.environ if environ is None else environ
    owner = env.get("DG_USER", "").strip()
    if not owner:
        try:
            owner = getpass.getuser().strip()
        except Exception:  # no USER/LOGNAME and no passwd entry (containers with a random uid)
            owner = ""
    return owner[:255] or UNKNOWN_OWNER


def batch_values(
    batch: NewBatch, batch_id: str, model_names: Sequence[str], job_count: int
) -> dict[str, Any]:
    """The batch row a submit inserts before its jobs."""
    models = sorted(set(model_names))
    model = batch.model_name or (models[0] if len(models) == 1 else MIXED_MODELS)
    return {
        "id": batch_id,
        "name": batch.name[:255],
        "owner": (batch.owner or default_owner())[:255],
        "model_name": model[:64],
        "created_at": utcnow(),
        "job_count": job_count,
    }


def _latest(batch_id: str) -> sa.ColumnElement[bool]:
    """The latest job of each row of the batch: the leading columns of `ix_jobs_batch_rows`."""
    return sa.and_(Job.batch_id == batch_id, Job.superseded == sa.false())


class BatchStore:
    """The named operations on batch records, beside (and through the database of) a `JobStore`."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self._db = store.database

    # ---- records -------------------------------------------------------------------------

    def get(self, batch_id: str) -> BatchView:
        query = sa.select(*_BATCH_COLUMNS).where(_BATCHES.c.id == batch_id)
        row = self._db.read(lambda conn: conn.execute(query).first())
        if row is None:
            raise BatchNotFound(batch_id)
        return BatchView.model_validate(dict(row._mapping))

    def list(self, *, limit: int = 50, offset: int = 0, owner: str | None = None) -> builtins.list[BatchView]:
        """Newest first (`ix_batches_created_at`, or `ix_batches_owner_created_at` for one owner)."""
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}")
        if offset < 0:
            raise ValueError(f"offset must be 0 or greater, got {offset}")
        query = sa.select(*_BATCH_COLUMNS)
        if owner is not None:
            query = query.where(_BATCHES.c.owner == owner)
        query = query.order_by(_BATCHES.c.created_at.desc(), _BATCHES.c.id.desc()).limit(limit).offset(offset)
        rows = self._db.read(lambda conn: conn.execute(query).all())
        return [BatchView.model_validate(dict(row._mapping)) for row in rows]

    def resolve_prefix(self, prefix: str, limit: int = 10) -> builtins.list[str]:
        """Ids of batches starting with ``prefix`` (as `JobStore.resolve_prefix`: a primary-key range)."""
        prefix = prefix.lower()
        if not prefix or any(char not in "0123456789abcdef-" for char in prefix):
            return []
        query = (
            sa.select(_BATCHES.c.id)
            .where(_BATCHES.c.id >= prefix, _BATCHES.c.id.like(f"{prefix}%"))
            .order_by(_BATCHES.c.id)
            .limit(limit)
        )
        return self._db.read(lambda conn: [str(batch_id) for batch_id in conn.scalars(query)])

    # ---- progress ------------------------------------------------------------------------

    def counts(self, batch_id: str) -> BatchCounts:
        """The latest job of each row, per status: one index-only GROUP BY (`ix_jobs_batch_status`)."""
        return self.counts_many([batch_id])[batch_id]

    def counts_many(self, batch_ids: Sequence[str]) -> dict[str, BatchCounts]:
        ids = list(dict.fromkeys(batch_ids))
        if not ids:
            return {}
        found: dict[str, dict[str, int]] = {batch_id: {} for batch_id in ids}
        if len(ids) == 1:
            # One range of `ix_jobs_batch_status`, read in status order: no hashing per row.
            query = (
                sa.select(Job.status, sa.func.count())
                .where(Job.batch_id == ids[0], Job.superseded == sa.false())
                .group_by(Job.status)
            )
            for status, count in self._db.read(lambda conn: conn.execute(query).all()):
                found[ids[0]][status] = int(count)
        else:
            many = (
                sa.select(Job.batch_id, Job.status, sa.func.count())
                .where(Job.batch_id.in_(ids), Job.superseded == sa.false())
                .group_by(Job.batch_id, Job.status)
            )
            for batch_id, status, count in self._db.read(lambda conn: conn.execute(many).all()):
                found[str(batch_id)][status] = int(count)
        return {batch_id: BatchCounts.from_mapping(counts) for batch_id, counts in found.items()}

    def finished_since(self, batch_ids: Sequence[str], since: datetime) -> dict[str, int]:
        """Jobs of each batch that succeeded or failed at/after ``since`` (superseded ones too: work done)."""
        ids = list(dict.fromkeys(batch_ids))
        if not ids:
            return {}
        query = (
            sa.select(Job.batch_id, sa.func.count())
            .where(Job.batch_id.in_(ids), Job.finished_at >= since, Job.status.in_(_DONE))
            .group_by(Job.batch_id)
        )
        found = dict.fromkeys(ids, 0)
        for batch_id, count in self._db.read(lambda conn: conn.execute(query).all()):
            found[str(batch_id)] = int(count)
        return found

    def progress(
        self, batch: BatchView | str, *, window_seconds: float = DEFAULT_WINDOW_SECONDS
    ) -> BatchProgress:
        view = self.get(batch) if isinstance(batch, str) else batch
        return self.progress_many([view], window_seconds=window_seconds)[0]

    def progress_many(
        self, batches: Sequence[BatchView], *, window_seconds: float = DEFAULT_WINDOW_SECONDS
    ) -> builtins.list[BatchProgress]:
        """Counts, throughput and ETA of each batch: two statements for the whole list."""
        if window_seconds <= 0:
            raise ValueError(f"window_seconds must be > 0, got {window_seconds}")
        ids = [batch.id for batch in batches]
        counts = self.counts_many(ids)
        now = utcnow()
        done = self.finished_since(ids, now - timedelta(seconds=window_seconds))
        return [
            BatchProgress(
                batch=batch,
                counts=counts[batch.id],
                # A batch younger than the window: its rate is over its age (3 jobs in its first
                # 2 s are 90/min, not 3 per 10 minutes).
                window_seconds=min(window_seconds, max((now - batch.created_at).total_seconds(), 1.0)),
                finished_in_window=done[batch.id],
            )
            for batch in batches
        ]

    # ---- rows ----------------------------------------------------------------------------

    def jobs(
        self,
        batch_id: str,
        *,
        statuses: Sequence[JobStatus | str] | None = None,
        after: int | None = None,
        page_size: int = PAGE_SIZE,
    ) -> Iterator[JobView]:
        """The latest job of each row, in `batch_index` order (rows after index ``after``), with
        artifacts, read a page at a time (keyset on the index: each page is a short range of
        `ix_jobs_batch_rows`)."""
        for page in self.job_pages(batch_id, statuses=statuses, after=after, page_size=page_size):
            yield from page

    def job_pages(
        self,
        batch_id: str,
        *,
        statuses: Sequence[JobStatus | str] | None = None,
        after: int | None = None,
        page_size: int = PAGE_SIZE,
    ) -> Iterator[builtins.list[JobView]]:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        wanted = None if statuses is None else [JobStatus(status).value for status in statuses]
        while True:
            query = sa.select(Job.id).where(_latest(batch_id))
            if wanted is not None:
                query = query.where(Job.status.in_(wanted))
            if after is not None:
                query = query.where(Job.batch_index > after)
            query = query.order_by(Job.batch_index).limit(page_size)

            def read(conn: sa.Connection, query: sa.Select[Any] = query) -> builtins.list[JobView]:
                ids = list(conn.scalars(query))
                found = _views_from_rows(conn.execute(_VIEW_MANY, {"job_ids": ids})) if ids else {}
                return [found[job_id] for job_id in ids if job_id in found]

            page = self._db.read(read)
            if not page:
                return
            yield page
            if len(page) < page_size:
                return
            after = page[-1].batch_index

    # ---- actions -------------------------------------------------------------------------

    def cancel(self, batch_id: str) -> BatchCancel:
        """Every unfinished row: queued ones (and running ones whose lease expired) are cancelled
        at once, running ones are asked to stop at their next step (as `JobStore.cancel`)."""
        with self._db.transaction() as session:
            cancelled = session.execute(claims.cancel_now(_latest(batch_id)))
            stopping = session.execute(claims.request_stop(_latest(batch_id)))
            return BatchCancel(claims.rowcount(cancelled), claims.rowcount(stopping))

    def retry_failed_page(
        self, batch_id: str, *, after: int | None = None, limit: int = PAGE_SIZE
    ) -> builtins.list[JobView]:
        """One transaction: the next ``limit`` failed or cancelled rows (by index, after ``after``)
        get a new queued job each (same spec and seed, `retry_of` the old one, same batch and
        index) and their old job is marked superseded. Returns the new jobs, by index.

        The old rows are locked first (FOR UPDATE on PostgreSQL; SQLite holds the write lock), as
        `JobStore.retry_or_existing` locks a row's latest job, so the two never both retry a row.
        """
        with self._db.transaction() as session:
            query = (
                sa.select(Job.id, Job.spec, Job.seed, Job.batch_index)
                .where(_latest(batch_id), Job.status.in_(_RETRYABLE))
                .order_by(Job.batch_index)
                .limit(limit)
                .with_for_update()
            )
            if after is not None:
                query = query.where(Job.batch_index > after)
            old = session.execute(query).all()
            if not old:
                return []
            rows = [
                new_job_values(
                    parse_job_spec({**spec, "idempotency_key": None}),
                    self._store.max_attempts,
                    retry_of=job_id,
                    seed=seed,
                    batch_id=batch_id,
                    batch_index=batch_index,
                )
                for job_id, spec, seed, batch_index in old
            ]
            session.execute(
                sa.update(Job)
                .where(Job.id.in_([job_id for job_id, *_ in old]))
                .values(superseded=True)
                .execution_options(synchronize_session=False)
            )
            session.execute(_JOBS_TABLE.insert(), rows)
            return [new_job_view(values) for values in rows]
