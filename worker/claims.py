"""The worker side of a job row: claim with a lease, renew it, and fenced writes.

Every statement here is a single conditional UPDATE, so two workers racing for the same
job (a redelivered message, a sweeper re-publish) can never both own it: the database
decides, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import functools
import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from schemas.enums import ErrorClass, JobStatus
from schemas.tables import Artifact, Job, UtcDateTime, utcnow
from schemas.views import ArtifactView

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql, sqlite

POISON_ERROR_TYPE = "AttemptsExhausted"


@dataclass(frozen=True)
class ClaimedJob:
    """What a worker needs to run a job it now owns."""

    id: str
    kind: str
    model_name: str
    spec: dict[str, Any]
    seed: int
    attempts: int
    max_attempts: int
    requeues: int  # hand-backs after infrastructure faults so far (not counted against max_attempts)
    worker_id: str
    lease_expires_at: datetime
    batch_id: str | None = None  # [issue 11] for the batch's event channel


@dataclass(frozen=True)
class ClaimRefusal:
    """Why a delivery was dropped: the job is finished, owned elsewhere, or gone."""

    job_id: str
    status: str | None  # None: no such job
    reason: str
    ended_now: bool = False  # [issue 11] this claim itself ended the job (cancelled, or failed as poison)


@dataclass(frozen=True)
class LeaseState:
    owned: bool  # False: the lease was lost (another worker took over, or the job ended)
    cancel_requested: bool


Executor = Session | sa.Connection


def rowcount(result: sa.Result[Any]) -> int:
    """The rows an UPDATE or DELETE (without RETURNING) matched.

    ``Session.execute`` is typed as returning a plain ``Result``; for such a DML statement it is
    always a ``CursorResult`` (which has ``rowcount``), on a Connection as on a Session.
    """
    if not isinstance(result, sa.CursorResult):
        raise TypeError(f"no rowcount on a {type(result).__name__}: not the result of an UPDATE or DELETE")
    return result.rowcount


class _DbNowPlus(FunctionElement[datetime]):
    """The database server's clock plus some seconds: see :func:`db_now_plus`."""

    type = UtcDateTime()
    name = "db_now_plus"
    inherit_cache = True


def _seconds(seconds: float) -> str:
    return f"{float(seconds):+.6f}"


def db_now_plus(seconds: float = 0.0) -> _DbNowPlus:
    """SQL for "the database's now + ``seconds``", comparable with and storable in a UtcDateTime column.

    Leases are set and judged with this, never with the worker host's clock: a host whose clock
    runs ahead would otherwise take over live leases, one whose clock lags would hold expired
    ones. PostgreSQL: ``statement_timestamp()`` (one value per statement, also inside a longer
    transaction) plus an interval. SQLite (in-process, so the same clock as the host): ``'now'``
    formatted like SQLAlchemy's stored text (``YYYY-MM-DD HH:MM:SS.ffffff``, UTC, no offset),
    so that the text comparison SQLite does orders it correctly against stored values.
    """
    return _DbNowPlus(sa.literal(_seconds(seconds), sa.String()))


@compiles(_DbNowPlus, "postgresql")
def _db_now_plus_postgresql(element: _DbNowPlus, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"(statement_timestamp() + make_interval(secs => CAST({seconds} AS DOUBLE PRECISION)))"


@compiles(_DbNowPlus, "sqlite")
def _db_now_plus_sqlite(element: _DbNowPlus, compiler: SQLCompiler, **kw: Any) -> str:
    seconds = compiler.process(element.clauses, **kw)
    return f"(strftime('%Y-%m-%d %H:%M:%f', 'now', {seconds} || ' seconds') || '000')"


@compiles(_DbNowPlus)
def _db_now_plus_other(element: _DbNowPlus, compiler: SQLCompiler, **kw: Any) -> str:  # pragma: no cover
    raise sa.exc.CompileError(f"db_now_plus: unsupported database dialect {compiler.dialect.name!r}")


def relaxed(statement: Any, executor: Executor) -> Any:
    """PostgreSQL: make this statement's transaction commit without waiting for the WAL flush.

    `set_config(..., true)` is SET LOCAL inside the statement itself, so a single-statement
    (autocommit) write needs no BEGIN/SET/COMMIT round trips: the uncorrelated subquery runs
    once, before any row (a one-time filter), and the setting holds until the commit that
    ends the statement. Only for writes whose loss in a database crash is harmless (progress,
    lease renewal, `published_at`); never for the insert, the claim or the completion of a
    job. A later durable commit flushes them too.
    """
    dialect = executor.get_bind().dialect.name if isinstance(executor, Session) else executor.dialect.name
    if dialect != "postgresql":
        return statement
    flag = sa.select(sa.func.set_config("synchronous_commit", "off", True)).scalar_subquery()
    return statement.where(flag == "off")


def _owned_by(job_id: str, worker_id: str) -> sa.ColumnElement[bool]:
    return sa.and_(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.RUNNING.value)


def cancel_now(rows: sa.ColumnElement[bool]) -> sa.Update:
    """Cancel at once the selected jobs that no worker runs: queued ones, and running ones whose
    lease expired (their worker is gone). Running jobs with a live lease are `request_stop`'s."""
    return (
        sa.update(Job)
        .where(
            rows,
            sa.or_(
                Job.status == JobStatus.QUEUED.value,
                sa.and_(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < db_now_plus()),
            ),
        )
        .values(
            status=JobStatus.CANCELLED.value,
            cancel_requested=True,
            finished_at=utcnow(),
            lease_expires_at=None,
        )
        .execution_options(synchronize_session=False)
    )


def request_stop(rows: sa.ColumnElement[bool]) -> sa.Update:
    """Ask the running ones of the selected jobs to stop at their next step (cooperative cancel)."""
    return (
        sa.update(Job)
        .where(rows, Job.status == JobStatus.RUNNING.value, Job.cancel_requested == sa.false())
        .values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    )


@functools.cache
def _claim_statement() -> sa.Update:
    """[issue 13] The claim's UPDATE, built once with bind parameters (job_id, worker_id, now,
    lease): building this expression for every claim cost more than the round trip."""
    job_id = sa.bindparam("job_id", type_=sa.String())
    worker_id = sa.bindparam("worker_id", type_=sa.String())
    now = sa.bindparam("now", type_=UtcDateTime())
    lease_seconds = sa.bindparam("lease", type_=sa.String())
    mine = sa.and_(Job.status == JobStatus.RUNNING.value, Job.worker_id == worker_id)
    exhausted = sa.and_(Job.attempts - Job.requeues >= Job.max_attempts, sa.not_(mine))
    stop = sa.or_(Job.cancel_requested.is_(True), exhausted)
    new_status = sa.case(
        (Job.cancel_requested.is_(True), JobStatus.CANCELLED.value),
        (exhausted, JobStatus.FAILED.value),
        else_=JobStatus.RUNNING.value,
    )
    return (
        sa.update(Job)
        .where(
            Job.id == job_id,
            sa.or_(
                Job.status == JobStatus.QUEUED.value,
                sa.and_(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < db_now_plus(0)),
                mine,
            ),
        )
        .values(
            status=new_status,
            attempts=sa.case((stop, Job.attempts), (mine, Job.attempts), else_=Job.attempts + 1),
            worker_id=sa.case((stop, Job.worker_id), else_=worker_id),
            lease_expires_at=sa.case((stop, None), else_=_DbNowPlus(lease_seconds)),
            available_at=None,
            started_at=sa.case((stop, Job.started_at), else_=now),
            finished_at=sa.case((stop, now), else_=None),
            progress_step=sa.case((stop, Job.progress_step), else_=0),
            error_type=sa.case(
                (Job.cancel_requested.is_(True), None), (exhausted, POISON_ERROR_TYPE), else_=None
            ),
            error_message=sa.case(
                (Job.cancel_requested.is_(True), None),
                (
                    exhausted,
                    sa.literal("gave up after ")
                    + sa.cast(Job.attempts - Job.requeues, sa.String)
                    + sa.literal(
                        " attempts: each run ended without completing (worker killed or lease lost)"
                    ),
                ),
                else_=None,
            ),
            error_class=sa.case((exhausted, ErrorClass.PERMANENT.value), else_=None),
        )
        .returning(
            Job.id,
            Job.status,
            Job.kind,
            Job.model_name,
            Job.spec,
            Job.seed,
            Job.attempts,
            Job.max_attempts,
            Job.requeues,
            Job.worker_id,
            Job.lease_expires_at,
            Job.batch_id,  # [issue 11]
        )
        .execution_options(synchronize_session=False)
    )


def claim(session: Executor, job_id: str, worker_id: str, lease_seconds: float) -> ClaimedJob | ClaimRefusal:
    """Take a queued job, or a running one whose lease expired, in ONE conditional UPDATE.

    The same statement ends the job instead when it must not run again: `cancelled` if a
    cancel was requested before the lease expired, `failed` (poison) when the attempts cap
    is reached; the caller drops the delivery in both cases.

    Attempts count claims; hand-backs after an infrastructure fault (`requeue`) are subtracted,
    so only runs that ended without a word (a killed worker) count towards the cap. The claim
    number itself keeps growing, which keeps each run's artifact key unique.

    A job already running under this same worker id is granted again, without counting an
    attempt or hitting the cap: the claim of the same delivery retried after its commit reply
    was lost, or the delivery requeued after a database error. A worker id is unique per
    process and a process runs one job at a time, so no run of it is still going.
    """
    # started_at / finished_at from this host's clock; the lease is judged and set on the database's.
    params = {"job_id": job_id, "worker_id": worker_id, "now": utcnow(), "lease": _seconds(lease_seconds)}
    row = session.execute(_claim_statement(), params).one_or_none()
    if row is None:
        current = session.execute(sa.select(Job.status).where(Job.id == job_id)).scalar_one_or_none()
        reason = (
            "no such job" if current is None else f"job is {current} (finished, cancelled or owned elsewhere)"
        )
        return ClaimRefusal(job_id, current, reason)
    if row.status != JobStatus.RUNNING.value:
        return ClaimRefusal(job_id, row.status, f"job ended {row.status} at claim time", ended_now=True)
    return ClaimedJob(
        id=row.id,
        kind=row.kind,
        model_name=row.model_name,
        spec=row.spec,
        seed=row.seed if row.seed is not None else secrets.randbelow(2**32),
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        requeues=row.requeues,
        worker_id=row.worker_id,
        lease_expires_at=row.lease_expires_at,
        batch_id=row.batch_id,
    )


def renew_lease(session: Executor, job_id: str, worker_id: str, lease_seconds: float) -> LeaseState:
    # Relaxed: a renewal lost in a database crash leaves the previous expiry, still at least
    # lease - heartbeat seconds away, and the next beat writes it again.
    expires = db_now_plus(lease_seconds)
    statement = relaxed(
        sa.update(Job)
        .where(_owned_by(job_id, worker_id))
        .values(lease_expires_at=expires)
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False),
        session,
    )
    cancel = session.execute(statement).scalar_one_or_none()
    return LeaseState(owned=cancel is not None, cancel_requested=bool(cancel))


def record_progress(session: Executor, job_id: str, worker_id: str, step: int, total: int) -> LeaseState:
    statement = relaxed(  # a lost progress value is overwritten by the next one or the finish
        sa.update(Job)
        .where(_owned_by(job_id, worker_id))
        .values(progress_step=step, progress_total=total)
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False),
        session,
    )
    cancel = session.execute(statement).scalar_one_or_none()
    return LeaseState(owned=cancel is not None, cancel_requested=bool(cancel))


def finish(session: Session, job_id: str, worker_id: str, status: JobStatus, **values: Any) -> bool:
    """Move an owned running job to a terminal state; False if this worker no longer owns it."""
    statement = (
        sa.update(Job)
        .where(_owned_by(job_id, worker_id))
        .values(status=status.value, finished_at=utcnow(), lease_expires_at=None, **values)
        .execution_options(synchronize_session=False)
    )
    return rowcount(session.execute(statement)) == 1


def requeue(
    session: Executor,
    job_id: str,
    worker_id: str,
    *,
    available_at: datetime,
    error_type: str,
    error_message: str,
) -> bool:
    """Hand an owned running job back to the queue after an infrastructure fault.

    Fenced like a finish. The job becomes `queued` and unpublished with `available_at` set,
    so the sweeper publishes it again once that time has passed; `requeues` goes up (the claim
    does not count it as an attempt). The fault is kept in the error columns meanwhile, so a
    user sees why the job waits; the next claim clears them.
    """
    statement = (
        sa.update(Job)
        .where(_owned_by(job_id, worker_id))
        .values(
            status=JobStatus.QUEUED.value,
            worker_id=None,
            lease_expires_at=None,
            published_at=None,
            available_at=available_at,
            requeues=Job.requeues + 1,
            progress_step=0,
            error_type=error_type,
            error_message=error_message,
        )
        .execution_options(synchronize_session=False)
    )
    return rowcount(session.execute(statement)) == 1


def release_expired(session: Executor, job_ids: list[str], now: datetime) -> list[str]:
    """Turn running jobs whose lease expired back into `queued`, once per expiry.

    Their worker is gone or cut off: every later write of it is fenced out (status is no
    longer `running`). The caller publishes the returned jobs once; the job then waits as a
    published queued job, instead of being re-published every grace period while it still
    shows `running`.

    Expiry is judged on the database's clock, like the claim (a sweeper whose clock runs ahead
    cannot release a live lease); ``now`` (the caller's clock) becomes ``available_at``.
    """
    if not job_ids:
        return []
    statement = (
        sa.update(Job)
        .where(
            Job.id.in_(job_ids), Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < db_now_plus(0)
        )
        .values(
            status=JobStatus.QUEUED.value,
            worker_id=None,
            lease_expires_at=None,
            published_at=None,
            available_at=now,
            progress_step=0,
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    return list(session.execute(statement).scalars())


def fail_killed_process_job(
    session: Session, job_id: str, worker_id_prefix: str, *, error_type: str, error_message: str
) -> bool:
    """End a running job whose process was killed (hard time limit) from the supervising process.

    The parent does not know the child's full worker id, only its `host:pid:` prefix, so the
    write is fenced on that prefix: a job another process took over meanwhile is not touched.
    """
    statement = (
        sa.update(Job)
        .where(
            Job.id == job_id,
            Job.status == JobStatus.RUNNING.value,
            Job.worker_id.startswith(worker_id_prefix, autoescape=True),
        )
        .values(
            status=JobStatus.FAILED.value,
            finished_at=utcnow(),
            lease_expires_at=None,
            error_type=error_type,
            error_message=error_message,
        )
        .execution_options(synchronize_session=False)
    )
    return rowcount(session.execute(statement)) == 1


# [issue 13] PostgreSQL: the fenced completion and its artifact rows in ONE statement (one round trip,
# atomic in autocommit; no BEGIN and COMMIT). The INSERT reads the UPDATE's row, so it writes
# nothing unless this worker still owned the job; data-modifying CTEs run once whether or not the
# outer query reads them. The same columns as `finish(..., SUCCEEDED)` + `upsert_artifacts`.
_SUCCEEDED_PG = sa.text(
    """
WITH done AS (
    UPDATE jobs SET status = 'succeeded', finished_at = :now, lease_expires_at = NULL,
        seed = :seed, width = :width, height = :height, provenance = CAST(:provenance AS json),
        error_type = NULL, error_message = NULL, progress_step = progress_total
    WHERE id = :job_id AND worker_id = :worker_id AND status = 'running'
    RETURNING id
), stored AS (
    INSERT INTO artifacts (job_id, "index", uri, width, height, bytes, sha256, created_at, thumbnail_uri)
    SELECT done.id, a."index", a.uri, a.width, a.height, a.bytes, a.sha256, :now, a.thumbnail_uri
    FROM done CROSS JOIN json_to_recordset(CAST(:artifacts AS json)) AS a(
        "index" integer, uri text, width integer, height integer, bytes bigint, sha256 text,
        thumbnail_uri text)
    ON CONFLICT (job_id, "index") DO UPDATE SET uri = excluded.uri, width = excluded.width,
        height = excluded.height, bytes = excluded.bytes, sha256 = excluded.sha256,
        created_at = excluded.created_at, thumbnail_uri = excluded.thumbnail_uri
    RETURNING 1
)
SELECT count(*) FROM done
"""
).bindparams(sa.bindparam("now", type_=UtcDateTime()))


def finish_succeeded_in_one(
    conn: sa.Connection,
    job_id: str,
    worker_id: str,
    *,
    artifacts: list[ArtifactView],
    seed: int,
    width: int,
    height: int,
    provenance: dict[str, Any] | None,
) -> bool:
    """PostgreSQL: complete an owned running job with its artifact rows in one statement; False if
    this worker no longer owns it (nothing written)."""
    params = {
        "job_id": job_id,
        "worker_id": worker_id,
        "now": utcnow(),
        "seed": seed,
        "width": width,
        "height": height,
        "provenance": json.dumps(provenance),  # as the JSON column stores None: JSON null
        "artifacts": json.dumps([a.model_dump() for a in artifacts]),
    }
    return conn.execute(_SUCCEEDED_PG, params).scalar_one() == 1


def upsert_artifacts(session: Session, job_id: str, artifacts: list[ArtifactView]) -> None:
    """Insert or overwrite artifact rows on (job, index): a re-run never adds a second set."""
    if not artifacts:
        return
    dialect = session.get_bind().dialect.name
    statement: postgresql.Insert | sqlite.Insert
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        statement = postgresql_insert(Artifact)
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        statement = sqlite_insert(Artifact)
    else:  # pragma: no cover - only the two supported databases
        raise RuntimeError(f"unsupported database dialect {dialect!r}")
    now = utcnow()
    rows = [
        {
            "job_id": job_id,
            "index": a.index,
            "uri": a.uri,
            "width": a.width,
            "height": a.height,
            "bytes": a.bytes,
            "sha256": a.sha256,
            "created_at": now,
            "thumbnail_uri": a.thumbnail_uri,  # [issue 12] worker/thumbnails.py
        }
        for a in artifacts
    ]
    statement = statement.values(rows)
    excluded = statement.excluded
    statement = statement.on_conflict_do_update(
        index_elements=[Artifact.job_id, Artifact.index],
        set_={
            name: excluded[name]
            for name in ("uri", "width", "height", "bytes", "sha256", "created_at", "thumbnail_uri")
        },
    )
    session.execute(statement)
