"""All job-table operations, each in its own short transaction.

Producer side: submit (idempotent), publish bookkeeping, get/list, cancel, retry.
Worker side: claim/lease/progress/fenced finish, delegated to `worker.claims`.
Sweeper side: `unpublished_or_expired`.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from schemas.enums import JobStatus
from schemas.specs import EditSpec, T2ISpec, parse_job_spec
from schemas.tables import Job, utcnow
from schemas.views import JobView
from worker import claims
from worker.claims import ArtifactRecord, ClaimedJob, ClaimRefusal, LeaseState

MAX_LIST_LIMIT = 1000
SEED_RANGE = 2**32


class JobNotFound(LookupError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class InvalidTransition(ValueError):
    """The job is not in a state that allows the requested operation."""


@dataclass(frozen=True)
class Submitted:
    job: JobView
    created: bool  # False: an existing job with the same idempotency key was returned


@dataclass(frozen=True)
class PublishTarget:
    """What a publisher needs to route a job's message."""

    job_id: str
    model_name: str
    priority: int


def publish_target(job: JobView) -> PublishTarget:
    return PublishTarget(job.id, job.model_name, job.priority)


def _view(job: Job) -> JobView:
    return JobView.model_validate(job)


def _new_values(spec: T2ISpec | EditSpec, max_attempts: int, retry_of: str | None = None,
                seed: int | None = None) -> dict[str, Any]:
    """Every column of a new queued row (also what its JobView is built from, without a read back)."""
    params = spec.params
    return {
        "id": str(uuid.uuid4()),
        "kind": spec.kind,
        "model_name": spec.model_name,
        "status": JobStatus.QUEUED.value,
        "spec": spec.model_dump(mode="json"),
        # Drawn now, not at run time, so a redelivered or re-run job reproduces the same image.
        "seed": params.seed if params.seed is not None else (seed if seed is not None else secrets.randbelow(SEED_RANGE)),
        "priority": spec.priority,
        "idempotency_key": spec.idempotency_key,
        "attempts": 0,
        "max_attempts": max_attempts,
        "worker_id": None,
        "lease_expires_at": None,
        "progress_step": 0,
        "progress_total": params.num_inference_steps,
        "cancel_requested": False,
        "error_type": None,
        "error_message": None,
        "created_at": utcnow(),
        "published_at": None,
        "started_at": None,
        "finished_at": None,
        "retry_of": retry_of,
        "provenance": None,
        "width": params.width,
        "height": params.height,
    }


def _new_row(spec: T2ISpec | EditSpec, max_attempts: int, retry_of: str | None = None,
             seed: int | None = None) -> Job:
    return Job(**_new_values(spec, max_attempts, retry_of, seed))


class JobStore:
    def __init__(self, sessions: sessionmaker[Session], *, max_attempts: int = 3) -> None:
        self._sessions = sessions
        self.max_attempts = max_attempts

    # ---- producer side -------------------------------------------------------------------

    def submit(self, specs: Iterable[T2ISpec | EditSpec | dict[str, Any]]) -> list[Submitted]:
        """Insert jobs in one transaction, in input order; known idempotency keys return the old job."""
        parsed = [parse_job_spec(spec) for spec in specs]
        try:
            return self._submit_once(parsed)
        except IntegrityError:
            # A concurrent producer inserted one of our idempotency keys first: look again.
            return self._submit_once(parsed)

    def _submit_once(self, specs: list[T2ISpec | EditSpec]) -> list[Submitted]:
        # Bulk path: one IN lookup for all idempotency keys and one multi-row INSERT (Core, not
        # per-object ORM flushes); the views are built from the inserted values, not read back.
        keys = {s.idempotency_key for s in specs if s.idempotency_key}
        with self._sessions.begin() as session:
            existing: dict[str, JobView] = {}
            if keys:
                found = session.scalars(
                    sa.select(Job).where(Job.idempotency_key.in_(keys)).options(selectinload(Job.artifacts))
                )
                existing = {job.idempotency_key: _view(job) for job in found if job.idempotency_key}
            rows: list[dict[str, Any]] = []
            results: list[Submitted] = []
            for spec in specs:
                key = spec.idempotency_key
                if key and key in existing:
                    results.append(Submitted(existing[key], False))
                    continue
                values = _new_values(spec, self.max_attempts)
                rows.append(values)
                view = JobView.model_validate(values)
                if key:
                    existing[key] = view  # a repeated key inside one batch is one job
                results.append(Submitted(view, True))
            if rows:
                session.execute(Job.__table__.insert(), rows)  # Core executemany: batched multi-row INSERTs
            return results

    def mark_published(self, job_ids: Sequence[str]) -> datetime:
        """Set `published_at` (still queued or running jobs only); returns the time written."""
        now = utcnow()
        if not job_ids:
            return now
        with self._sessions.begin() as session:
            session.execute(
                sa.update(Job)
                .where(Job.id.in_(list(job_ids)), Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]))
                .values(published_at=now)
                .execution_options(synchronize_session=False)
            )
        return now

    def get(self, job_id: str) -> JobView:
        with self._sessions() as session:
            job = session.get(Job, job_id, options=[selectinload(Job.artifacts)])
            if job is None:
                raise JobNotFound(job_id)
            return _view(job)

    def get_many(self, job_ids: Sequence[str]) -> list[JobView]:
        """Jobs in the order asked; raises JobNotFound for the first unknown id."""
        with self._sessions() as session:
            found = {
                job.id: job
                for job in session.scalars(
                    sa.select(Job).where(Job.id.in_(list(job_ids))).options(selectinload(Job.artifacts))
                )
            }
            missing = [job_id for job_id in job_ids if job_id not in found]
            if missing:
                raise JobNotFound(missing[0])
            return [_view(found[job_id]) for job_id in job_ids]

    def list(
        self,
        *,
        status: JobStatus | str | Sequence[JobStatus | str] | None = None,
        model_name: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[JobView]:
        """Newest first."""
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIST_LIMIT}, got {limit}")
        if offset < 0:
            raise ValueError(f"offset must be 0 or greater, got {offset}")
        query = sa.select(Job).options(selectinload(Job.artifacts))
        if status is not None:
            wanted = [status] if isinstance(status, str | JobStatus) else list(status)
            query = query.where(Job.status.in_([JobStatus(s).value for s in wanted]))
        if model_name is not None:
            query = query.where(Job.model_name == model_name)
        if created_after is not None:
            query = query.where(Job.created_at >= created_after)
        if created_before is not None:
            query = query.where(Job.created_at < created_before)
        query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit).offset(offset)
        with self._sessions() as session:
            return [_view(job) for job in session.scalars(query)]

    def cancel(self, job_id: str) -> JobView:
        """Queued: cancelled at once (a later claim fails). Running: ask the worker to stop."""
        now = utcnow()
        with self._sessions.begin() as session:
            session.execute(
                sa.update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value)
                .values(status=JobStatus.CANCELLED.value, cancel_requested=True, finished_at=now)
                .execution_options(synchronize_session=False)
            )
            session.execute(
                sa.update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
                .values(cancel_requested=True)
                .execution_options(synchronize_session=False)
            )
        return self.get(job_id)

    def retry(self, job_id: str) -> JobView:
        """A failed or cancelled job becomes a new queued job (same spec and seed) linked to the old one."""
        with self._sessions.begin() as session:
            old = session.get(Job, job_id)
            if old is None:
                raise JobNotFound(job_id)
            if old.status not in (JobStatus.FAILED.value, JobStatus.CANCELLED.value):
                raise InvalidTransition(f"job {job_id} is {old.status}; only failed or cancelled jobs can be retried")
            spec = parse_job_spec({**old.spec, "idempotency_key": None})
            row = _new_row(spec, self.max_attempts, retry_of=old.id, seed=old.seed)
            row.artifacts = []
            session.add(row)
            session.flush()
            return _view(row)

    # ---- worker side ---------------------------------------------------------------------

    def claim(self, job_id: str, worker_id: str, lease_seconds: float) -> ClaimedJob | None:
        outcome = self.claim_or_refusal(job_id, worker_id, lease_seconds)
        return outcome if isinstance(outcome, ClaimedJob) else None

    def claim_or_refusal(self, job_id: str, worker_id: str, lease_seconds: float) -> ClaimedJob | ClaimRefusal:
        with self._sessions.begin() as session:
            return claims.claim(session, job_id, worker_id, lease_seconds)

    def heartbeat(self, job_id: str, worker_id: str, lease_seconds: float) -> LeaseState:
        with self._sessions.begin() as session:
            return claims.renew_lease(session, job_id, worker_id, lease_seconds)

    def record_progress(self, job_id: str, worker_id: str, step: int, total: int) -> LeaseState:
        with self._sessions.begin() as session:
            return claims.record_progress(session, job_id, worker_id, step, total)

    def record_artifacts(self, job_id: str, artifacts: Sequence[ArtifactRecord]) -> None:
        with self._sessions.begin() as session:
            claims.upsert_artifacts(session, job_id, list(artifacts))

    def finish_succeeded(
        self,
        job_id: str,
        worker_id: str,
        *,
        artifacts: Sequence[ArtifactRecord],
        seed: int,
        width: int,
        height: int,
        provenance: dict[str, Any] | None,
    ) -> bool:
        """Complete and record artifacts in one transaction, only while this worker owns the job."""
        with self._sessions.begin() as session:
            done = claims.finish(
                session, job_id, worker_id, JobStatus.SUCCEEDED,
                seed=seed, width=width, height=height, provenance=provenance,
                error_type=None, error_message=None,
            )
            if done:
                claims.upsert_artifacts(session, job_id, list(artifacts))
                session.execute(
                    sa.update(Job).where(Job.id == job_id).values(progress_step=Job.progress_total)
                    .execution_options(synchronize_session=False)
                )
            return done

    def finish_failed(self, job_id: str, worker_id: str, *, error_type: str, error_message: str) -> bool:
        with self._sessions.begin() as session:
            return claims.finish(
                session, job_id, worker_id, JobStatus.FAILED,
                error_type=error_type[:255], error_message=error_message,
            )

    def fail_killed_process_job(self, job_id: str, worker_id_prefix: str, *, error_type: str,
                                error_message: str) -> bool:
        with self._sessions.begin() as session:
            return claims.fail_killed_process_job(session, job_id, worker_id_prefix, error_type=error_type[:255],
                                                  error_message=error_message)

    def finish_cancelled(self, job_id: str, worker_id: str) -> bool:
        with self._sessions.begin() as session:
            return claims.finish(session, job_id, worker_id, JobStatus.CANCELLED)

    # ---- sweeper side --------------------------------------------------------------------

    def unpublished_or_expired(self, *, publish_grace_seconds: float, limit: int = 500) -> list[PublishTarget]:
        """Queued jobs never published (past a grace) and running jobs whose lease expired.

        An expired job is only returned again once its last re-publish is older than the grace,
        so each sweep does not pile up duplicate messages.
        """
        now = utcnow()
        horizon = now - timedelta(seconds=publish_grace_seconds)
        unpublished = sa.and_(
            Job.status == JobStatus.QUEUED.value, Job.published_at.is_(None), Job.created_at < horizon
        )
        expired = sa.and_(
            Job.status == JobStatus.RUNNING.value,
            Job.lease_expires_at < now,
            sa.or_(Job.published_at.is_(None), Job.published_at < horizon),
        )
        query = (
            sa.select(Job.id, Job.model_name, Job.priority)
            .where(sa.or_(unpublished, expired))
            .order_by(Job.created_at)
            .limit(limit)
        )
        with self._sessions() as session:
            return [PublishTarget(row.id, row.model_name, row.priority) for row in session.execute(query)]


def open_job_store(settings: Any) -> JobStore:
    """A JobStore for `settings.database_url`; an SQLite database is created/upgraded on first use.

    PostgreSQL is migrated explicitly (`diffgentor db upgrade`): several hosts share it.
    """
    from worker.db import make_engine, session_factory, upgrade

    if settings.database_url.startswith("sqlite"):
        upgrade(settings.database_url)
    return JobStore(session_factory(make_engine(settings.database_url)), max_attempts=settings.max_attempts)
