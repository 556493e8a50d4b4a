"""The reads a dashboard page needs beyond `JobStore` and `worker.batches.BatchStore`.

Everything else comes from those two (batch list, counts, throughput and ETA, job views). Here:
several batch records by id (the live progress of the rows a page shows), one page of a batch's
latest jobs at an offset with a status filter (the gallery: a short range of `ix_jobs_batch_rows`
and one joined read of those jobs), jobs by id without raising for unknown ones (live updates),
and the queued / running jobs per model (the workers page).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from schemas.enums import JobStatus
from schemas.tables import Batch, Job
from schemas.views import BatchView, JobView
from worker.jobstore import _VIEW_MANY, JobStore, _views_from_rows

_BATCHES = Batch.metadata.tables[Batch.__tablename__]
_BATCH_COLUMNS = [_BATCHES.c[name] for name in BatchView.model_fields]


def batch_views(store: JobStore, batch_ids: Sequence[str]) -> dict[str, BatchView]:
    """The batch records of these ids (unknown ids are left out): one primary-key IN lookup."""
    ids = list(dict.fromkeys(batch_ids))
    if not ids:
        return {}
    query = sa.select(*_BATCH_COLUMNS).where(_BATCHES.c.id.in_(ids))
    rows = store.database.read(lambda conn: conn.execute(query).all())
    return {str(row.id): BatchView.model_validate(dict(row._mapping)) for row in rows}


def batch_jobs_page(
    store: JobStore,
    batch_id: str,
    *,
    statuses: Sequence[JobStatus] | None,
    offset: int,
    limit: int,
) -> list[JobView]:
    """The latest job of each row of a batch, in `batch_index` order, `limit` of them from
    `offset`, optionally only those in ``statuses``; with their artifacts.

    The ids come from the index range (batch_id, superseded = false) of `ix_jobs_batch_rows`,
    whose trailing `status` filters without reading rows; then one joined read of those jobs.
    """
    query = sa.select(Job.id).where(Job.batch_id == batch_id, Job.superseded == sa.false())
    if statuses:
        query = query.where(Job.status.in_([status.value for status in statuses]))
    query = query.order_by(Job.batch_index).limit(limit).offset(offset)

    def read(conn: sa.Connection) -> list[JobView]:
        ids = list(conn.scalars(query))
        found = _views_from_rows(conn.execute(_VIEW_MANY, {"job_ids": ids})) if ids else {}
        return [found[job_id] for job_id in ids if job_id in found]

    return store.database.read(read)


def jobs_by_id(store: JobStore, job_ids: Sequence[str]) -> dict[str, JobView]:
    """Jobs of these ids with their artifacts; unknown ids are left out (never raises for them)."""
    ids = list(dict.fromkeys(job_ids))
    if not ids:
        return {}
    return store.database.read(lambda conn: _views_from_rows(conn.execute(_VIEW_MANY, {"job_ids": ids})))


@dataclass(frozen=True)
class ModelQueue:
    model_name: str
    queued: int  # waiting in the job table (published or not yet)
    running: int
    broker_depth: int | None = None  # messages in the model's Redis queue (None: no broker / unknown)


def model_queues(store: JobStore) -> dict[str, ModelQueue]:
    """Queued and running jobs per model: one GROUP BY on `ix_jobs_model_name_status_created_at`."""
    query = (
        sa.select(Job.model_name, Job.status, sa.func.count())
        .where(Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))
        .group_by(Job.model_name, Job.status)
    )
    counts: dict[str, dict[str, int]] = {}
    for model, status, count in store.database.read(lambda conn: conn.execute(query).all()):
        counts.setdefault(str(model), {})[str(status)] = int(count)
    return {
        model: ModelQueue(model, by_status.get("queued", 0), by_status.get("running", 0))
        for model, by_status in sorted(counts.items())
    }


def broker_depths(broker_url: str, queues: Sequence[str]) -> dict[str, int] | None:
    """Messages waiting in Redis per model queue (kombu's priority sub-lists included), read with a
    1 s timeout; None when the broker cannot be read (the page says so) or `prometheus-client`
    (the `metrics` extra, which holds the reader) is not installed."""
    if not queues:
        return {}
    try:
        from worker.metrics import QueueDepthCollector
    except ImportError:
        return None
    collector: Any = None
    try:
        collector = QueueDepthCollector(broker_url, list(queues), timeout_seconds=1.0)
        return dict(collector.depths())
    except Exception:  # the page shows "broker unreachable"; Redis errors are many kinds
        return None
    finally:
        if collector is not None:
            collector.close()
