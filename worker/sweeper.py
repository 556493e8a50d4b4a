"""Re-publish jobs that would otherwise wait forever (the outbox relay).

Cases: a producer committed rows but died or failed before publishing (queued with no
`published_at`, past a grace period); a job handed back after an infrastructure fault whose
`available_at` has come; a queued job published long ago whose message may be gone (acked
after an error: `published_at` older than `DG_REPUBLISH_STALE_SECONDS`); every queued job
when the broker lost its data (worker.broker_epoch); and a worker died mid-job (running with
an expired lease: released to `queued` once and published ahead of new work). Publishing
twice is harmless: the claim lets exactly one delivery run the job (docs/jobs.md).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from worker import broker_epoch
from worker.backoff import Backoff
from worker.broker_epoch import BrokerEpoch
from worker.jobstore import JobStore
from worker.publish import Publisher
from worker.registry import WorkerRegistry, default_sweeper_id
from worker.settings import Settings
from worker.transient import one_line

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 30.0  # the longest pause after failed sweeps (unless the interval is longer)


@dataclass(frozen=True)
class SweepReport:
    unpublished: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)  # lease expired: released to `queued` and published once
    stale: list[str] = field(default_factory=list)  # queued, published long ago: the message may be gone
    broker_lost: bool = (
        False  # the broker lost its data and queued jobs were published again (worker.broker_epoch)
    )
    error: str | None = None  # set when publishing failed; the rows stay for the next sweep
    # [issue 11 retention] jobs pruned by this sweep (DG_RETENTION_DAYS); None: no prune ran
    pruned: int | None = None

    @property
    def republished(self) -> int:
        return 0 if self.error else len(self.unpublished) + len(self.expired) + len(self.stale)


class Sweeper:
    """A job store, a publisher and a broker watch kept for repeated sweeps (the beat task,
    `diffgentor sweep --loop`).

    Building them per sweep opened a new database engine (and pool) and a new Celery app with
    its broker connection every interval, and left them to the garbage collector. After each
    finished sweep the sweeper's row in the workers table is refreshed, so `diffgentor health`
    notices a sweeper that stopped sweeping.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store: JobStore | None = None,
        publisher: Publisher | None = None,
        interval_seconds: float | None = None,
    ) -> None:
        self.settings = settings
        self.interval_seconds = interval_seconds or settings.sweep_interval_seconds
        self.sweeper_id = default_sweeper_id()
        self._store = store
        self._publisher = publisher
        self._engine: sa.Engine | None = None  # only the engine this object created (disposed on close)
        self._owns_publisher = publisher is None
        self._epoch: BrokerEpoch | None = None
        self._registered = False
        # [issue 11 retention] DG_RETENTION_DAYS: a bounded prune at most hourly (worker.retention)
        from worker.retention import RetentionSchedule

        self.retention = RetentionSchedule.from_settings(settings)

    @property
    def store(self) -> JobStore:
        if self._store is None:
            from worker.events import events_for  # [issue 11] released leases wake their waiters

            self._store = JobStore(
                self._sessions(), max_attempts=self.settings.max_attempts, events=events_for(self.settings)
            )
        return self._store

    def _sessions(self) -> sessionmaker[Session]:
        from worker.db import make_engine, session_factory, upgrade

        if self._engine is None:
            url = self.settings.database_url
            if url.startswith("sqlite"):
                upgrade(url)  # as open_job_store: SQLite is created/upgraded on first use
            self._engine = make_engine(url)
        return session_factory(self._engine)

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            self._publisher = default_publisher(self.settings)
        return self._publisher

    @property
    def epoch(self) -> BrokerEpoch | None:
        if self._epoch is None and broker_epoch.watches(self.settings.broker_url):
            self._epoch = BrokerEpoch(str(self.settings.broker_url))
        return self._epoch

    def sweep(self, limit: int = 500, max_pages: int = 100) -> SweepReport:
        """One sweep; raises when the database or the broker cannot be reached (callers log and go on)."""
        report = _sweep(self.settings, self.store, lambda: self.publisher, self.epoch, limit, max_pages)
        if report.error is None:
            self._record_sweep()
        if self.retention is not None:  # [issue 11 retention] never raises (logs, backs off)
            pruned = self.retention.run_if_due(self.store)
            if pruned is not None:
                report = replace(report, pruned=pruned.jobs)
        return report

    def _record_sweep(self) -> None:
        """Refresh this sweeper's row (health: "sweeper stalled"); a failure here is only logged."""
        try:
            WorkerRegistry(self.store.sessions).record_sweep(
                self.sweeper_id, interval_seconds=self.interval_seconds
            )
            self._registered = True
        except Exception as exc:
            log.warning("could not record the sweep in the workers table: %s", one_line(exc))

    def close(self) -> None:
        """Release connections; a sweeper that recorded itself removes its row (a clean stop)."""
        if self._registered:
            try:
                WorkerRegistry(self.store.sessions).unregister(self.sweeper_id)
            except Exception as exc:
                log.warning(
                    "could not remove sweeper %s from the workers table: %s", self.sweeper_id, one_line(exc)
                )
        close: Any = getattr(self._publisher, "close", None) if self._owns_publisher else None
        if close is not None:
            close()
        if self._epoch is not None:
            self._epoch.close()
        if self._engine is not None:
            self._engine.dispose()
        self._publisher = self._store = self._engine = self._epoch = None
        self._registered = False


def sweep_once(
    settings: Settings, *, store: JobStore | None = None, publisher: Publisher | None = None, limit: int = 500
) -> SweepReport:
    """One sweep; what it opens itself (engine, Celery app) is closed before it returns."""
    sweeper = Sweeper(settings, store=store, publisher=publisher)
    try:
        return sweeper.sweep(limit)
    finally:
        sweeper.close()


def run_loop(
    sweeper: Sweeper,
    *,
    stop: threading.Event | None = None,
    on_report: Callable[[SweepReport], None] | None = None,
) -> None:
    """Sweep every `sweeper.interval_seconds` until `stop` is set; never ends on a fault.

    A failed sweep (database, broker or store unreachable, or a publish that failed) logs one
    line per back-off step and the next try comes after interval x 1, 2, 4 ... up to about
    max(interval, 30 s); the first good sweep resets it.
    """
    stop = stop or threading.Event()
    interval = sweeper.interval_seconds
    backoff = Backoff("sweep", log, max_factor=max(1, int(MAX_BACKOFF_SECONDS // interval)))
    while not stop.is_set():
        try:
            report = sweeper.sweep()
        except Exception as exc:
            pause = backoff.failed(exc, interval)
        else:
            if on_report is not None:
                on_report(report)
            if report.error:
                pause = backoff.failed(RuntimeError(report.error), interval)
            else:
                backoff.succeeded()
                pause = interval
        stop.wait(pause)


def _sweep(
    settings: Settings,
    store: JobStore,
    publisher_of: Callable[[], Publisher],
    epoch: BrokerEpoch | None,
    limit: int,
    max_pages: int,
) -> SweepReport:
    broker_lost = False
    if epoch is not None and epoch.lost():
        try:
            count = store.requeue_published_queued()
        except Exception:
            epoch.forget()  # the next sweep must see the loss again
            raise
        broker_lost = count > 0
        if broker_lost:
            log.warning(
                "the broker lost its data (sentinel key gone): %d queued job(s) will be published again",
                count,
            )
        else:  # a new broker, or one that lost nothing still needed
            log.info(
                "broker sentinel key set (a new or emptied broker; no queued job needed publishing again)"
            )
    unpublished: list[str] = []
    stale: list[str] = []
    expired: list[str] = []
    store.drop_settled_pending(publish_grace_seconds=settings.publish_grace_seconds)  # [issue 13]
    for _ in range(max_pages):
        found = store.sweep_candidates(
            publish_grace_seconds=settings.publish_grace_seconds,
            republish_stale_seconds=settings.republish_stale_seconds,
            limit=limit,
        )
        released = set(store.release_expired([t.job_id for t in found.expired]))
        released_targets = [t for t in found.expired if t.job_id in released]
        targets = [*found.unpublished, *found.stale, *released_targets]
        if not targets:
            break
        try:
            publisher_of().publish(targets)
        except Exception as exc:
            log.warning("sweep could not publish %d job(s): %s", len(targets), one_line(exc))
            return SweepReport(unpublished, expired, stale, broker_lost, error=one_line(exc))
        store.mark_published([t.job_id for t in targets])
        unpublished += [t.job_id for t in found.unpublished]
        stale += [t.job_id for t in found.stale]
        expired += [t.job_id for t in released_targets]
        if max(len(found.unpublished), len(found.stale), len(found.expired)) < limit:
            break
    if unpublished or stale or expired:
        log.info(
            "sweep re-published %d unpublished, %d stale and %d lease-expired job(s)",
            len(unpublished),
            len(stale),
            len(expired),
        )
    return SweepReport(unpublished, expired, stale, broker_lost)


def default_publisher(settings: Settings) -> Publisher:
    if settings.embedded:
        from worker.embedded import InProcessPublisher

        return InProcessPublisher.from_settings(settings)
    from worker.publish import CeleryPublisher

    return CeleryPublisher(settings.broker_url)
