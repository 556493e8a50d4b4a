"""How a background loop waits and logs after consecutive failures (one line per back-off step)."""

from __future__ import annotations

import logging
import time

from worker.transient import one_line

log = logging.getLogger(__name__)

MAX_BACKOFF_FACTOR = 4  # a failing loop waits up to 4 x its interval, unless told otherwise


class Backoff:
    """Consecutive failures of one background loop: how long to wait next, and what to log.

    After n consecutive failures the loop waits `interval x min(2**(n-1), max_factor)` (1x,
    2x, 4x, 4x ...); a success resets it. The first failure and each new back-off step log
    one WARNING line with the error class and message (so at most three lines per outage with
    the default cap), the recovery one INFO line; the traceback only at DEBUG level.
    """

    def __init__(
        self, what: str, logger: logging.Logger | None = None, *, max_factor: int = MAX_BACKOFF_FACTOR
    ) -> None:
        self.what = what
        self.log = logger or log
        self.max_factor = max_factor
        self.failures = 0
        self._failing_since: float | None = None

    @property
    def factor(self) -> int:
        return min(2 ** max(self.failures - 1, 0), self.max_factor)

    def delay(self, interval_seconds: float) -> float:
        return interval_seconds * self.factor

    def failed(self, exc: BaseException, interval_seconds: float) -> float:
        """Record a failure; returns the wait before the next try."""
        previous = self.factor if self.failures else 0
        self.failures += 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        wait = self.delay(interval_seconds)
        if self.factor != previous:
            self.log.warning(
                "%s failed (%s)%s%s",
                self.what,
                one_line(exc),
                f"; retrying in {wait:.3g}s" if wait > 0 else "",
                "" if self.failures == 1 else f" ({self.failures} failures in a row)",
            )
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("%s failure %d", self.what, self.failures, exc_info=exc)
        return wait

    def succeeded(self) -> None:
        if self.failures:
            down = time.monotonic() - (self._failing_since or time.monotonic())
            self.log.info("%s works again after %d failure(s) over %.0fs", self.what, self.failures, down)
        self.failures = 0
        self._failing_since = None
