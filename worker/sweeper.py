"""Re-publish jobs that would otherwise wait forever (the outbox relay).

Three cases: a producer committed rows but died or failed before publishing (queued with no
`published_at`, past a grace period); a queued job published long ago whose message is gone
(acked after an error, or Redis lost its data: `published_at` older than
`DG_REPUBLISH_STALE_SECONDS`); and a worker died mid-job (running with an expired lease).
Publishing twice is harmless: the claim lets exactly one delivery run the job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from worker.jobstore import JobStore
from worker.publish import Publisher
from worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepReport:
    unpublished: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # queued, published long ago: the message may be gone
    error: str | None = None  # set when publishing failed; the rows stay for the next sweep

    @property
    def republished(self) -> int:
        return 0 if self.error else len(self.unpublished) + len(self.expired) + len(self.stale)


class Sweeper:
    """A job store and a publisher kept for repeated sweeps (the beat task, `diffgentor sweep --loop`).

    Building them per sweep opened a new database engine (and pool) and a new Celery app with
    its broker connection every interval, and left them to the garbage collector.
    """

    def __init__(self, settings: Settings, *, store: JobStore | None = None,
                 publisher: Publisher | None = None) -> None:
        self.settings = settings
        self._store = store
        self._publisher = publisher
        self._engine: sa.Engine | None = None  # only the engine this object created (disposed on close)
        self._owns_publisher = publisher is None

    @property
    def store(self) -> JobStore:
        if self._store is None:
            from worker.db import make_engine, session_factory, upgrade

            url = self.settings.database_url
            if url.startswith("sqlite"):
                upgrade(url)  # as open_job_store: SQLite is created/upgraded on first use
            self._engine = make_engine(url)
            self._store = JobStore(session_factory(self._engine), max_attempts=self.settings.max_attempts)
        return self._store

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            self._publisher = default_publisher(self.settings)
        return self._publisher

    def sweep(self, limit: int = 500) -> SweepReport:
        return _sweep(self.settings, self.store, lambda: self.publisher, limit)

    def close(self) -> None:
        close: Any = getattr(self._publisher, "close", None) if self._owns_publisher else None
        if close is not None:
            close()
        if self._engine is not None:
            self._engine.dispose()
        self._publisher = self._store = self._engine = None


def sweep_once(settings: Settings, *, store: JobStore | None = None, publisher: Publisher | None = None,
               limit: int = 500) -> SweepReport:
    """One sweep; what it opens itself (engine, Celery app) is closed before it returns."""
    sweeper = Sweeper(settings, store=store, publisher=publisher)
    try:
        return sweeper.sweep(limit)
    finally:
        sweeper.close()


def _sweep(settings: Settings, store: JobStore, publisher_of: Any, limit: int) -> SweepReport:
    targets = store.unpublished_or_expired(
        publish_grace_seconds=settings.publish_grace_seconds,
        republish_stale_seconds=settings.republish_stale_seconds,
        limit=limit,
    )
    if not targets:
        return SweepReport()
    views = {job.id: job for job in store.get_many([t.job_id for t in targets])}
    expired = [t.job_id for t in targets if views[t.job_id].status == "running"]
    stale = [t.job_id for t in targets
             if views[t.job_id].status != "running" and views[t.job_id].published_at is not None]
    seen = set(expired) | set(stale)
    unpublished = [t.job_id for t in targets if t.job_id not in seen]
    publisher: Publisher = publisher_of()
    try:
        publisher.publish(targets)
    except Exception as exc:
        log.warning("sweep could not publish %d job(s): %s", len(targets), exc)
        return SweepReport(unpublished, expired, stale, error=f"{type(exc).__name__}: {exc}")
    store.mark_published([t.job_id for t in targets])
    log.info("sweep re-published %d unpublished, %d stale and %d lease-expired job(s)",
             len(unpublished), len(stale), len(expired))
    return SweepReport(unpublished, expired, stale)


def default_publisher(settings: Settings) -> Publisher:
    if settings.embedded:
        from worker.embedded import InProcessPublisher

        return InProcessPublisher.from_settings(settings)
    from worker.publish import CeleryPublisher

    return CeleryPublisher(settings.broker_url)
