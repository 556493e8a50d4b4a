"""Producer flow: commit the rows first, then publish, then record the publish.

Publishing after the commit means a worker never sees an id whose row is not there yet.
A fresh submit commits its rows with `published_at` set and one pending-publish row each
(schemas.tables.PendingPublish), publishes, then deletes the pending rows: no UPDATE of the
new job rows follows the publish (issue 13, bench/results/submit.md). If publishing fails the
rows are set back to no `published_at`; if the producer dies first, the pending rows remain.
Either way the sweeper publishes them after the grace period: a job is never lost.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from schemas.specs import EditSpec, T2ISpec, parse_job_spec
from schemas.views import JobView
from worker.batches import PAGE_SIZE, BatchStore, NewBatch
from worker.grouping import GroupWriter
from worker.jobstore import JobStore, Submitted, publish_target
from worker.publish import Publisher

log = logging.getLogger(__name__)


def submit_jobs(
    store: JobStore,
    publisher: Publisher,
    specs: Iterable[T2ISpec | EditSpec | dict[str, Any]],
    *,
    batch: NewBatch | None = None,
    batch_indexes: Sequence[int] | None = None,
) -> list[Submitted]:
    """Insert (one transaction), publish the new jobs, confirm the publish; input order kept.

    ``batch``: the same transaction also creates a batch record holding the jobs created now, at
    ``batch_indexes`` (default: their positions in ``specs``); each new job's view carries its
    ``batch_id``. Jobs found by idempotency key keep their own batch (`JobStore.submit`).

    Raises the publisher's error after the rows are committed; the caller may report it,
    the sweeper delivers the jobs later.
    """
    specs = list(specs)
    if len(specs) == 1 and batch is None and getattr(publisher, "groups_single_submits", False):
        spec = parse_job_spec(specs[0])
        if not spec.idempotency_key:
            call = _Single(spec)  # its own object: the same spec may come from several threads at once
            return [_single_submits(store, publisher)(call)[id(call)]]
    return _submit_and_publish(store, publisher, specs, batch, batch_indexes)


def _submit_and_publish(
    store: JobStore,
    publisher: Publisher,
    specs: Sequence[T2ISpec | EditSpec | dict[str, Any]],
    batch: NewBatch | None = None,
    batch_indexes: Sequence[int] | None = None,
) -> list[Submitted]:
    submitted = store.submit(specs, batch=batch, batch_indexes=batch_indexes, publishing=True)
    fresh = [s.job.id for s in submitted if s.created]
    if fresh:
        targets = [publish_target(s.job) for s in submitted if s.created]
        try:
            publisher.publish(targets)
        except BaseException:
            store.unmark_published(fresh)
            raise
        store.confirm_published(fresh)
    # The rows as inserted (with published_at); no read back (bulk speed). A job a publisher ran
    # at once (worker.embedded.InProcessPublisher) is read with store.get / get_many.
    return submitted


# [issue 13] Concurrent single submits of one store and publisher (many producer threads) go out
# together: one INSERT of the group's rows with their pending-publish rows (one statement on
# PostgreSQL), one publish of their messages, each caller woken once both are done with its own
# view. One wait per submit instead of one for the INSERT and one for the publish
# (bench/results/submit.md). A row's own error (a constraint, a bad value) re-runs each row alone.
class _Single:
    __slots__ = ("spec",)

    def __init__(self, spec: T2ISpec | EditSpec) -> None:
        self.spec = spec


_SingleSubmits = GroupWriter[_Single, dict[int, Submitted]]
_GROUPS: weakref.WeakKeyDictionary[JobStore, dict[int, tuple[Publisher, _SingleSubmits]]] = (
    weakref.WeakKeyDictionary()
)
_GROUPS_LOCK = threading.Lock()


def _single_submits(store: JobStore, publisher: Publisher) -> _SingleSubmits:
    with _GROUPS_LOCK:
        by_publisher = _GROUPS.setdefault(store, {})
        entry = by_publisher.get(id(publisher))
        if entry is None or entry[0] is not publisher:
            # A weak reference: the writer is a value of `_GROUPS`, keyed weakly by the store.
            store_ref = weakref.ref(store)

            def write(calls: list[_Single]) -> dict[int, Submitted]:
                owner = store_ref()
                if owner is None:  # pragma: no cover - a caller holds the store while it submits
                    raise RuntimeError("the job store was closed while a submit was in flight")
                submitted = _submit_and_publish(owner, publisher, [call.spec for call in calls])
                return {id(call): item for call, item in zip(calls, submitted, strict=True)}

            entry = by_publisher[id(publisher)] = (
                publisher,
                GroupWriter(write, alone_on=(sa.exc.IntegrityError, sa.exc.DataError)),
            )
        return entry[1]


def retry_job(store: JobStore, publisher: Publisher, job_id: str) -> JobView:
    """A failed/cancelled job becomes a new linked job, published like a fresh submit.

    A live retry made earlier is returned instead, and not published again (`JobStore.retry`).
    """
    item = store.retry_or_existing(job_id)
    if item.created:
        _publish(store, publisher, [item.job])
    return store.get(item.job.id)


def retry_failed_batch(
    store: JobStore, publisher: Publisher, batch_id: str, *, page_size: int = PAGE_SIZE
) -> list[JobView]:
    """Every failed or cancelled row of the batch gets a new linked job (same spec and seed, same
    batch index), published page by page after each page's commit; returns the new jobs.

    Each row is retried at most once per call (the pages walk the batch index forward), so a job
    that fails again at once (embedded mode runs it inside `publish`) is not retried again here.
    """
    batches = BatchStore(store)
    made: list[JobView] = []
    after: int | None = None
    while True:
        page = batches.retry_failed_page(batch_id, after=after, limit=page_size)
        if not page:
            return made
        published_at = _publish(store, publisher, page)
        made.extend(job.model_copy(update={"published_at": published_at}) for job in page)
        after = page[-1].batch_index


def _publish(store: JobStore, publisher: Publisher, jobs: list[JobView]) -> datetime | None:
    if not jobs:
        return None
    ids = [job.id for job in jobs]
    publisher.publish([publish_target(job) for job in jobs])
    return store.mark_published(ids)
