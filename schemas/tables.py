"""SQLAlchemy 2.0 models of the job database: the source of truth for every job.

All timestamps are timezone-aware UTC. SQLite stores them without an offset, so
`UtcDateTime` re-attaches UTC on the way out; PostgreSQL uses `timestamptz`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from schemas.enums import JobStatus

# Deterministic constraint names, so Alembic migrations are identical on every dialect.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UtcDateTime(TypeDecorator[datetime]):
    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use datetime.now(timezone.utc)")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UtcDateTime(), dict[str, Any]: sa.JSON()}


_UNPUBLISHED = sa.text("status = 'queued' AND published_at IS NULL")
_QUEUED = sa.text("status = 'queued'")
# The batch indexes hold batch jobs only: jobs submitted alone cost them nothing. A query's
# `batch_id = :id` implies the predicate on both dialects, so the planner may use them; its
# `superseded = false` (SQLite: `= 0`, as SQLAlchemy writes it there) matches the second term.
_IN_A_BATCH = sa.text("batch_id IS NOT NULL")
_LATEST_IN_A_BATCH = sa.text("batch_id IS NOT NULL AND NOT superseded")
_LATEST_IN_A_BATCH_SQLITE = sa.text("batch_id IS NOT NULL AND superseded = 0")


class Batch(Base):
    """A named group of jobs submitted together (one CLI run, one `submit_many(batch_name=...)`).

    Created in the same transaction as its jobs. `job_count` is the number of rows (batch
    indexes) it was created with; a retry of a row stays in the batch under the same index
    (docs/jobs.md, "Batches").
    """

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(255))
    owner: Mapped[str] = mapped_column(sa.String(255))
    model_name: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    job_count: Mapped[int]

    __table_args__ = (
        # `diffgentor batches`: newest first, optionally one owner's.
        sa.Index("ix_batches_created_at", "created_at", "id"),
        sa.Index("ix_batches_owner_created_at", "owner", "created_at", "id"),
    )


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(16))
    model_name: Mapped[str] = mapped_column(sa.String(64))
    status: Mapped[str] = mapped_column(sa.String(16), default=JobStatus.QUEUED.value)
    spec: Mapped[dict[str, Any]]
    seed: Mapped[int | None] = mapped_column(sa.BigInteger)
    priority: Mapped[int] = mapped_column(default=0)
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(255), unique=True)
    attempts: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int]
    worker_id: Mapped[str | None] = mapped_column(sa.String(255))
    lease_expires_at: Mapped[datetime | None]
    progress_step: Mapped[int] = mapped_column(default=0)
    progress_total: Mapped[int] = mapped_column(default=0)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    error_type: Mapped[str | None] = mapped_column(sa.String(255))
    error_message: Mapped[str | None] = mapped_column(sa.Text)
    # On failed rows: "permanent" (the user's input or config) or "transient" (an infrastructure
    # fault that outlasted every retry and requeue); see schemas.enums.ErrorClass.
    error_class: Mapped[str | None] = mapped_column(sa.String(16))
    # Times the job was handed back to the queue after an infrastructure fault (not counted as
    # attempts), and the earliest time the sweeper publishes it again.
    requeues: Mapped[int] = mapped_column(default=0, server_default="0")
    available_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    published_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    retry_of: Mapped[str | None] = mapped_column(sa.ForeignKey("jobs.id", ondelete="SET NULL"))
    # Config name, checkpoint file + sha256, library versions, device, dtype: what produced the PNGs.
    provenance: Mapped[dict[str, Any] | None]
    width: Mapped[int | None]
    height: Mapped[int | None]
    # Batches: the job's batch and its row there (the CLI's prompt/CSV index, or the position in a
    # submit_many list). A retry keeps both and sets `superseded` on the row's previous job in the
    # same transaction, so "the latest job of each row" is `superseded = false`. SET NULL: deleting
    # a batch record leaves its jobs (the source of truth, with their artifacts) unbatched.
    batch_id: Mapped[str | None] = mapped_column(sa.ForeignKey("batches.id", ondelete="SET NULL"))
    batch_index: Mapped[int | None] = mapped_column(sa.BigInteger)
    superseded: Mapped[bool] = mapped_column(default=False, server_default=sa.false())

    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="job", order_by="Artifact.index", cascade="all, delete-orphan"
    )

    __table_args__ = (
        # Polling/listing by status and time, per model, and the sweeper's scans.
        # `id` completes list()'s sort key (created_at DESC, id DESC), so a page is an index scan
        # with no filter even when the newest rows are of another status (bench/scale.py).
        sa.Index("ix_jobs_status_created_at", "status", "created_at", "id"),
        sa.Index("ix_jobs_model_name_status_created_at", "model_name", "status", "created_at", "id"),
        sa.Index("ix_jobs_created_at", "created_at", "id"),
        sa.Index("ix_jobs_status_lease_expires_at", "status", "lease_expires_at"),
        sa.Index("ix_jobs_retry_of", "retry_of"),
        # The sweeper's scans, each on a small partial index so a sweep is flat with table size.
        sa.Index(
            "ix_jobs_unpublished_created_at",
            "created_at",
            postgresql_where=_UNPUBLISHED,
            sqlite_where=_UNPUBLISHED,
        ),
        sa.Index(
            "ix_jobs_queued_published_at", "published_at", postgresql_where=_QUEUED, sqlite_where=_QUEUED
        ),
        # Batches, the latest job of each row (`superseded = false`). Counts per status: an
        # index-only scan of one batch's range, already grouped by status; with only five distinct
        # keys per batch, btree deduplication keeps it about 20 bytes a row (bench/batches.py).
        sa.Index(
            "ix_jobs_batch_status",
            "batch_id",
            "status",
            postgresql_where=_LATEST_IN_A_BATCH,
            sqlite_where=_LATEST_IN_A_BATCH_SQLITE,
        ),
        # The rows in `batch_index` order (export, fetch, keyset pages), a row's latest job (a
        # retry supersedes it), and the failed rows (`status` is checked inside the index).
        sa.Index(
            "ix_jobs_batch_rows",
            "batch_id",
            "batch_index",
            "status",
            postgresql_where=_LATEST_IN_A_BATCH,
            sqlite_where=_LATEST_IN_A_BATCH_SQLITE,
        ),
        # Throughput: the batch's jobs finished since a moment (a short range at the end of the
        # batch's range; `status` leaves out cancelled ones without reading the rows). It holds every
        # job of a batch, superseded ones too, so it also serves the foreign key's SET NULL.
        sa.Index(
            "ix_jobs_batch_finished_at",
            "batch_id",
            "finished_at",
            "status",
            postgresql_where=_IN_A_BATCH,
            sqlite_where=_IN_A_BATCH,
        ),
    )


class PendingPublish(Base):
    """[issue 13] A job committed by a producer that publishes it right after the commit.

    Written in the job's own transaction (the job row carries `published_at`, so no UPDATE of the
    jobs table follows the publish); the producer deletes it once the broker took the message. A
    row left past the publish grace (the producer died, or its publish failed and the database was
    unreachable to say so) is published by the sweeper. No foreign key: the check would cost every
    bulk submit a lookup per row, and the sweeper drops rows whose job is gone or no longer queued
    (docs/jobs.md, "Publishing").
    """

    __tablename__ = "pending_publishes"

    job_id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    created_at: Mapped[datetime]


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int]
    uri: Mapped[str] = mapped_column(sa.Text)
    width: Mapped[int]
    height: Mapped[int]
    bytes: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # [issue 12, thumbnails] The small WebP beside the PNG (worker/thumbnails.py), for galleries;
    # NULL for images stored before thumbnails existed (the dashboard shrinks those itself).
    thumbnail_uri: Mapped[str | None] = mapped_column(sa.Text)

    job: Mapped[Job] = relationship(back_populates="artifacts")

    # A re-run overwrites the same (job, index) row instead of adding a second set.
    __table_args__ = (sa.UniqueConstraint("job_id", "index"),)


class WorkerRecord(Base):
    """One row per worker process, for `diffgentor workers` and health checks."""

    __tablename__ = "workers"

    worker_id: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    # The Celery node (`name@host`) the process serves: a prefork child replaced by Celery is a
    # new row of the same node, so health judges nodes, not child pids.
    node: Mapped[str | None] = mapped_column(sa.String(255))
    role: Mapped[str] = mapped_column(
        sa.String(16), default="worker", server_default="worker"
    )  # or "sweeper"
    sweep_interval_seconds: Mapped[float | None] = mapped_column(
        sa.Float()
    )  # sweepers: health expects a sweep within a few of these
    hostname: Mapped[str] = mapped_column(sa.String(255))
    pid: Mapped[int]
    model_name: Mapped[str] = mapped_column(sa.String(64))
    queue: Mapped[str] = mapped_column(sa.String(255))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    current_job_id: Mapped[str | None] = mapped_column(sa.ForeignKey("jobs.id", ondelete="SET NULL"))
    jobs_done: Mapped[int] = mapped_column(default=0)
    last_job_at: Mapped[datetime | None]

    __table_args__ = (
        sa.Index("ix_workers_model_name_heartbeat_at", "model_name", "heartbeat_at"),
        sa.Index("ix_workers_node", "node"),
    )


_PENDING_WEBHOOK = sa.text("status = 'pending'")


class WebhookOutbox(Base):
    """[issue 11] One webhook event of a job (worker/webhooks.py, docs/events.md).

    Rows are inserted by a trigger on `jobs` (migration 0005) in the same transaction that ends a
    job whose spec has a `webhook_url`; `id` is the event id every delivery attempt carries. A
    deliverer claims due `pending` rows with a lease, then marks them `delivered` or, after its
    last attempt, `dead` with the last error.
    """

    __tablename__ = "webhook_outbox"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    event_type: Mapped[str] = mapped_column(sa.String(16))  # succeeded | failed | cancelled
    url: Mapped[str] = mapped_column(sa.Text)
    status: Mapped[str] = mapped_column(sa.String(16), default="pending")  # pending | delivered | dead
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime]
    lease_owner: Mapped[str | None] = mapped_column(sa.String(255))
    lease_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_attempt_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(sa.Text)

    __table_args__ = (
        # The deliverer's scan: due pending rows only, so delivered history costs it nothing.
        sa.Index(
            "ix_webhook_outbox_due",
            "next_attempt_at",
            postgresql_where=_PENDING_WEBHOOK,
            sqlite_where=_PENDING_WEBHOOK,
        ),
        sa.Index("ix_webhook_outbox_job_id", "job_id"),  # a job's events; the cascade of a job delete
    )
