"""Workers register themselves in the `workers` table and keep a heartbeat there.

`WorkerRegistry` holds the table operations; `Presence` is what one worker process runs:
a daemon thread that writes the heartbeat, the current job, the jobs done and the time of
the last handled delivery. Job start/finish only change memory and wake the thread, so the
database write is never on a job's critical path (it lands within milliseconds).

Entries of dead workers go stale (no heartbeat) and are deleted after
`DG_WORKER_EXPIRE_SECONDS` (default 900 s) by any live worker, so `diffgentor health`
reports a crashed worker as gone for that long, and then no longer lists it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from schemas.enums import JobStatus
from schemas.tables import Job, WorkerRecord, utcnow
from worker.claims import relaxed

log = logging.getLogger(__name__)

EXPIRE_ENV = "DG_WORKER_EXPIRE_SECONDS"
DEFAULT_EXPIRE_SECONDS = 900.0
SKIPPED = "skipped"  # runner outcome of a delivery that did not run the job (duplicate, finished)


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    hostname: str
    pid: int
    model_name: str
    queue: str
    started_at: datetime
    heartbeat_at: datetime
    current_job_id: str | None
    jobs_done: int
    last_job_at: datetime | None


def _view(row: WorkerRecord) -> WorkerView:
    return WorkerView(row.worker_id, row.hostname, row.pid, row.model_name, row.queue, row.started_at,
                      row.heartbeat_at, row.current_job_id, row.jobs_done, row.last_job_at)


def expire_seconds() -> float:
    raw = os.environ.get(EXPIRE_ENV, "").strip()
    return float(raw) if raw else DEFAULT_EXPIRE_SECONDS


class WorkerRegistry:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def register(self, worker_id: str, *, model_name: str, queue: str, hostname: str | None = None,
                 pid: int | None = None) -> None:
        now = utcnow()
        with self._sessions.begin() as session:
            # Write first (no SELECT as merge() would do): on SQLite a transaction that reads
            # and then writes fails at once with "database is locked" if another writer won.
            session.execute(sa.delete(WorkerRecord).where(WorkerRecord.worker_id == worker_id))
            session.add(WorkerRecord(
                worker_id=worker_id, hostname=hostname or socket.gethostname(), pid=pid or os.getpid(),
                model_name=model_name, queue=queue, started_at=now, heartbeat_at=now,
                current_job_id=None, jobs_done=0, last_job_at=None,
            ))

    def heartbeat(self, worker_id: str, *, current_job_id: str | None, jobs_done: int,
                  last_job_at: datetime | None) -> bool:
        """False when the row is gone (expired by another worker): the caller registers again."""
        # A delivery may carry an id with no row (malformed, deleted job): the sub-select turns
        # it into NULL instead of breaking the foreign key.
        job = sa.select(Job.id).where(Job.id == current_job_id).scalar_subquery()
        # A lost heartbeat is rewritten a beat later, so it need not wait for the WAL flush
        # (and does not queue behind the job's own durable commits on the same disk).
        with self._sessions.begin() as session:
            result = session.execute(relaxed(
                sa.update(WorkerRecord).where(WorkerRecord.worker_id == worker_id)
                .values(heartbeat_at=utcnow(), current_job_id=job if current_job_id else None,
                        jobs_done=jobs_done, last_job_at=last_job_at)
                .execution_options(synchronize_session=False),
                session,
            ))
            return bool(result.rowcount)  # type: ignore[attr-defined]

    def unregister(self, worker_id: str) -> None:
        with self._sessions.begin() as session:
            session.execute(sa.delete(WorkerRecord).where(WorkerRecord.worker_id == worker_id))

    def prune(self, older_than_seconds: float) -> int:
        horizon = utcnow() - timedelta(seconds=older_than_seconds)
        with self._sessions.begin() as session:
            result = session.execute(sa.delete(WorkerRecord).where(WorkerRecord.heartbeat_at < horizon))
            return int(result.rowcount)  # type: ignore[attr-defined]

    def list(self, *, model_name: str | None = None, worker_id: str | None = None) -> list[WorkerView]:
        query = sa.select(WorkerRecord).order_by(WorkerRecord.model_name, WorkerRecord.started_at)
        if model_name is not None:
            query = query.where(WorkerRecord.model_name == model_name)
        if worker_id is not None:
            query = query.where(WorkerRecord.worker_id == worker_id)
        with self._sessions() as session:
            return [_view(row) for row in session.scalars(query)]

    def oldest_waiting(self, model_names: list[str]) -> dict[str, datetime]:
        """Per model: the publish time of the oldest job that is queued and was published."""
        if not model_names:
            return {}
        query = (
            sa.select(Job.model_name, sa.func.min(Job.published_at))
            .where(Job.status == JobStatus.QUEUED.value, Job.published_at.is_not(None),
                   Job.model_name.in_(model_names))
            .group_by(Job.model_name)
        )
        with self._sessions() as session:
            return {name: when for name, when in session.execute(query) if when is not None}

    def queue_waits(self, job_ids: list[str], worker_id: str) -> list[float]:
        """Seconds from publish (or creation) to start, for those of the jobs this worker claimed."""
        query = sa.select(Job.published_at, Job.created_at, Job.started_at).where(
            Job.id.in_(job_ids), Job.worker_id == worker_id, Job.started_at.is_not(None))
        with self._sessions() as session:
            return [(started - (published or created)).total_seconds()
                    for published, created, started in session.execute(query)]


class Presence:
    """The registry entry of this process, kept fresh by a daemon thread."""

    def __init__(self, registry: WorkerRegistry, worker_id: str, *, model_name: str, queue: str,
                 interval_seconds: float, expire_after_seconds: float | None = None) -> None:
        self.registry = registry
        self.worker_id = worker_id
        self.model_name = model_name
        self.queue = queue
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
        self._thread = threading.Thread(target=self._loop, name="worker-presence", daemon=True)

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
        except Exception:
            log.warning("could not remove worker %s from the registry", self.worker_id, exc_info=True)

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
        if not self.registry.heartbeat(self.worker_id, current_job_id=current, jobs_done=done, last_job_at=last):
            if self._registered:
                log.warning("worker %s was expired from the registry; registering again", self.worker_id)
            self._registered = True
            self.registry.register(self.worker_id, model_name=self.model_name, queue=self.queue)
            self.registry.heartbeat(self.worker_id, current_job_id=current, jobs_done=done, last_job_at=last)
        if finished:
            from worker import metrics  # worker-only dependency; `diffgentor health` runs without it

            for seconds in self.registry.queue_waits(finished, self.worker_id):
                metrics.queue_waited(self.model_name, seconds)

    def _prune(self) -> None:
        try:
            if removed := self.registry.prune(self.expire_after):
                log.info("expired %d stale worker entries", removed)
        except Exception:
            log.warning("pruning stale workers failed", exc_info=True)

    def _loop(self) -> None:
        beats = 0
        while not self._stop.is_set():
            try:
                self.flush()  # the first flush registers this worker (no row yet)
            except Exception:  # a database blip must not kill the thread; the next beat retries
                log.warning("worker heartbeat failed", exc_info=True)
            if beats % 60 == 0:
                self._prune()
            beats += 1
            self._wake.wait(self.interval)
            self._wake.clear()


# ---- Celery wiring (connected by worker.tasks) ------------------------------------------------

_presence: Presence | None = None
_installed = False


def current_presence() -> Presence | None:
    return _presence


def install(app: object) -> None:
    """Register the job-running process at start, track its deliveries, unregister on shutdown."""
    from celery import signals

    from worker.publish import RUN_JOB_TASK_NAME

    global _installed
    if _installed:
        return
    _installed = True

    def on_process_init(**_: object) -> None:
        global _presence
        from worker import metrics, tasks
        from worker.db import make_engine, session_factory

        try:
            settings = tasks.settings()
            queues = metrics.model_queues(app)
            registry = WorkerRegistry(session_factory(make_engine(settings.database_url)))
            presence = Presence(registry, tasks.worker_id(), model_name=queues[0] if queues else "unknown",
                                queue=",".join(queues), interval_seconds=settings.heartbeat_seconds)
            presence.start()
        except Exception:  # jobs still run; `diffgentor health` shows no worker for this model
            log.exception("could not register this worker in the workers table")
            return
        _presence = presence

    def on_prerun(task: object, args: tuple[object, ...] = (), **_: object) -> None:
        if _presence is not None and getattr(task, "name", None) == RUN_JOB_TASK_NAME and args:
            _presence.job_started(str(args[0]))

    def on_postrun(task: object, args: tuple[object, ...] = (), retval: object = None, **_: object) -> None:
        if _presence is not None and getattr(task, "name", None) == RUN_JOB_TASK_NAME and args:
            _presence.job_finished(str(args[0]), retval if isinstance(retval, str) else "error")

    def on_shutdown(**_: object) -> None:
        global _presence
        presence, _presence = _presence, None
        if presence is not None:
            presence.stop()

    signals.worker_process_init.connect(on_process_init, weak=False)
    signals.task_prerun.connect(on_prerun, weak=False)
    signals.task_postrun.connect(on_postrun, weak=False)
    # prefork child: worker_process_shutdown; solo pool (no child): worker_shutdown.
    signals.worker_process_shutdown.connect(on_shutdown, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)
