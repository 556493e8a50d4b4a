"""[issue 13] Group commit for concurrent callers: their items go out in ONE write.

Used for the single submits of many producer threads (the INSERT and its commit,
worker.jobstore) and their publishes (one Redis pipeline, worker.publish).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class _Waiter:
    """One caller of a `GroupWriter`: woken once its group was written, or to write the next group.

    A bare lock, held from the start, is the signal: `wait` acquires it, `wake` releases it. An
    Event (a Condition and a lock, in Python) cost a third of eight producer threads' GIL time in
    `set` (py-spy --gil, bench/results/submit.md)."""

    __slots__ = ("_signal", "error", "lead", "result")

    def __init__(self) -> None:
        self._signal = threading.Lock()
        self._signal.acquire()
        self.lead = False
        self.result: Any = None
        self.error: BaseException | None = None

    def wait(self) -> None:
        self._signal.acquire()

    def wake(self) -> None:
        # Each wake follows this waiter's creation or its last wait: the lock is held here.
        self._signal.release()


class GroupWriter(Generic[_Item, _Result]):
    """[issue 13] Group commit: concurrent callers' items go out in ONE write, and each caller
    returns only after that write committed (with its result, or raising its error).

    No thread of its own and no waiting for company: a caller that finds no write in flight
    writes its own item at once (one producer: exactly the single write it was); callers that
    arrive while a write is in flight queue up, and the first of them writes them all when it
    ends. ``write(items)`` returns one result for all. A failed group of several items whose
    error belongs to a row (``alone_on``: a constraint, a bad value; nothing was committed) is
    written again one item per caller, so each sees only its own outcome; any other error (a lost
    connection) is every caller's.
    """

    def __init__(
        self,
        write: Callable[[list[_Item]], _Result],
        *,
        alone_on: tuple[type[BaseException], ...] = (),
        max_items: int = 1000,
    ) -> None:
        self._write = write
        self._alone_on = alone_on
        self._max_items = max_items
        self._lock = threading.Lock()
        self._queue: list[tuple[_Item, _Waiter]] = []
        self._busy = False

    def __call__(self, item: _Item) -> _Result:
        waiter = _Waiter()
        with self._lock:
            self._queue.append((item, waiter))
            waiter.lead = not self._busy
            self._busy = True
        if not waiter.lead:
            waiter.wait()
            if waiter.lead:  # handed the next group: write it
                self._lead()
        elif waiter.lead:
            self._lead()
        if waiter.error is not None:
            raise waiter.error
        return cast(_Result, waiter.result)

    def _lead(self) -> None:
        with self._lock:
            group, self._queue = self._queue[: self._max_items], self._queue[self._max_items :]
        try:
            result = self._write([item for item, _ in group])
            for _, waiter in group:
                waiter.result = result
        except BaseException as exc:
            if len(group) > 1 and isinstance(exc, self._alone_on):
                for item, waiter in group:
                    try:
                        waiter.result = self._write([item])
                    except BaseException as own:  # handed to its caller
                        waiter.error = own
            else:
                for _, waiter in group:
                    waiter.error = exc
        finally:
            with self._lock:
                following = self._queue[0][1] if self._queue else None
                if following is None:
                    self._busy = False
                else:
                    following.lead = True  # stays busy: the next group's writer
            for _, waiter in group:
                waiter.lead = False
                waiter.wake()
            if following is not None:
                following.wake()
