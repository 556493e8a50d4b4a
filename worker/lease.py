"""Keep a claimed job's lease alive from a background thread, and throttle progress writes.

The heartbeat thread runs from claim to finish, so the lease stays live during the model
load and the input download too, not only between denoising steps. Both the heartbeat and
the progress writes report a cancel request or a lost lease back to the job's step callback.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

from worker.claims import LeaseState
from worker.errors import is_soft_time_limit
from worker.jobstore import JobStore
from worker.transient import one_line

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(
        self, store: JobStore, job_id: str, worker_id: str, *, lease_seconds: float, heartbeat_seconds: float
    ) -> None:
        self._store = store
        self._job_id = job_id
        self._worker_id = worker_id
        self._lease_seconds = lease_seconds
        self._heartbeat_seconds = heartbeat_seconds
        self.claimed_at = time.monotonic()  # created right after the claim
        self._stopped = threading.Event()
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id[:8]}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop renewing (idempotent; any thread). [issue 13] With an overlapped finish this runs on
        the finisher's thread after the job's completion (or failure) is written, not when the
        task returns: the lease stays live through the encode, uploads and completion."""
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._heartbeat_seconds + 5)

    def abandon(self) -> None:
        """[issue 13] A finish ran past its deadline: stop renewing and count the job as lost here,
        so the stuck finish, if it comes back, writes nothing (the sweeper re-runs the job)."""
        self.lost.set()
        self.stop()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    @property
    def should_stop(self) -> bool:
        return self.cancel_requested.is_set() or self.lost.is_set()

    def observe(self, state: LeaseState) -> None:
        if state.cancel_requested:
            self.cancel_requested.set()
        if not state.owned:
            self.lost.set()

    def _beat(self) -> None:
        while not self._stopped.wait(self._heartbeat_seconds):
            try:
                self.observe(self._store.heartbeat(self._job_id, self._worker_id, self._lease_seconds))
            except Exception as exc:  # a database blip must not kill the job; the next beat retries
                log.warning("lease renewal for job %s failed: %s", self._job_id, one_line(exc))
            if self.lost.is_set():
                return


class ProgressReporter:
    """The engine's step callback: writes progress at most every `interval` seconds.

    The throttle clock starts at the claim, so a job shorter than `interval` writes no progress
    at all, and the last step is never written: the fenced completion sets `progress_step` to
    the total in the same statement. Cancel requests are still seen by the lease heartbeat.
    """

    def __init__(
        self, store: JobStore, job_id: str, worker_id: str, lease: LeaseKeeper, interval_seconds: float
    ) -> None:
        self._store = store
        self._job_id = job_id
        self._worker_id = worker_id
        self._lease = lease
        self._interval = interval_seconds
        self._last_write = lease.claimed_at
        self.writes = 0

    def __call__(self, step: int, total: int) -> bool:
        now = time.monotonic()
        if step < total and now - self._last_write >= self._interval:
            self.writes += 1
            self._last_write = now
            try:
                self._lease.observe(self._store.record_progress(self._job_id, self._worker_id, step, total))
            except Exception as exc:
                if is_soft_time_limit(exc):
                    raise  # the job must end now as TimeLimitExceeded, not run on to the hard kill
                log.warning("progress write for job %s failed: %s", self._job_id, one_line(exc))
        return self._lease.should_stop  # True asks the engine to stop at this step
