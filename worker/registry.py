"""Workers register themselves in the `workers` table and keep a heartbeat there.

`WorkerRegistry` holds the table operations; `Presence` is what one worker process runs:
a daemon thread that writes the heartbeat, the current job, the jobs done and the time of
the last handled delivery. Job start/finish only change memory and wake the thread, so the
database write is never on a job's critical path (it lands within milliseconds).

A row is one job-running process (`worker_id` = host:pid:random) of a Celery node (`node`,
`name@host`). When Celery replaces a killed prefork child, the new child registers under the
same node and deletes the rows of its node whose process is dead (same host, pid gone) or whose
heartbeat is stale; `diffgentor health` judges nodes, so a dead child whose node runs a newer
one is "replaced", not gone.

Entries of dead workers go stale (no heartbeat) and are deleted after
`DG_WORKER_EXPIRE_SECONDS` (default 900 s) by any live worker, so `diffgentor health`
reports a crashed worker as gone for that long, and then no longer lists it.

Sweepers (`diffgentor sweep --loop`, or the beat sweep of a worker) keep a row too, with
role "sweeper": `record_sweep` after each finished sweep. Every worker query (listing, the
stuck rule, expiry) leaves those rows out; `sweepers()` lists them.

The background loops here (heartbeat, expiry) survive database faults: one log line per
failure and back-off step (`Backoff`), no traceback unless DEBUG logging is on.
"""

from __future__ import annotations

import builtins
import logging
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from schemas.enums import JobStatus
from schemas.tables import Job, WorkerRecord, utcnow
from worker.backoff import Backoff
from worker.claims import relaxed, rowcount
from worker.transient import one_line

log = logging.getLogger(__name__)

EXPIRE_ENV = "DG_WORKER_EXPIRE_SECONDS"
DEFAULT_EXPIRE_SECONDS = 900.0
SKIPPED = "skipped"  # runner outcome of a delivery that did not run the job (duplicate, finished)
WORKER_ROLE = "worker"
SWEEPER_ROLE = "sweeper"
SWEEPER_MODEL = "*"
SWEEPER_QUEUE = "diffgentor.sweep"  # worker.celery_app.SWEEP_QUEUE (not imported: health runs without Celery)
MIN_STALE_SECONDS = 15.0
COALESCE_SECONDS = 0.05  # a job start or end is written this much later, with what follows it
PRUNE_EVERY_BEATS = 60  # the heartbeat thread expires stale rows about every 60 beats


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    hostname: str
    pid: int
    model_name: str
    queue: str
    started_at: datetime
    heartbeat_at: datetime  # sweepers: when the last sweep finished
    current_job_id: str | None
    jobs_done: int
    last_job_at: datetime | None
    node: str | None = None  # the Celery node (`name@host`); None for sweepers and rows of old workers
    role: str = WORKER_ROLE
    sweep_interval_seconds: float | None = None


def _view(row: WorkerRecord) -> WorkerView:
    return WorkerView(
        row.worker_id,
        row.hostname,
        row.pid,
        row.model_name,
        row.queue,
        row.started_at,
        row.heartbeat_at,
        row.current_job_id,
        row.jobs_done,
        row.last_job_at,
        row.node,
        row.role or WORKER_ROLE,
        row.sweep_interval_seconds,
    )


def expire_seconds() -> float:
    raw = os.environ.get(EXPIRE_ENV, "").strip()
    return float(raw) if raw else DEFAULT_EXPIRE_SECONDS


def stale_after(interval_seconds: float) -> float:
    """Silence that counts as dead: 3 missed beats (or sweeps), at least 15 s."""
    return max(MIN_STALE_SECONDS, 3 * interval_seconds)


def default_sweeper_id() -> str:
    """A sweeper id for this process, distinct from its worker id (`host:pid:random`)."""
    return f"sweeper:{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OSError:
        return True  # cannot tell: keep the row
    return True


class WorkerRegistry:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def register(
        self,
        worker_id: str,
        *,
        model_name: str,
        queue: str,
        hostname: str | None = None,
        pid: int | None = None,
        node: str | None = None,
        replace_stale_seconds: float = MIN_STALE_SECONDS,
    ) -> list[str]:
        """(Re)insert this process's row; with `node`, delete the rows of that node it replaces.

        Replaced = another row of the same node (role worker) whose heartbeat is older than
        `replace_stale_seconds`, or that was written on this host by a process that no longer
        exists (a prefork child killed and replaced by Celery a moment ago). A live sibling
        (a node with concurrency > 1) is kept. Returns the ids deleted.
        """
        now = utcnow()
        hostname = hostname or socket.gethostname()
        pid = pid or os.getpid()
        stale_before = now - timedelta(seconds=replace_stale_seconds)
        replaced = self._replaced_rows(worker_id, node, hostname, pid, stale_before)
        with self._sessions.begin() as session:
            # Write first (no SELECT as merge() would do): on SQLite a transaction that reads
            # and then writes fails at once with "database is locked" if another writer won.
            session.execute(sa.delete(WorkerRecord).where(WorkerRecord.worker_id.in_([worker_id, *replaced])))
            session.add(
                WorkerRecord(
                    worker_id=worker_id,
                    node=node,
                    role=WORKER_ROLE,
                    hostname=hostname,
                    pid=pid,
                    model_name=model_name,
                    queue=queue,
                    started_at=now,
                    heartbeat_at=now,
                    current_job_id=None,
                    jobs_done=0,
                    last_job_at=None,
                )
            )
        if replaced:
            log.info("worker %s replaces %s of node %s", worker_id, ", ".join(replaced), node)
        return replaced

    def _replaced_rows(
        self, worker_id: str, node: str | None, hostname: str, pid: int, stale_before: datetime
    ) -> list[str]:
        if not node:
            return []
        query = sa.select(
            WorkerRecord.worker_id, WorkerRecord.hostname, WorkerRecord.pid, WorkerRecord.heartbeat_at
        ).where(
            WorkerRecord.node == node, WorkerRecord.role == WORKER_ROLE, WorkerRecord.worker_id != worker_id
        )
        with self._sessions() as session:  # read in its own transaction (see register)
            rows = session.execute(query).all()
        # Pids can only be checked on the host this process runs on (and a caller may name another).
        local = hostname == socket.gethostname()
        return [
            other
            for other, other_host, other_pid, beat in rows
            if beat < stale_before
            or (local and other_host == hostname and (other_pid == pid or not _pid_alive(other_pid)))
        ]

    def heartbeat(
        self, worker_id: str, *, current_job_id: str | None, jobs_done: int, last_job_at: datetime | None
    ) -> bool:
        """False when the row is gone (expired by another worker): the caller registers again."""
        # A delivery may carry an id with no row (malformed, deleted job): the sub-select turns
        # it into NULL instead of breaking the foreign key.
        job = sa.select(Job.id).where(Job.id == current_job_id).scalar_subquery()
        # A lost heartbeat is rewritten a beat later, so it need not wait for the WAL flush
        # (and does not queue behind the job's own durable commits on the same disk).
        with self._sessions.begin() as session:
            result = session.execute(
                relaxed(
                    sa.update(WorkerRecord)
                    .where(WorkerRecord.worker_id == worker_id)
                    .values(
                        heartbeat_at=utcnow(),
                        current_job_id=job if current_job_id else None,
                        jobs_done=jobs_done,
                        last_job_at=last_job_at,
                    )
                    .execution_options(synchronize_session=False),
                    session,
                )
            )
            return bool(rowcount(result))

    def record_sweep(
        self, sweeper_id: str, *, interval_seconds: float, hostname: str | None = None, pid: int | None = None
    ) -> None:
        """A sweeper finished a sweep now: upsert its row (role "sweeper").

        `heartbeat_at` is the time of the last finished sweep and `sweep_interval_seconds` the
        pause the sweeper keeps between sweeps; `diffgentor health` calls it stalled when no
        sweep finished for `max(3 x interval, 15 s)`. Call `unregister(sweeper_id)` on a clean
        stop. Use an id of its own (`default_sweeper_id()`), never a worker's id. Rows of other
        sweepers silent for longer than DG_WORKER_EXPIRE_SECONDS (and 3 of their intervals)
        are deleted. Raises on database errors (the caller's loop decides how to go on).
        """
        now = utcnow()
        values = {"heartbeat_at": now, "sweep_interval_seconds": float(interval_seconds)}
        expired = self._expired_sweepers(sweeper_id, now)
        with self._sessions.begin() as session:
            if expired:
                session.execute(
                    sa.delete(WorkerRecord).where(
                        WorkerRecord.worker_id.in_(expired), WorkerRecord.role == SWEEPER_ROLE
                    )
                )
            result = session.execute(
                sa.update(WorkerRecord)
                .where(WorkerRecord.worker_id == sweeper_id, WorkerRecord.role == SWEEPER_ROLE)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if not rowcount(result):
                session.add(
                    WorkerRecord(
                        worker_id=sweeper_id,
                        node=None,
                        role=SWEEPER_ROLE,
                        hostname=hostname or socket.gethostname(),
                        pid=pid or os.getpid(),
                        model_name=SWEEPER_MODEL,
                        queue=SWEEPER_QUEUE,
                        started_at=now,
                        current_job_id=None,
                        jobs_done=0,
                        last_job_at=None,
                        **values,
                    )
                )
        if expired:
            log.info("expired %d silent sweeper entries: %s", len(expired), ", ".join(expired))

    def _expired_sweepers(self, sweeper_id: str, now: datetime) -> list[str]:
        horizon = expire_seconds()
        query = sa.select(
            WorkerRecord.worker_id,
            WorkerRecord.heartbeat_at,
            WorkerRecord.sweep_interval_seconds,
        ).where(
            WorkerRecord.role == SWEEPER_ROLE,
            WorkerRecord.worker_id != sweeper_id,
            WorkerRecord.heartbeat_at < now - timedelta(seconds=horizon),
        )
        with self._sessions() as session:
            rows = session.execute(query).all()
        return [
            other
            for other, beat, interval in rows
            if (now - beat).total_seconds() > max(horizon, 3 * (interval or 0))
        ]

    def unregister(self, worker_id: str) -> None:
        """Delete the row of this worker or sweeper (a clean stop)."""
        with self._sessions.begin() as session:
            session.execute(sa.delete(WorkerRecord).where(WorkerRecord.worker_id == worker_id))

    def prune(self, older_than_seconds: float) -> int:
        """Delete worker rows silent for longer than this (sweeper rows are not touched)."""
        horizon = utcnow() - timedelta(seconds=older_than_seconds)
        with self._sessions.begin() as session:
            result = session.execute(
                sa.delete(WorkerRecord).where(
                    WorkerRecord.heartbeat_at < horizon, WorkerRecord.role == WORKER_ROLE
                )
            )
            return rowcount(result)

    def list(
        self,
        *,
        model_name: str | None = None,
        worker_id: str | None = None,
        nodes: Sequence[str] | None = None,
    ) -> list[WorkerView]:
        """Worker rows (never sweepers), by model and start time."""
        query = (
            sa.select(WorkerRecord)
            .where(WorkerRecord.role == WORKER_ROLE)
            .order_by(WorkerRecord.model_name, WorkerRecord.started_at)
        )
        if model_name is not None:
            query = query.where(WorkerRecord.model_name == model_name)
        if worker_id is not None:
            query = query.where(WorkerRecord.worker_id == worker_id)
        if nodes is not None:
            query = query.where(WorkerRecord.node.in_(list(nodes)))
        with self._sessions() as session:
            return [_view(row) for row in session.scalars(query)]

    def sweepers(self, *, sweeper_id: str | None = None) -> builtins.list[WorkerView]:
        """Sweeper rows, by start time (`heartbeat_at` = the last finished sweep)."""
        query = (
            sa.select(WorkerRecord)
            .where(WorkerRecord.role == SWEEPER_ROLE)
            .order_by(WorkerRecord.started_at, WorkerRecord.worker_id)
        )
        if sweeper_id is not None:
            query = query.where(WorkerRecord.worker_id == sweeper_id)
        with self._sessions() as session:
            return [_view(row) for row in session.scalars(query)]

    def oldest_waiting(self, model_names: builtins.list[str]) -> dict[str, datetime]:
        """Per model: the publish time of the oldest job that is queued and was published."""
        if not model_names:
            return {}
        query = (
            sa.select(Job.model_name, sa.func.min(Job.published_at))
            .where(
                Job.status == JobStatus.QUEUED.value,
                Job.published_at.is_not(None),
                Job.model_name.in_(model_names),
            )
            .group_by(Job.model_name)
        )
        with self._sessions() as session:
            return {name: when for name, when in session.execute(query) if when is not None}

    def queue_waits(self, job_ids: builtins.list[str], worker_id: str) -> builtins.list[float]:
        """Seconds from publish (or creation) to start, for those of the jobs this worker claimed."""
        query = sa.select(Job.published_at, Job.created_at, Job.started_at).where(
            Job.id.in_(job_ids), Job.worker_id == worker_id, Job.started_at.is_not(None)
        )
        with self._sessions() as session:
            # started_at IS NOT NULL in the query: the check only narrows the type.
            return [
                (started - (published or created)).total_seconds()
                for published, created, started in session.execute(query)
                if started is not None
            ]


class Presence:
    """The registry entry of this process, kept fresh by a daemon thread.

    The thread never dies of a database fault: a failed beat logs one line (first failure and
    each back-off step, see `Backoff`) and the next beat waits 1x, 2x, then 4x the interval
    until one succeeds; a row expired meanwhile by another worker is registered again.
    """

    def __init__(
        self,
        registry: WorkerRegistry,
        worker_id: str,
        *,
        model_name: str,
        queue: str,
        interval_seconds: float,
        expire_after_seconds: float | None = None,
        node: str | None = None,
    ) -> None:
        self.registry = registry
        self.worker_id = worker_id
        self.model_name = model_name
        self.queue = queue
        self.node = node
        self.interval = interval_seconds
        self.expire_after = expire_after_seconds if expire_after_seconds is not None else expire_seconds()
        self._lock = threading.Lock()
        self._current: str | None = None
        self._jobs_done = 0
        self._last_job_at: datetime | None = None
        self._finished: list[str] = []  # claimed jobs whose queue wait is still to be recorded
        self._registered = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._beat_backoff = Backoff(f"heartbeat of worker {worker_id}", log)
        self._prune_backoff = Backoff("expiry of stale worker entries", log)
        self._thread = threading.Thread(target=self._loop, name="worker-presence", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        """Registers from the thread: a slow database must not delay the process start (Celery
        kills a prefork child whose `worker_process_init` takes longer than 4 s)."""
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=self.interval + 5)
        try:
            self.registry.unregister(self.worker_id)
        except Exception as exc:  # the row goes stale and expires
            log.warning("could not remove worker %s from the registry (%s)", self.worker_id, one_line(exc))

    def job_started(self, job_id: str) -> None:
        with self._lock:
            self._current = job_id
        self._wake.set()

    def job_finished(self, job_id: str, outcome: str) -> None:
        with self._lock:
            self._current = None
            self._last_job_at = utcnow()
            if outcome != SKIPPED:
                self._jobs_done += 1
                self._finished.append(job_id)
        self._wake.set()

    def flush(self) -> None:
        with self._lock:
            current, done, last = self._current, self._jobs_done, self._last_job_at
            finished, self._finished = self._finished, []
        try:
            if not self.registry.heartbeat(
                self.worker_id, current_job_id=current, jobs_done=done, last_job_at=last
            ):
                if self._registered:
                    log.warning("worker %s was expired from the registry; registering again", self.worker_id)
                self.registry.register(
                    self.worker_id,
                    model_name=self.model_name,
                    queue=self.queue,
                    node=self.node,
                    replace_stale_seconds=stale_after(self.interval),
                )
                self._registered = True
                self.registry.heartbeat(
                    self.worker_id, current_job_id=current, jobs_done=done, last_job_at=last
                )
            waits = self.registry.queue_waits(finished, self.worker_id) if finished else []
        except BaseException:
            with self._lock:  # their queue waits are recorded with a later beat
                self._finished[:0] = finished
            raise
        if waits:
            from worker import metrics  # worker-only dependency; `diffgentor health` runs without it

            for seconds in waits:
                metrics.queue_waited(self.model_name, seconds)

    def _prune(self) -> None:
        if removed := self.registry.prune(self.expire_after):
            log.info("expired %d stale worker entries", removed)

    def _loop(self) -> None:
        beats = 0
        next_prune = 0  # the first successful beat also expires stale rows
        while not self._stop.is_set():
            try:
                self.flush()  # the first flush registers this worker (no row yet)
            except Exception as exc:  # a database blip must not kill the thread; a later beat retries
                wait = self._beat_backoff.failed(exc, self.interval)
                self._stop.wait(wait)  # job start/finish do not cut a back-off short
                continue
            self._beat_backoff.succeeded()
            if beats >= next_prune:
                try:
                    self._prune()
                except Exception as exc:
                    self._prune_backoff.failed(exc, self.interval * PRUNE_EVERY_BEATS)
                else:
                    self._prune_backoff.succeeded()
                next_prune = beats + PRUNE_EVERY_BEATS * self._prune_backoff.factor
            beats += 1
            if self._wake.wait(self.interval):
                # [issue 13] A job start or end: let the next one join this write (with the overlapped
                # finish, job N ends as N+1 starts), one UPDATE for both instead of one each.
                self._stop.wait(COALESCE_SECONDS)
            self._wake.clear()


def node_name(value: object) -> str | None:
    """A Celery node name (`name@host`) or None."""
    return value if isinstance(value, str) and "@" in value else None
