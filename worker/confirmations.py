"""[issue 13] Publish confirmations of single submits, deleted in rounds off the caller's path.

A producer that published a job deletes its pending-publish row (schemas.tables.PendingPublish).
For one job per call (many producer threads submitting one job each) that DELETE was a third of
the producer's CPU and one of its three round trips (bench/results/submit.md). Here the callers
only hand over the ids; one daemon thread deletes everything handed over since its last round in
one statement, then waits `linger_seconds` for more.

Nothing depends on the delete being prompt or even happening: a row that stays (the process died
first, or the database was unreachable for longer than `max_held` ids) only makes the sweeper
publish its job again after the publish grace, and the claim drops the duplicate delivery. At
interpreter exit the ids handed over are deleted first (`flush`, a few seconds at most), so a short
CLI run leaves nothing to send twice.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence

from worker.backoff import Backoff

log = logging.getLogger(__name__)

EXIT_FLUSH_SECONDS = 2.0  # at exit: a few rounds, not a wait on a database that is down
# A thread with nothing to delete for this long ends (the next id starts a new one), so an idle
# store holds no thread and can be collected.
IDLE_EXIT_SECONDS = 5.0


class PublishConfirmations:
    """Ids whose pending-publish rows can go; ``delete(ids)`` removes them in one statement."""

    def __init__(
        self,
        delete: Callable[[list[str]], None],
        *,
        linger_seconds: float = 0.02,
        max_held: int = 100_000,
    ) -> None:
        self._delete = delete
        self._linger = linger_seconds
        self._max_held = max_held
        self._reset()
        _LIVE.add(self)

    def _reset(self) -> None:
        # Also after a fork: the child has the lock's state and the ids of its parent but not its
        # thread; it starts empty and makes its own thread on its first id.
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._ids: list[str] = []
        self._added = 0  # ids handed over so far
        self._settled = 0  # of those, deleted (or given up on) so far
        self._thread: threading.Thread | None = None
        self._closed = False

    def add(self, job_ids: Sequence[str]) -> None:
        if os.getpid() != self._pid:
            self._reset()
        if self._closed:  # used after close: delete at once
            self._delete(list(job_ids))
            return
        with self._cond:
            self._ids.extend(job_ids)
            self._added += len(job_ids)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="publish-confirmations", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every id handed over before this call was deleted; False on timeout."""
        with self._cond:
            target = self._added
            return self._cond.wait_for(lambda: self._settled >= target or self._thread is None, timeout)

    def close(self, timeout: float = EXIT_FLUSH_SECONDS) -> None:
        """Delete what is held (up to ``timeout``) and stop the thread."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._thread is None, 1.0)

    def _run(self) -> None:
        backoff = Backoff("deleting pending-publish rows", log)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._ids) or self._closed, IDLE_EXIT_SECONDS)
                if not self._ids:  # closed, or idle: nothing left
                    self._thread = None
                    self._cond.notify_all()
                    return
                ids, self._ids = self._ids, []
            try:
                self._delete(ids)
            except Exception as exc:
                pause = backoff.failed(exc, 1.0)
                with self._cond:
                    if self._closed:  # closing: give the rest up (the sweeper sends those jobs again)
                        self._settled += len(ids) + len(self._ids)
                        self._ids = []
                        self._cond.notify_all()
                        continue
                    held = ids + self._ids
                    # Past the cap the oldest are given up: the sweeper publishes those jobs once more.
                    dropped = max(0, len(held) - self._max_held)
                    self._ids = held[dropped:]
                    self._settled += dropped
                    self._cond.notify_all()
                    self._pause(pause)
                continue
            backoff.succeeded()
            with self._cond:
                self._settled += len(ids)
                self._cond.notify_all()
                self._pause(self._linger)  # let more ids gather for the next round

    def _pause(self, seconds: float) -> None:
        """Wait (holding the condition) for ``seconds`` or until closed; new ids do not cut it short."""
        deadline = time.monotonic() + seconds
        while not self._closed and (left := deadline - time.monotonic()) > 0:
            self._cond.wait(left)


_LIVE: weakref.WeakSet[PublishConfirmations] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for confirmations in list(_LIVE):
        if confirmations._pid == os.getpid() and confirmations._thread is not None:
            confirmations.close()
