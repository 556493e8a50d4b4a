"""Re-publish jobs that would otherwise wait forever (the outbox relay).

Two cases: a producer committed rows but died or failed before publishing (queued with no
`published_at`, past a grace period), and a worker died mid-job (running with an expired
lease). Publishing twice is harmless: the claim lets exactly one delivery run the job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from worker.jobstore import JobStore, open_job_store
from worker.publish import Publisher
from worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepReport:
    unpublished: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    error: str | None = None  # set when publishing failed; the rows stay for the next sweep

    @property
    def republished(self) -> int:
        return 0 if self.error else len(self.unpublished) + len(self.expired)


def sweep_once(settings: Settings, *, store: JobStore | None = None, publisher: Publisher | None = None,
               limit: int = 500) -> SweepReport:
    store = store or open_job_store(settings)
    targets = store.unpublished_or_expired(publish_grace_seconds=settings.publish_grace_seconds, limit=limit)
    if not targets:
        return SweepReport()
    running = {job.id for job in store.get_many([t.job_id for t in targets]) if job.status == "running"}
    unpublished = [t.job_id for t in targets if t.job_id not in running]
    expired = [t.job_id for t in targets if t.job_id in running]
    publisher = publisher or default_publisher(settings)
    try:
        publisher.publish(targets)
    except Exception as exc:
        log.warning("sweep could not publish %d job(s): %s", len(targets), exc)
        return SweepReport(unpublished, expired, error=f"{type(exc).__name__}: {exc}")
    store.mark_published([t.job_id for t in targets])
    log.info("sweep re-published %d unpublished and %d lease-expired job(s)", len(unpublished), len(expired))
    return SweepReport(unpublished, expired)


def default_publisher(settings: Settings) -> Publisher:
    if settings.embedded:
        from worker.embedded import InProcessPublisher

        return InProcessPublisher.from_settings(settings)
    from worker.publish import CeleryPublisher

    return CeleryPublisher(settings.broker_url)
