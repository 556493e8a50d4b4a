"""[issue 13] The overlapped finish: job N's PNG encode, uploads and fenced completion run on one
background thread of the job-running process while job N+1 generates.

`Finisher.submit` hands one finish over and returns at once, unless `capacity` finishes are
already pending: it then blocks until the oldest one is done. With the default capacity 1 a
task that has job N+1's images waits for job N's completion before it hands N+1 over, so at
most one finish is pending and at most two jobs' images are in memory. Finishes run in the
order they were handed over.

Each finish carries a `release` (the job's `LeaseKeeper.stop`): it runs after the finish, so the
lease of job N is renewed until its completion commits (or its failure is written). A crash
before that leaves the job `running` with a lease that expires; the sweeper releases and
re-publishes it and the fenced completion decides (docs/jobs.md, "Overlapped finish").

Each finish also has a deadline (`timeout_seconds`). A finish that outlives it is abandoned:
its lease is let go (the sweeper re-runs the job after the lease expires; the late completion,
if it ever comes, is refused by the fence), its slot is freed, and a fresh thread takes the
next finishes. `drain` waits for every pending finish (warm shutdown).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

DoneCallback = Callable[[str, str, float], None]  # (job id, outcome value, seconds the finish took)


@dataclass
class _Finish:
    job_id: str
    work: Callable[[], Any]
    release: Callable[[], None]
    abandon: Callable[[], None]
    on_done: DoneCallback | None
    deadline: float
    handed_at: float = field(default_factory=time.perf_counter)
    started: bool = False
    done: bool = False
    abandoned: bool = False


class Finisher:
    def __init__(self, *, capacity: int = 1, timeout_seconds: float = 600.0, name: str = "finisher") -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.timeout_seconds = timeout_seconds
        self.name = name
        self._slots = threading.BoundedSemaphore(capacity)
        self._queue: queue.Queue[_Finish | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending: list[_Finish] = []  # handed over, not done (oldest first)
        self._stuck: set[str] = set()  # abandoned finishes whose thread has not come back
        self._generation = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self.abandoned = 0

    # ---- producer side (the task's thread) ---------------------------------------------------

    def submit(
        self,
        job_id: str,
        work: Callable[[], Any],
        *,
        release: Callable[[], None],
        abandon: Callable[[], None] | None = None,
        on_done: DoneCallback | None = None,
    ) -> None:
        """Hand a finish over; blocks while `capacity` finishes are pending (bounded memory)."""
        if self._closed:
            raise RuntimeError("the finisher is closed")
        if not self._slots.acquire(blocking=False):
            log.info("job %s waits for the pending finish of %s", job_id, ", ".join(self.pending()))
            while not self._slots.acquire(timeout=self._wait_slice()):
                self._abandon_overdue()
        item = _Finish(
            job_id, work, release, abandon or release, on_done, time.monotonic() + self.timeout_seconds
        )
        with self._lock:
            self._pending.append(item)
            self._ensure_thread()
        self._queue.put(item)

    def holds(self, job_id: str) -> bool:
        """Whether a finish of `job_id` is pending here, or abandoned and not back yet: a redelivery
        of it must not run again in this process (its claim would be granted to the same worker id)."""
        with self._lock:
            return any(item.job_id == job_id for item in self._pending) or job_id in self._stuck

    def pending(self) -> list[str]:
        with self._lock:
            return [item.job_id for item in self._pending]

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every finish handed over is done (or abandoned); False if `timeout` ran out."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._pending:
                    return True
            if end is not None and time.monotonic() >= end:
                return False
            self._abandon_overdue()
            time.sleep(0.005)

    def close(self, timeout: float | None = None) -> bool:
        """Drain, then stop the thread. Returns whether everything was finished."""
        drained = self.drain(timeout)
        self._closed = True
        with self._lock:
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=1.0)
        return drained

    # ---- deadlines -------------------------------------------------------------------------

    def _wait_slice(self) -> float:
        with self._lock:
            deadlines = [item.deadline for item in self._pending if not item.abandoned]
        if not deadlines:
            return 0.5
        return max(0.01, min(0.5, min(deadlines) - time.monotonic()))

    def _abandon_overdue(self) -> None:
        now = time.monotonic()
        with self._lock:
            overdue = [i for i in self._pending if i.started and not i.done and i.deadline <= now]
            for item in overdue:
                item.abandoned = True
                self._pending.remove(item)
                self._stuck.add(item.job_id)
            if overdue:
                self.abandoned += len(overdue)
                self._generation += 1  # the stuck thread exits when (if) it comes back
                self._thread = None
                self._ensure_thread()
        for item in overdue:
            log.error(
                "the finish of job %s ran past %.0f s (DG_FINISH_TIMEOUT_SECONDS); its lease is let go, "
                "the sweeper re-runs the job after the lease expires and a late completion is refused",
                item.job_id,
                self.timeout_seconds,
            )
            _quietly(item.abandon, f"letting go of the lease of job {item.job_id}")
            _report(item, "lost")
            self._slots.release()

    # ---- the thread ------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        """Called with the lock held."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, args=(self._generation,), name=self.name, daemon=True
            )
            self._thread.start()

    def _run(self, generation: int) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            with self._lock:
                if generation != self._generation:  # replaced after a stuck finish: hand it on
                    self._queue.put(item)
                    return
                item.started = True
                item.deadline = time.monotonic() + self.timeout_seconds
            outcome: Any = "error"
            try:
                outcome = item.work()
            except BaseException:
                log.exception("the finish of job %s raised; its lease will expire", item.job_id)
            finally:
                with self._lock:
                    abandoned = item.abandoned
                    item.done = True
                    self._stuck.discard(item.job_id)
                if not abandoned:
                    _quietly(item.release, f"releasing the lease of job {item.job_id}")
                    _report(item, str(getattr(outcome, "value", outcome)))
                    with self._lock:
                        if item in self._pending:
                            self._pending.remove(item)
                    self._slots.release()
            with self._lock:
                if generation != self._generation:
                    return


def _report(item: _Finish, status: str) -> None:
    if item.on_done is None:
        return
    try:
        item.on_done(item.job_id, status, time.perf_counter() - item.handed_at)
    except Exception:
        log.exception("error while recording the end of job %s", item.job_id)


def _quietly(operation: Callable[[], object], what: str) -> None:
    try:
        operation()
    except Exception:
        log.exception("error while %s", what)


# ---- the process's finisher (Celery prefork child, or the solo worker) ------------------------

_process_finisher: Finisher | None = None
_process_lock = threading.Lock()


def process_finisher(timeout_seconds: float) -> Finisher:
    global _process_finisher
    with _process_lock:
        if _process_finisher is None:
            _process_finisher = Finisher(capacity=1, timeout_seconds=timeout_seconds)
        return _process_finisher


def drain_process_finisher(timeout: float | None = None) -> bool:
    """Warm shutdown: finish what was handed over before the process exits."""
    global _process_finisher
    with _process_lock:
        finisher, _process_finisher = _process_finisher, None
    if finisher is None:
        return True
    pending = finisher.pending()
    if pending:
        log.info("finishing %d handed-over job(s) before exit: %s", len(pending), ", ".join(pending))
    drained = finisher.close(timeout)
    if not drained:
        log.warning("exit with unfinished jobs %s; their leases expire and the sweeper re-runs them", pending)
    return drained
