"""All job-table operations, each in its own short transaction.

Producer side: submit (idempotent), publish bookkeeping, get/list, cancel, retry.
Worker side: claim/lease/progress/fenced finish, delegated to `worker.claims`.
Sweeper side: `sweep_candidates`, `release_expired`, `requeue_published_queued`.
"""

from __future__ import annotations

import builtins
import itertools
import json
import logging
import secrets
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from schemas.enums import ErrorClass, JobStatus
from schemas.specs import MAX_PRIORITY, EditSpec, T2ISpec, parse_job_spec
from schemas.tables import Artifact, Batch, Job, PendingPublish, utcnow
from schemas.views import ArtifactView, JobView
from worker import claims
from worker.claims import ClaimedJob, ClaimRefusal, LeaseState
from worker.confirmations import PublishConfirmations
from worker.db import Database, sqlite_locked
from worker.events import LOCAL_HUB, EventSink, JobEvent
from worker.grouping import GroupWriter

if TYPE_CHECKING:
    from worker.batches import NewBatch

log = logging.getLogger(__name__)

MAX_LIST_LIMIT = 1000
SEED_RANGE = 2**32
_T = TypeVar("_T")
# Job.__table__ is typed as a FromClause (declarative allows other selectables); it is this Table.
_JOBS_TABLE = Job.metadata.tables[Job.__tablename__]
_BATCHES_TABLE = Batch.metadata.tables[Batch.__tablename__]
_PENDING_TABLE = PendingPublish.metadata.tables[PendingPublish.__tablename__]

# The columns a JobView is built from, and its artifacts', for the Core read path.
_VIEW_JOB_COLUMNS = [Job.__table__.c[name] for name in JobView.model_fields if name != "artifacts"]
_VIEW_ARTIFACT_FIELDS = list(ArtifactView.model_fields)
_VIEW_ARTIFACT_COLUMNS = [
    Artifact.__table__.c[name].label(f"artifact_{name}") for name in _VIEW_ARTIFACT_FIELDS
]


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


def _views_query(by_id: sa.ColumnElement[bool]) -> sa.Select[Any]:
    """Jobs and their artifacts in ONE statement (LEFT JOIN, one row per artifact)."""
    jobs, artifacts = Job.__table__, Artifact.__table__
    return (
        sa.select(*_VIEW_JOB_COLUMNS, *_VIEW_ARTIFACT_COLUMNS)
        .select_from(jobs.outerjoin(artifacts, artifacts.c.job_id == jobs.c.id))
        .where(by_id)
        .order_by(jobs.c.id, artifacts.c.index)
    )


# Built once with bind parameters: building the statement per poll cost more than running it.
_VIEW_ONE = _views_query(Job.__table__.c.id == sa.bindparam("job_id"))
_VIEW_MANY = _views_query(Job.__table__.c.id.in_(sa.bindparam("job_ids", expanding=True)))


def _views_from_rows(rows: Iterable[sa.Row[Any]]) -> dict[str, JobView]:
    """Group the joined rows by job; same JobView as `JobView.model_validate(orm_job)`."""
    grouped: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    for row in rows:
        data = row._mapping
        entry = grouped.get(data["id"])
        if entry is None:
            entry = grouped[data["id"]] = (
                {column.name: data[column.name] for column in _VIEW_JOB_COLUMNS},
                [],
            )
        if data["artifact_index"] is not None:
            entry[1].append({name: data[f"artifact_{name}"] for name in _VIEW_ARTIFACT_FIELDS})
    return {
        job_id: JobView.model_validate({**job, "artifacts": arts}) for job_id, (job, arts) in grouped.items()
    }


_MARK_PUBLISHED = (
    sa.update(Job)
    .where(
        Job.id.in_(sa.bindparam("job_ids", expanding=True)),
        Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
    )
    .values(published_at=sa.bindparam("now"))
)
# [issue 13] PostgreSQL: the ids as ONE array parameter (`= ANY`), not 1000 expanded placeholders
# that SQLAlchemy renders and the server parses on every bulk submit.
_MARK_PUBLISHED_PG = (
    sa.update(Job)
    .where(
        Job.id == sa.any_(sa.bindparam("job_ids", type_=postgresql.ARRAY(sa.String))),
        Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value]),
    )
    .values(published_at=sa.bindparam("now"))
)
# [issue 13] Drop pending-publish rows (the publish went through, or is recorded as failed).
_CONFIRM = _PENDING_TABLE.delete().where(_PENDING_TABLE.c.job_id.in_(sa.bindparam("job_ids", expanding=True)))
_CONFIRM_PG = _PENDING_TABLE.delete().where(
    _PENDING_TABLE.c.job_id == sa.any_(sa.bindparam("job_ids", type_=postgresql.ARRAY(sa.String)))
)
_UNMARK_PUBLISHED = (
    sa.update(Job)
    .where(Job.id.in_(sa.bindparam("job_ids", expanding=True)), Job.status == JobStatus.QUEUED.value)
    .values(published_at=None)
)


_RELAXED_BY_DIALECT: dict[tuple[str, str], Any] = {}


def _relaxed(conn: sa.Connection, name: str, postgresql_statement: Any, statement: Any) -> Any:
    """The statement for this connection's dialect, relaxed (`claims.relaxed`), built once per
    dialect: constructing it per single submit cost more than running it."""
    key = (name, conn.dialect.name)
    if key not in _RELAXED_BY_DIALECT:
        chosen = postgresql_statement if conn.dialect.name == "postgresql" else statement
        _RELAXED_BY_DIALECT[key] = claims.relaxed(chosen, conn)
    return _RELAXED_BY_DIALECT[key]


def _mark_published_statement(conn: sa.Connection) -> Any:
    return _relaxed(conn, "mark_published", _MARK_PUBLISHED_PG, _MARK_PUBLISHED)


def _confirm_statement(conn: sa.Connection) -> Any:
    return _relaxed(conn, "confirm", _CONFIRM_PG, _CONFIRM)


# [issue 13] Bulk submits on PostgreSQL: COPY FROM STDIN (psycopg) in the submit's transaction
# instead of one INSERT per row (executemany); from this many rows on.
COPY_MIN_ROWS = 50


def _copy_rows(
    session: Session,
    table: sa.Table,
    rows: Iterable[dict[str, Any]],
    *,
    meanwhile: Callable[[list[dict[str, Any]]], None] | None = None,
) -> tuple[bool, list[dict[str, Any]]]:
    """COPY the new rows in the session's transaction (as durable as the INSERT: same commit);
    returns (copied, the rows as a list). Not copied (nothing written) where COPY does not apply:
    not psycopg 3, or a column with a Python-side default that the rows leave out (Core's INSERT
    would fill it, COPY would not); the caller inserts the list instead.

    [issue 13] ``rows`` may be a generator: each row goes to the server as it is made (psycopg
    sends the data in chunks), so the server stores the first rows while this process makes the
    next ones; ``meanwhile(rows)`` runs after the last row is sent and before the COPY is waited for.
    The server's side of a COPY of 1,000 job rows (about 28 ms, every index of the table) then
    overlaps this process's work instead of following it (bench/results/submit.md)."""
    iterator = iter(rows)
    first = next(iterator, None)
    if first is None:
        return True, []
    driver = session.connection().connection.driver_connection
    if (
        driver is None
        or type(driver).__module__.split(".")[0] != "psycopg"
        or any(c.name not in first and c.default is not None for c in table.columns)
    ):
        return False, [first, *iterator]
    names = list(first)
    preparer = session.get_bind().dialect.identifier_preparer
    sql = (
        f"COPY {preparer.format_table(table)} "
        f"({', '.join(preparer.quote(name) for name in names)}) FROM STDIN"
    )
    json_at = [i for i, name in enumerate(names) if isinstance(table.c[name].type, sa.JSON)]
    written: list[dict[str, Any]] = []
    with driver.cursor() as cursor, cursor.copy(sql) as copy:
        for row in itertools.chain((first,), iterator):
            written.append(row)
            values = list(row.values())
            for i in json_at:
                if values[i] is not None:
                    values[i] = json.dumps(values[i])
            copy.write_row(values)
        if meanwhile is not None:
            meanwhile(written)
    return True, written


def _insert(session: Session, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """Rows into ``table`` in the session's transaction: COPY on PostgreSQL from COPY_MIN_ROWS
    rows on, else Core's executemany (batched multi-row INSERTs)."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if len(rows) >= COPY_MIN_ROWS and dialect == "postgresql":
        copied, rows = _copy_rows(session, table, rows)
        if copied:
            return
    session.execute(table.insert(), rows)


def _insert_batch(session: Session, batch: NewBatch, batch_id: str, models: list[str]) -> None:
    """The batch record, before its jobs (their foreign key), in the same transaction: both or neither."""
    from worker.batches import batch_values

    session.execute(_BATCHES_TABLE.insert(), [batch_values(batch, batch_id, models, len(models))])


def _pending_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """[issue 13] The pending-publish rows of new job rows written with `published_at` (the
    producer publishes them right after the commit; schemas.tables.PendingPublish)."""
    return [{"job_id": r["id"], "created_at": r["created_at"]} for r in rows if r["published_at"] is not None]


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# [issue 13] PostgreSQL, the single submits of `GroupWriter`: the new rows and their pending-publish
# rows in ONE statement (one round trip, atomic in autocommit), from one JSON parameter whatever
# the group's size, so the statement text is the same every time (prepared once by the server).
_PG_INSERT_WITH_PENDING: dict[tuple[str, ...], sa.TextClause] = {}


def _pg_insert_with_pending(names: tuple[str, ...]) -> sa.TextClause:
    statement = _PG_INSERT_WITH_PENDING.get(names)
    if statement is None:
        columns = ", ".join(f'"{name}"' for name in names)
        statement = _PG_INSERT_WITH_PENDING[names] = sa.text(
            f"WITH new_jobs AS (INSERT INTO jobs ({columns}) SELECT {columns} "
            "FROM json_populate_recordset(NULL::jobs, CAST(:rows AS json)) "
            "RETURNING id, created_at, published_at) "
            "INSERT INTO pending_publishes (job_id, created_at) "
            "SELECT id, created_at FROM new_jobs WHERE published_at IS NOT NULL"
        )
    return statement


def _ids_and_seeds(count: int) -> tuple[list[str], list[int]]:
    """[issue 13] Fresh uuid4 ids and seeds for `count` new rows from ONE read of the OS's entropy
    (`secrets`/`uuid4` read it once per value, a syscall each)."""
    entropy = secrets.token_bytes(20 * count)
    ids = [str(uuid.UUID(bytes=entropy[20 * i : 20 * i + 16], version=4)) for i in range(count)]
    seeds = [int.from_bytes(entropy[20 * i + 16 : 20 * i + 20], "big") % SEED_RANGE for i in range(count)]
    return ids, seeds


def new_job_values(
    spec: T2ISpec | EditSpec,
    max_attempts: int,
    retry_of: str | None = None,
    seed: int | None = None,
    *,
    batch_id: str | None = None,
    batch_index: int | None = None,
    job_id: str | None = None,
    now: datetime | None = None,
    publishing: bool = False,
) -> dict[str, Any]:
    """Every column of a new queued row (also what its JobView is built from, without a read back).

    ``seed``: used when the spec has none (default: drawn now); ``job_id``: default a new uuid4;
    ``now``: `created_at` (default: the clock now; one reading per bulk call, the clock is a
    syscall on some VMs); ``publishing``: the caller publishes the job right after the commit, so
    the row carries `published_at` (= `created_at`) and gets a pending-publish row (`_pending_rows`).
    """
    params = spec.params
    created_at = now or utcnow()
    return {
        "id": job_id or str(uuid.uuid4()),
        "kind": spec.kind,
        "model_name": spec.model_name,
        "status": JobStatus.QUEUED.value,
        "spec": spec.model_dump(mode="json"),
        # Drawn now, not at run time, so a redelivered or re-run job reproduces the same image.
        "seed": params.seed
        if params.seed is not None
        else (seed if seed is not None else secrets.randbelow(SEED_RANGE)),
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
        "error_class": None,
        "requeues": 0,
        "available_at": None,
        "created_at": created_at,
        "published_at": created_at if publishing else None,
        "started_at": None,
        "finished_at": None,
        "retry_of": retry_of,
        "provenance": None,
        "width": params.width,
        "height": params.height,
        "batch_id": batch_id,
        "batch_index": batch_index,
        "superseded": False,
    }


def new_job_view(values: dict[str, Any]) -> JobView:
    """The view of a row `new_job_values` made (no read back). Validation, not `model_construct`:
    pydantic-core validates these 7 us a row, the pure-Python construct took 18 us."""
    return JobView.model_validate(values)


def _new_row(spec: T2ISpec | EditSpec, max_attempts: int, **values: Any) -> Job:
    return Job(**new_job_values(spec, max_attempts, **values))


class IdempotencyConflict(ValueError):
    """An idempotency key already names a job whose spec differs from the one submitted now."""

    def __init__(self, key: str, differences: list[str]) -> None:
        shown = ", ".join(differences[:5])
        super().__init__(
            f"idempotency key {key!r} is already used by a job with a different spec ({shown} differ); "
            "use a new key for a new request"
        )
        self.key = key


# Scheduling, not part of the request: resubmitting with another priority finds the same job.
# [issue 11] Nor is where its webhook goes: the job found keeps its own.
_NOT_THE_REQUEST = frozenset({"priority", "webhook_url", "webhook_events"})


def _check_same_request(key: str, stored_spec: dict[str, Any], spec: T2ISpec | EditSpec) -> None:
    """Raise `IdempotencyConflict` unless the stored job was submitted with the same request.
    The stored spec is parsed again first, so a field added since (with its default) is no difference."""
    stored = _flat(parse_job_spec(stored_spec).model_dump(mode="json"))
    submitted = _flat(spec.model_dump(mode="json"))
    differences = sorted(
        name
        for name in stored.keys() | submitted.keys()
        if name not in _NOT_THE_REQUEST and stored.get(name) != submitted.get(name)
    )
    if differences:
        raise IdempotencyConflict(key, differences)


def _flat(spec: dict[str, Any]) -> dict[str, Any]:
    flat = {name: value for name, value in spec.items() if name != "params"}
    flat.update({f"params.{name}": value for name, value in (spec.get("params") or {}).items()})
    return flat


class JobStore:
    """The named operations on the job table; how they reach the database is `worker.db.Database`.

    [issue 11] After the commit of each fenced state change it makes, it emits a `JobEvent` to
    ``events`` (default: this process's `worker.events.LOCAL_HUB`; `worker.events.events_for(settings)`
    adds Redis pub/sub): a hint for waiters, never a failure of the operation (docs/events.md).
    """

    def __init__(
        self, sessions: sessionmaker[Session], *, max_attempts: int = 3, events: EventSink | None = None
    ) -> None:
        self._db = Database(sessions)
        self.max_attempts = max_attempts
        self.events: EventSink = LOCAL_HUB if events is None else events
        self._batch_of: dict[str, str | None] = {}  # [issue 11] jobs claimed here -> their batch
        # [issue 13] PostgreSQL: concurrent single submits share one INSERT and one durable commit,
        # concurrent `mark_published` calls one UPDATE (`GroupWriter`); each caller still returns
        # after its own row is committed. Other dialects: one write per call, as before.
        grouped = self._db.dialect == "postgresql"
        self._insert_single: Callable[[dict[str, Any]], None] = (
            GroupWriter(self._insert_rows, alone_on=(sa.exc.IntegrityError, sa.exc.DataError))
            if grouped
            else lambda values: self._insert_rows([values])
        )
        # [issue 13] PostgreSQL: single submits' confirmations are deleted in rounds by a thread.
        self._confirmations = PublishConfirmations(self._confirm_now) if grouped else None

    def close(self) -> None:
        """Delete the pending-publish rows of confirmed single submits still held (a few seconds
        at most; `worker.confirmations`). The store stays usable."""
        if self._confirmations is not None:
            self._confirmations.close()

    def flush_confirmations(self, timeout: float | None = 10.0) -> bool:
        """Wait until the confirmations handed over so far are written (tests, benchmarks)."""
        return self._confirmations is None or self._confirmations.flush(timeout)

    def _emit(self, kind: str, job_id: str, batch_id: str | None = None, **extra: Any) -> None:
        """[issue 11] After a commit: tell waiters (best effort; never raises)."""
        try:
            self.events.emit(JobEvent(kind, job_id, batch_id or self._batch_of.get(job_id), **extra))
        except Exception:  # an event is only a hint; the waiters' fallback reads find the change
            log.debug("could not emit a %s event for job %s", kind, job_id, exc_info=True)

    def _ended(self, kind: str, job_id: str) -> None:
        """[issue 11] A job claimed here ended or went back to the queue: emit, forget its batch."""
        self._emit(kind, job_id)
        self._batch_of.pop(job_id, None)

    # ---- producer side -------------------------------------------------------------------

    @property
    def sessions(self) -> sessionmaker[Session]:
        """Read sessions on this store's engine (for the registry beside it)."""
        return self._db.sessions

    @property
    def database(self) -> Database:
        """How this store reaches its database (for `worker.batches.BatchStore` beside it)."""
        return self._db

    def submit(
        self,
        specs: Iterable[T2ISpec | EditSpec | dict[str, Any]],
        *,
        batch: NewBatch | None = None,
        batch_indexes: Sequence[int] | None = None,
        publishing: bool = False,
    ) -> list[Submitted]:
        """Insert jobs in one transaction, in input order; known idempotency keys return the old job.

        ``batch``: also create a batch record, in the same transaction, holding the jobs created
        now; ``batch_indexes`` are their rows in it (default: the positions in ``specs``; unique
        integers >= 0). A job found by its idempotency key keeps the batch it has. No job created
        (all found): no batch record. Each new job's view carries ``batch_id`` / ``batch_index``.

        ``publishing``: the caller publishes the new jobs right after this returns and then calls
        `confirm_published` (or `unmark_published` if the publish failed): the rows carry
        `published_at` and a pending-publish row each (worker.submission.submit_jobs). Without it
        the rows wait unpublished and the sweeper publishes them after the grace period.
        """
        parsed = [parse_job_spec(spec) for spec in specs]
        indexes = _batch_indexes(len(parsed), batch_indexes) if batch is not None else None
        try:
            return self._submit_once(parsed, batch, indexes, publishing)
        except IntegrityError:
            # A concurrent producer inserted one of our idempotency keys first: look again.
            return self._submit_once(parsed, batch, indexes, publishing)
        except sa.exc.OperationalError as exc:
            # SQLite busy past busy_timeout: nothing was written (the transaction rolled back).
            if not sqlite_locked(exc):
                raise
            log.warning("job database locked during submit; trying once more")
            return self._submit_once(parsed, batch, indexes, publishing)

    def _submit_once(
        self,
        specs: list[T2ISpec | EditSpec],
        batch: NewBatch | None,
        indexes: list[int] | None,
        publishing: bool,
    ) -> list[Submitted]:
        # Bulk path: one IN lookup for all idempotency keys and one multi-row INSERT (Core, not
        # per-object ORM flushes); the views are built from the inserted values, not read back.
        keys = {s.idempotency_key for s in specs if s.idempotency_key}
        if len(specs) == 1 and not keys and batch is None:
            # The common single submit: one INSERT in autocommit (one round trip, still a durable
            # commit). Not retried on a lost connection: a commit whose reply was lost would
            # be inserted twice; the caller sees the error instead.
            values = new_job_values(specs[0], self.max_attempts, publishing=publishing)
            self._insert_single(values)  # returns once this row is committed (group commit)
            return [Submitted(new_job_view(values), True)]
        if not keys and len(specs) >= COPY_MIN_ROWS and self._db.dialect == "postgresql":
            return self._submit_streamed(specs, batch, indexes, publishing)
        if not keys and batch is None and self._db.dialect == "postgresql":
            # [issue 13] A few rows (grouped single submits): one statement with their pending rows.
            now = utcnow()
            ids, seeds = _ids_and_seeds(len(specs))
            few = [
                self._fresh(spec, position, ids, seeds, now, publishing)
                for position, spec in enumerate(specs)
            ]
            self._insert_rows(few)
            return [Submitted(new_job_view(values), True) for values in few]
        with self._db.transaction() as session:  # SQLite: read the keys under the write lock
            existing: dict[str, JobView] = {}
            if keys:
                found = session.scalars(
                    sa.select(Job).where(Job.idempotency_key.in_(keys)).options(selectinload(Job.artifacts))
                )
                existing = {job.idempotency_key: _view(job) for job in found if job.idempotency_key}
            rows: list[dict[str, Any]] = []
            results: list[Submitted] = []
            batch_id = str(uuid.uuid4()) if batch is not None else None
            fresh_ids, seeds = _ids_and_seeds(len(specs))
            now = utcnow()
            for position, spec in enumerate(specs):
                key = spec.idempotency_key
                if key and key in existing:
                    _check_same_request(key, existing[key].spec, spec)
                    results.append(Submitted(existing[key], False))
                    continue
                values = self._fresh(spec, position, fresh_ids, seeds, now, publishing, batch_id, indexes)
                rows.append(values)
                view = new_job_view(values)
                if key:
                    existing[key] = view  # a repeated key inside one call is one job
                results.append(Submitted(view, True))
            if rows and batch is not None and batch_id is not None:
                _insert_batch(session, batch, batch_id, [row["model_name"] for row in rows])
            _insert(session, _JOBS_TABLE, rows)
            _insert(session, _PENDING_TABLE, _pending_rows(rows))  # [issue 13] same commit as the jobs
            return results

    def _fresh(
        self,
        spec: T2ISpec | EditSpec,
        position: int,
        ids: list[str],
        seeds: list[int],
        now: datetime,
        publishing: bool,
        batch_id: str | None = None,
        indexes: list[int] | None = None,
    ) -> dict[str, Any]:
        """The new row of ``specs[position]`` of a bulk call (ids and seeds drawn for the call)."""
        return new_job_values(
            spec,
            self.max_attempts,
            seed=seeds[position],
            batch_id=batch_id,
            batch_index=indexes[position] if indexes is not None else None,
            job_id=ids[position],
            now=now,
            publishing=publishing,
        )

    def _submit_streamed(
        self,
        specs: list[T2ISpec | EditSpec],
        batch: NewBatch | None,
        indexes: list[int] | None,
        publishing: bool,
    ) -> list[Submitted]:
        """[issue 13] A bulk submit without idempotency keys on PostgreSQL: every spec is a new job,
        so each row is made while the COPY streams the earlier ones (`_copy_rows`); the views and
        the pending-publish rows are made while the server finishes the COPY."""
        ids, seeds = _ids_and_seeds(len(specs))
        batch_id = str(uuid.uuid4()) if batch is not None else None
        now = utcnow()

        def rows() -> Iterator[dict[str, Any]]:
            for position, spec in enumerate(specs):
                yield self._fresh(spec, position, ids, seeds, now, publishing, batch_id, indexes)

        results: list[Submitted] = []
        pending: list[dict[str, Any]] = []

        def meanwhile(made: list[dict[str, Any]]) -> None:
            results.extend(Submitted(new_job_view(values), True) for values in made)
            pending.extend(_pending_rows(made))

        with self._db.transaction() as session:
            if batch is not None and batch_id is not None:
                _insert_batch(session, batch, batch_id, [spec.model_name for spec in specs])
            copied, written = _copy_rows(session, _JOBS_TABLE, rows(), meanwhile=meanwhile)
            if not copied:
                session.execute(_JOBS_TABLE.insert(), written)
                meanwhile(written)
            _insert(session, _PENDING_TABLE, pending)
        return results

    def mark_published(self, job_ids: Sequence[str]) -> datetime:
        """Set `published_at` (still queued or running jobs only) and drop their pending-publish
        rows (the sweeper's and the retries' publishes); returns the time written."""
        now = utcnow()
        if not job_ids:
            return now
        # Not durable on purpose: a lost published_at only makes the sweeper publish the job
        # again, and the conditional claim drops the duplicate delivery.
        params = {"job_ids": list(job_ids), "now": now}

        def mark(conn: sa.Connection) -> None:
            conn.execute(_mark_published_statement(conn), params)
            conn.execute(_confirm_statement(conn), params)

        self._db.write_one(mark)
        return now

    def confirm_published(self, job_ids: Sequence[str]) -> None:
        """[issue 13] The broker took these jobs (submitted with ``publishing``): drop their
        pending-publish rows. One DELETE on a small table instead of an UPDATE of every new job
        row; on PostgreSQL handed to `worker.confirmations`, which deletes in rounds, off the
        caller's path (`flush_confirmations` waits for them)."""
        if self._confirmations is not None:
            self._confirmations.add(job_ids)
        elif job_ids:
            self._confirm_now(job_ids)

    def _confirm_now(self, job_ids: Sequence[str]) -> None:
        # Not durable on purpose: a lost delete only makes the sweeper publish the job again.
        params = {"job_ids": list(job_ids)}
        self._db.write_one(lambda conn: conn.execute(_confirm_statement(conn), params))

    def unmark_published(self, job_ids: Sequence[str]) -> None:
        """[issue 13] A publish of jobs submitted with ``publishing`` failed: they read as never
        published (`published_at` NULL), and the sweeper sends them after the grace period.
        Best effort: if the database cannot be reached either, their pending-publish rows make the
        sweeper send them all the same."""
        params = {"job_ids": list(job_ids)}

        def unmark(conn: sa.Connection) -> None:
            conn.execute(_UNMARK_PUBLISHED, params)
            conn.execute(_confirm_statement(conn), params)

        try:
            self._db.transaction(lambda session: unmark(session.connection()))
        except Exception as exc:
            log.warning("could not record the failed publish of %d job(s): %s", len(job_ids), exc)

    def _insert_rows(self, rows: list[dict[str, Any]]) -> None:
        """New rows, with the pending-publish rows of those written with `published_at`, in one
        durable commit (PostgreSQL: one statement in autocommit, one round trip). Not retried on a
        lost connection: a commit whose reply was lost would be inserted twice; the callers see
        the error instead."""
        pending = _pending_rows(rows)
        if not pending:
            self._db.write_once(lambda conn: conn.execute(_JOBS_TABLE.insert(), rows))
        elif self._db.dialect == "postgresql":
            statement = _pg_insert_with_pending(tuple(rows[0]))
            params = {"rows": json.dumps(rows, default=_json_value)}
            self._db.write_once(lambda conn: conn.execute(statement, params))
        else:  # SQLite: write_once is one BEGIN IMMEDIATE transaction there

            def insert(conn: sa.Connection) -> None:
                conn.execute(_JOBS_TABLE.insert(), rows)
                conn.execute(_PENDING_TABLE.insert(), pending)

            self._db.write_once(insert)

    def get(self, job_id: str) -> JobView:
        # The hot polling path: Core, one statement, no ORM identity map, no transaction.
        found = self._db.read(lambda conn: _views_from_rows(conn.execute(_VIEW_ONE, {"job_id": job_id})))
        if job_id not in found:
            raise JobNotFound(job_id)
        return found[job_id]

    def get_many(self, job_ids: Sequence[str]) -> list[JobView]:
        """Jobs in the order asked; raises JobNotFound for the first unknown id."""
        ids = list(job_ids)
        found = (
            self._db.read(lambda conn: _views_from_rows(conn.execute(_VIEW_MANY, {"job_ids": ids})))
            if ids
            else {}
        )
        missing = [job_id for job_id in ids if job_id not in found]
        if missing:
            raise JobNotFound(missing[0])
        return [found[job_id] for job_id in ids]

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
        with self._db.session() as session:
            return [_view(job) for job in session.scalars(query)]

    def cancel(self, job_id: str) -> JobView:
        """Queued, or running with an expired lease (its worker is gone): cancelled at once (a later
        claim or a late write of the old worker fails). Running with a live lease: ask the worker to stop."""
        with self._db.transaction() as session:
            session.execute(claims.cancel_now(Job.id == job_id))
            session.execute(claims.request_stop(Job.id == job_id))
        view = self.get(job_id)
        if view.status == JobStatus.CANCELLED:  # [issue 11] cancelled at once (a running job emits later)
            self._emit(JobStatus.CANCELLED.value, job_id, view.batch_id)
        return view

    def retry(self, job_id: str) -> JobView:
        """A failed or cancelled job becomes a new queued job (same spec and seed) linked to the old one.

        Idempotent: see `retry_or_existing`.
        """
        return self.retry_or_existing(job_id).job

    def retry_or_existing(self, job_id: str) -> Submitted:
        """`retry`, telling whether a new job was made (`created`) or a live one returned.

        If a job of the same retry chain (the retries of the original job, followed to their
        end) is still live (queued, running or succeeded), it is returned instead of a new
        retry: a client that retried, was interrupted and runs again reattaches to that retry.
        """
        with self._db.transaction() as session:  # SQLite: the whole check runs under the write lock
            old = session.get(Job, job_id)
            if old is None:
                raise JobNotFound(job_id)
            if old.status not in (JobStatus.FAILED.value, JobStatus.CANCELLED.value):
                raise InvalidTransition(
                    f"job {job_id} is {old.status}; only failed or cancelled jobs can be retried"
                )
            if old.batch_id is not None:
                # The row's latest job first (the lock `retry_failed` of the batch takes too), so a
                # retry of one job and a retry of its whole batch never both make a job for the row.
                session.execute(
                    sa.select(Job.id).where(_latest_of_row(old.batch_id, old.batch_index)).with_for_update()
                )
            live = _live_retry(session, old)
            if live is not None:
                return Submitted(_view(live), False)
            spec = parse_job_spec({**old.spec, "idempotency_key": None})
            row = _new_row(
                spec,
                self.max_attempts,
                retry_of=old.id,
                seed=old.seed,
                batch_id=old.batch_id,
                batch_index=old.batch_index,
            )
            row.artifacts = []
            if old.batch_id is not None:
                # The retry takes the row's place in its batch: counts and listings follow it.
                session.execute(
                    sa.update(Job)
                    .where(_latest_of_row(old.batch_id, old.batch_index))
                    .values(superseded=True)
                    .execution_options(synchronize_session=False)
                )
            session.add(row)
            session.flush()
            return Submitted(_view(row), True)

    # ---- worker side ---------------------------------------------------------------------

    def claim(self, job_id: str, worker_id: str, lease_seconds: float) -> ClaimedJob | None:
        outcome = self.claim_or_refusal(job_id, worker_id, lease_seconds)
        return outcome if isinstance(outcome, ClaimedJob) else None

    def claim_or_refusal(
        self, job_id: str, worker_id: str, lease_seconds: float
    ) -> ClaimedJob | ClaimRefusal:
        # Durable: the claim is one conditional UPDATE ... RETURNING, atomic in autocommit too.
        outcome = self._db.write_one(lambda conn: claims.claim(conn, job_id, worker_id, lease_seconds))
        if isinstance(outcome, ClaimedJob):  # [issue 11]
            if len(self._batch_of) > 10_000:  # claims that never finished here (lost): forget them
                self._batch_of.clear()
            self._batch_of[job_id] = outcome.batch_id
            self._emit("running", job_id)
        elif outcome.ended_now and outcome.status is not None:
            self._emit(outcome.status, job_id)
        return outcome

    def heartbeat(self, job_id: str, worker_id: str, lease_seconds: float) -> LeaseState:
        return self._db.write_one(lambda conn: claims.renew_lease(conn, job_id, worker_id, lease_seconds))

    def record_progress(self, job_id: str, worker_id: str, step: int, total: int) -> LeaseState:
        state = self._db.write_one(lambda conn: claims.record_progress(conn, job_id, worker_id, step, total))
        if state.owned:  # [issue 11] as often as progress is written (DG_PROGRESS_INTERVAL_SECONDS)
            self._emit("progress", job_id, step=step, total=total)
        return state

    def record_artifacts(self, job_id: str, artifacts: Sequence[ArtifactView]) -> None:
        with self._db.transaction() as session:
            claims.upsert_artifacts(session, job_id, list(artifacts))

    def finish_succeeded(
        self,
        job_id: str,
        worker_id: str,
        *,
        artifacts: Sequence[ArtifactView],
        seed: int,
        width: int,
        height: int,
        provenance: dict[str, Any] | None,
    ) -> bool:
        """Complete and record artifacts in one transaction, only while this worker owns the job.

        Retried once on a dead pooled connection: the fenced UPDATE makes a retry after a
        commit whose reply was lost return False (the job is already succeeded), never a
        second completion.
        """

        def work(session: Session) -> bool:
            done = claims.finish(
                session,
                job_id,
                worker_id,
                JobStatus.SUCCEEDED,
                seed=seed,
                width=width,
                height=height,
                provenance=provenance,
                error_type=None,
                error_message=None,
                progress_step=Job.progress_total,  # the runner skips the last progress write
            )
            if done:
                claims.upsert_artifacts(session, job_id, list(artifacts))  # one multi-row statement
            return done

        if self._db.dialect == "postgresql":  # [issue 13] one statement, one round trip
            done = self._db.write_one(
                lambda conn: claims.finish_succeeded_in_one(
                    conn,
                    job_id,
                    worker_id,
                    artifacts=list(artifacts),
                    seed=seed,
                    width=width,
                    height=height,
                    provenance=provenance,
                )
            )
        else:
            done = self._db.transaction(work)
        if done:
            self._ended(JobStatus.SUCCEEDED.value, job_id)  # [issue 11]
        return done

    def finish_failed(
        self,
        job_id: str,
        worker_id: str,
        *,
        error_type: str,
        error_message: str,
        error_class: ErrorClass = ErrorClass.PERMANENT,
    ) -> bool:
        done = self._db.transaction(
            lambda session: claims.finish(
                session,
                job_id,
                worker_id,
                JobStatus.FAILED,
                error_type=error_type[:255],
                error_message=error_message,
                error_class=error_class.value,
            )
        )
        if done:
            self._ended(JobStatus.FAILED.value, job_id)  # [issue 11]
        return done

    def requeue(
        self, job_id: str, worker_id: str, *, delay_seconds: float, error_type: str, error_message: str
    ) -> bool:
        """Hand an owned job back to the queue after an infrastructure fault (`claims.requeue`)."""
        available_at = utcnow() + timedelta(seconds=delay_seconds)
        handed_back = self._db.transaction(
            lambda session: claims.requeue(
                session,
                job_id,
                worker_id,
                available_at=available_at,
                error_type=error_type[:255],
                error_message=error_message,
            )
        )
        if handed_back:
            self._ended(JobStatus.QUEUED.value, job_id)  # [issue 11]
        return handed_back

    def fail_killed_process_job(
        self, job_id: str, worker_id_prefix: str, *, error_type: str, error_message: str
    ) -> bool:
        with self._db.transaction() as session:
            failed = claims.fail_killed_process_job(
                session, job_id, worker_id_prefix, error_type=error_type[:255], error_message=error_message
            )
        if failed:
            self._emit(JobStatus.FAILED.value, job_id)  # [issue 11]
        return failed

    def finish_cancelled(self, job_id: str, worker_id: str) -> bool:
        done = self._db.transaction(
            lambda session: claims.finish(session, job_id, worker_id, JobStatus.CANCELLED)
        )
        if done:
            self._ended(JobStatus.CANCELLED.value, job_id)  # [issue 11]
        return done

    # ---- sweeper side --------------------------------------------------------------------

    def sweep_candidates(
        self, *, publish_grace_seconds: float, republish_stale_seconds: float | None = None, limit: int = 500
    ) -> SweepCandidates:
        """What the sweeper must publish, oldest first, at most `limit` of each kind:

        - unpublished: queued jobs never published past the grace (the producer died or its
          publish failed: no `published_at`, or a pending-publish row left), or handed back after
          a fault and now due (`available_at` passed);
        - stale: queued jobs published longer ago than `republish_stale_seconds` (their message
          may be gone: acked after an error);
        - expired: running jobs whose lease expired (the worker died or was cut off).

        Three statements, each on its own small index (a partial index for the two queued
        kinds, `(status, lease_expires_at)` for the expired): the cost follows the number of
        jobs found, not the size of the table or of the queued backlog (bench/scale.py).
        """
        now = utcnow()
        horizon = now - timedelta(seconds=publish_grace_seconds)
        unpublished = sa.and_(
            Job.status == JobStatus.QUEUED.value,
            Job.published_at.is_(None),
            sa.or_(sa.and_(Job.available_at.is_(None), Job.created_at < horizon), Job.available_at <= now),
        )
        # Leases are judged on the database's clock, as the claim judges them (docs/jobs.md, "Clocks").
        expired = sa.and_(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < claims.db_now_plus())
        stale_at = (
            None if republish_stale_seconds is None else now - timedelta(seconds=republish_stale_seconds)
        )

        def scan(conn: sa.Connection) -> SweepCandidates:
            # Autocommit on PostgreSQL: four statements, no BEGIN/ROLLBACK round trips.
            never = self._targets(conn, unpublished, Job.created_at, limit)
            # [issue 13] Queued jobs whose pending-publish row outlived the grace (worker.submission).
            left = self._targets(
                conn,
                sa.and_(_PENDING_TABLE.c.created_at < horizon, Job.status == JobStatus.QUEUED.value),
                _PENDING_TABLE.c.created_at,
                limit,
                source=_PENDING_TABLE.join(Job.__table__, Job.id == _PENDING_TABLE.c.job_id),
            )
            seen = {target.job_id for target in never}
            return SweepCandidates(
                unpublished=[*never, *(target for target in left if target.job_id not in seen)],
                stale=[]
                if stale_at is None
                else self._targets(
                    conn,
                    sa.and_(Job.status == JobStatus.QUEUED.value, Job.published_at < stale_at),
                    Job.published_at,
                    limit,
                ),
                expired=self._targets(conn, expired, Job.lease_expires_at, limit),
            )

        return self._db.read(scan)

    @staticmethod
    def _targets(
        conn: sa.Connection,
        where: sa.ColumnElement[bool],
        order: Any,
        limit: int,
        source: sa.FromClause | None = None,
    ) -> builtins.list[PublishTarget]:
        # A job that already ran once (a crash, a fault hand-back) goes ahead of new work.
        urgent = sa.case((Job.attempts > 0, MAX_PRIORITY), else_=Job.priority)
        query = sa.select(Job.id, Job.model_name, urgent).where(where).order_by(order).limit(limit)
        if source is not None:
            query = query.select_from(source)
        return [PublishTarget(job_id, model, priority) for job_id, model, priority in conn.execute(query)]

    def drop_settled_pending(self, *, publish_grace_seconds: float) -> int:
        """[issue 13] Delete pending-publish rows past the grace whose job is gone (pruned) or no
        longer queued (claimed, cancelled): nothing is left to publish for them. Their producer
        died before its confirmation, or the confirmation was lost."""
        horizon = utcnow() - timedelta(seconds=publish_grace_seconds)
        pending = _PENDING_TABLE
        queued = (
            sa.select(Job.id).where(Job.id == pending.c.job_id, Job.status == JobStatus.QUEUED.value).exists()
        )
        statement = pending.delete().where(pending.c.created_at < horizon, ~queued)
        return self._db.write_one(lambda conn: int(claims.rowcount(conn.execute(statement)) or 0))

    def release_expired(self, job_ids: Sequence[str]) -> builtins.list[str]:
        """Expired running jobs back to queued (unpublished, due now); the ids actually released."""
        with self._db.transaction() as session:
            released = claims.release_expired(session, list(job_ids), utcnow())
        for job_id in released:
            self._emit(JobStatus.QUEUED.value, job_id)  # [issue 11]
        return released

    def requeue_published_queued(self) -> int:
        """After the broker lost its data: every queued job published before now is due again.

        Their messages are gone. They become unpublished and due, so the sweep publishes them
        (in pages); a message that did survive only makes a duplicate, which the claim drops.
        """
        now = utcnow()
        with self._db.transaction() as session:
            result = session.execute(
                sa.update(Job)
                .where(
                    Job.status == JobStatus.QUEUED.value,
                    Job.published_at.is_not(None),
                    Job.published_at <= now,
                )
                .values(published_at=None, available_at=now)
                .execution_options(synchronize_session=False)
            )
            return int(claims.rowcount(result) or 0)

    def resolve_prefix(self, prefix: str, limit: int = 10) -> builtins.list[str]:
        """Ids of jobs starting with ``prefix`` (lowercase hex and dashes; at most ``limit``, sorted).

        A range on the primary key (index seek) with the LIKE that defines the match.
        """
        prefix = prefix.lower()
        if not prefix or any(char not in "0123456789abcdef-" for char in prefix):
            return []  # job ids are UUIDs: nothing else can match (and no LIKE wildcard gets in)
        query = (
            sa.select(Job.id).where(Job.id >= prefix, Job.id.like(f"{prefix}%")).order_by(Job.id).limit(limit)
        )
        return self._db.read(lambda conn: [str(job_id) for job_id in conn.scalars(query)])


def _latest_of_row(batch_id: str, batch_index: int | None) -> sa.ColumnElement[bool]:
    """The latest job of one row of a batch (`ix_jobs_batch_rows`)."""
    index_matches = Job.batch_index.is_(None) if batch_index is None else Job.batch_index == batch_index
    return sa.and_(Job.batch_id == batch_id, Job.superseded == sa.false(), index_matches)


MAX_BATCH_INDEX = 2**63 - 1


def _batch_indexes(count: int, given: Sequence[int] | None) -> list[int]:
    if given is None:
        return list(range(count))
    indexes = list(given)
    if len(indexes) != count:
        raise ValueError(f"{len(indexes)} batch indexes given for {count} job specs")
    seen: set[int] = set()
    for index in indexes:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= MAX_BATCH_INDEX:
            raise ValueError(f"batch index {index!r} is not an integer from 0 to {MAX_BATCH_INDEX}")
        if index in seen:
            raise ValueError(f"batch index {index} is given twice")
        seen.add(index)
    return indexes


@dataclass(frozen=True)
class SweepCandidates:
    unpublished: list[PublishTarget]
    stale: list[PublishTarget]
    expired: list[PublishTarget]


def _live_retry(session: Session, job: Job) -> Job | None:
    """The newest job of `job`'s retry chain that is not failed or cancelled, if any.

    Walks up `retry_of` to the original job, then down through every retry of it (chains are
    short). On PostgreSQL the original row is locked, so concurrent retries of one chain
    serialise and make one job; SQLite holds the write lock already (BEGIN IMMEDIATE).
    """
    root = job
    while root.retry_of is not None:
        parent = session.get(Job, root.retry_of)
        if parent is None:
            break
        root = parent
    session.execute(sa.select(Job.id).where(Job.id == root.id).with_for_update())
    family: list[Job] = []
    level = [root.id]
    while level:
        children = list(
            session.scalars(
                sa.select(Job).where(Job.retry_of.in_(level)).options(selectinload(Job.artifacts))
            )
        )
        family.extend(children)
        level = [child.id for child in children]
    live = [j for j in family if j.status not in (JobStatus.FAILED.value, JobStatus.CANCELLED.value)]
    return max(live, key=lambda j: (j.created_at, j.id)) if live else None


def open_job_store(settings: Any) -> JobStore:
    """A JobStore for `settings.database_url`; an SQLite database is created/upgraded on first use.

    PostgreSQL is migrated explicitly (`diffgentor db upgrade`): several hosts share it.
    """
    from worker.db import make_engine, session_factory, upgrade

    if settings.database_url.startswith("sqlite"):
        upgrade(settings.database_url)
    from worker.events import events_for  # [issue 11]

    return JobStore(
        session_factory(make_engine(settings.database_url)),
        max_attempts=settings.max_attempts,
        events=events_for(settings),
    )
