"""Infrastructure faults versus the user's errors, and bounded retries of the former.

A job must never end `failed` because a service was down for a few seconds (docs/jobs.md,
"Transient faults"). An exception is *transient* when it says that a service could not be
reached or answered "try again": the object store (:class:`StorageUnavailable`), the
database (a lost or refused connection, a pool timeout) or the broker (Redis/kombu connection
errors). Everything else — bad input, a prompt too long, a config that does not fit the
checkpoint, a bug — is *permanent*: retrying cannot help, the job fails at once.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from worker.storage import StorageUnavailable

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# In-place back-off: 0.5, 1, 2, 4, 8, 8 ... seconds between tries, within the caller's budget.
FIRST_PAUSE_SECONDS = 0.5
MAX_PAUSE_SECONDS = 8.0


def is_transient(exc: BaseException) -> bool:
    """True for an infrastructure fault worth retrying (walks the ``__cause__`` chain)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _transient_here(current):
            return True
        current = current.__cause__
    return False


def _transient_here(exc: BaseException) -> bool:
    if isinstance(exc, StorageUnavailable):
        return True
    sqlalchemy_exc = sys.modules.get("sqlalchemy.exc")
    if sqlalchemy_exc is not None:
        if isinstance(exc, sqlalchemy_exc.TimeoutError):  # pool exhausted or connect timeout
            return True
        if isinstance(exc, sqlalchemy_exc.DBAPIError) and (
            exc.connection_invalidated
            or isinstance(exc, sqlalchemy_exc.OperationalError | sqlalchemy_exc.InterfaceError)
        ):
            # OperationalError: connection refused/lost, server shutting down, "database is locked"
            # past busy_timeout; none of them is about the job's data.
            return True
    redis_exc = sys.modules.get("redis.exceptions")
    if redis_exc is not None and isinstance(exc, redis_exc.ConnectionError | redis_exc.TimeoutError):
        return True
    kombu_exc = sys.modules.get("kombu.exceptions")
    return kombu_exc is not None and isinstance(exc, kombu_exc.OperationalError)


def retry_transient(
    operation: Callable[[], _T],
    *,
    what: str,
    budget_seconds: float,
    should_stop: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
) -> _T:
    """Run ``operation``; on a transient fault try again with growing pauses for up to
    ``budget_seconds``. A permanent error, a fault past the budget, or ``should_stop()``
    turning true (the job was cancelled or taken over) re-raises the last error.

    One log line per failed try, without a traceback: an outage must not flood the log.
    """
    deadline = time.monotonic() + budget_seconds
    pause = FIRST_PAUSE_SECONDS
    tries = 0
    while True:
        tries += 1
        try:
            return operation()
        except Exception as exc:
            if not is_transient(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0 or should_stop():
                log.warning("%s failed %d time(s), giving up for now: %s", what, tries, one_line(exc))
                raise
            wait = min(pause, left)
            log.warning("%s failed (%s); retrying in %.1f s", what, one_line(exc), wait)
            sleep(wait)
            pause = min(MAX_PAUSE_SECONDS, pause * 2)


def one_line(exc: BaseException) -> str:
    """`ErrorClass: first line of the message`, at most 300 characters: how loops log a failure
    (a DBAPI error reports the driver's error, not SQLAlchemy's wrapper with the statement)."""
    inner = getattr(exc, "orig", None)
    error = inner if isinstance(inner, BaseException) else exc
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[0] if lines else ""
    if len(message) > 300:
        message = message[:297] + "..."
    return f"{type(error).__name__}: {message}" if message else type(error).__name__
