"""Job handles: what `submit_t2i`, `submit_edit` and `submit_many` return, shaped like
`concurrent.futures`.

A `JobHandle` is a submitted job seen from the producer: ``.id``, ``.done()``, ``.status``,
``.result(timeout)`` (the images' metadata, or the job's failure raised) and ``.cancel()``. The
module functions `as_completed` and `wait` take any number of handles, like their namesakes in
`concurrent.futures`; they wake on the jobs' events and read the job table in one query per round
(docs/cli.md, Python API; docs/events.md).

    handles = client.submit_many([client.t2i_spec(p) for p in prompts])
    for handle in as_completed(handles, timeout=3600):
        print(handle.id, handle.result())
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from api_client.errors import JobCancelled, JobFailed, WaitTimeout
from schemas.enums import JobStatus
from schemas.views import ArtifactView, JobView

if TYPE_CHECKING:
    from api_client.client import DiffgentorClient

FIRST_COMPLETED = "FIRST_COMPLETED"
FIRST_EXCEPTION = "FIRST_EXCEPTION"
ALL_COMPLETED = "ALL_COMPLETED"
_RETURN_WHEN = (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED)


class JobHandle:
    """One submitted job. ``created`` is False when `submit_many` found an existing job by its
    idempotency key instead of inserting one. ``view`` is the row as last read; ``status``,
    ``done()`` and ``refresh()`` read it again; the view's other fields (``seed``, ``spec``,
    ``artifacts``, ...) read through as they were last read."""

    def __init__(self, client: DiffgentorClient, view: JobView, *, created: bool = True) -> None:
        self._client = client
        self.view = view
        self.created = created

    @property
    def id(self) -> str:
        return self.view.id

    @property
    def job(self) -> JobView:
        """The row as last read (the same as ``view``; kept for code written against `SubmittedJob`)."""
        return self.view

    def refresh(self) -> JobView:
        """Read the row again (skipped once it is terminal: a finished job never changes)."""
        if not self.view.is_terminal:
            self.view = self._client.get(self.view.id)
        return self.view

    @property
    def status(self) -> JobStatus:
        return self.refresh().status

    def done(self) -> bool:
        """True when the job succeeded, failed or was cancelled."""
        return self.refresh().is_terminal

    def cancelled(self) -> bool:
        return self.refresh().status == JobStatus.CANCELLED

    def cancel(self) -> bool:
        """Ask the job to stop (a queued job never starts; a running one stops at its next step).
        False when it already succeeded or failed, as `Future.cancel`."""
        from api_client.errors import JobStateError

        try:
            self.view = self._client.cancel(self.view.id)
        except JobStateError:
            self.refresh()
            return False
        return True

    def result(self, timeout: float | None = None) -> list[ArtifactView]:
        """Wait for the job; return its images' metadata (index, uri, size, sha256), index order.

        Raises `JobFailed` (with the job's error) or `JobCancelled`, or `WaitTimeout` when
        ``timeout`` seconds pass first.
        """
        view = self._wait(timeout)
        _raise_for(view)
        return sorted(view.artifacts, key=lambda artifact: artifact.index)

    def exception(self, timeout: float | None = None) -> Exception | None:
        """Wait for the job; the error `result` would raise, or None when it succeeded."""
        view = self._wait(timeout)
        try:
            _raise_for(view)
        except (JobFailed, JobCancelled) as error:
            return error
        return None

    def download(self, folder: Any, name: str | None = None) -> list[Any]:
        """`DiffgentorClient.download` of this job (waits for nothing: it must have succeeded)."""
        return self._client.download(self.refresh(), folder, name)

    def open_images(self) -> list[Any]:
        return self._client.open_images(self.refresh())

    def _wait(self, timeout: float | None) -> JobView:
        if not self.refresh().is_terminal:
            self.view = self._client.wait(self.view.id, timeout=timeout)
        return self.view

    def __getattr__(self, name: str) -> Any:
        # The row's other fields as last read (handle.seed, handle.spec, handle.artifacts, ...), so
        # code written when submit_* returned a JobView keeps working.
        if name in JobView.model_fields and name != "view":
            return getattr(self.__dict__["view"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"<JobHandle {self.view.id} {self.view.status.value}>"


class DoneAndNotDone(NamedTuple):
    done: set[JobHandle]
    not_done: set[JobHandle]


def as_completed(handles: Iterable[JobHandle], timeout: float | None = None) -> Iterator[JobHandle]:
    """Yield the handles as their jobs finish (succeeded, failed or cancelled), first finished first.

    Raises `WaitTimeout` naming the unfinished jobs when ``timeout`` seconds pass first, as
    `concurrent.futures.as_completed` raises TimeoutError.
    """
    pending = _unique(handles)
    deadline = None if timeout is None else time.monotonic() + timeout
    with _Watch(pending) as watch:
        while pending:
            watch.refresh(pending)
            finished = sorted((handle for handle in pending if handle.view.is_terminal), key=_finish_order)
            for handle in finished:
                pending.remove(handle)
                yield handle
            if pending and not watch.until_next_read(deadline):
                raise WaitTimeout([handle.id for handle in pending], timeout or 0.0)


def wait(
    handles: Iterable[JobHandle], timeout: float | None = None, return_when: str = ALL_COMPLETED
) -> DoneAndNotDone:
    """Wait until ``return_when`` holds, then return ``(done, not_done)`` sets, as
    `concurrent.futures.wait`: ``ALL_COMPLETED`` (default), ``FIRST_COMPLETED`` (any job finished),
    ``FIRST_EXCEPTION`` (any job failed or was cancelled, else all finished). On ``timeout`` it
    returns what is done so far; it does not raise."""
    if return_when not in _RETURN_WHEN:
        raise ValueError(f"return_when must be one of {', '.join(_RETURN_WHEN)}, got {return_when!r}")
    every = _unique(handles)
    deadline = None if timeout is None else time.monotonic() + timeout
    with _Watch(every) as watch:
        while True:
            watch.refresh(every)
            done = {handle for handle in every if handle.view.is_terminal}
            not_done = set(every) - done
            if _satisfied(return_when, done, not_done) or not watch.until_next_read(deadline):
                return DoneAndNotDone(done, not_done)


class _Watch:
    """When to read the handles' rows again. With one client (the usual case) it subscribes to the
    jobs' events before the first read, as `DiffgentorClient.wait` does: an event names the jobs to
    read at once, and everything is read every DG_EVENTS_FALLBACK_SECONDS anyway (docs/events.md).
    Handles of several clients are polled, each client's jobs in one query per round."""

    def __init__(self, handles: Sequence[JobHandle]) -> None:
        from worker.events import ReadPacer, Reread

        clients = {id(handle._client): handle._client for handle in handles}
        self._pacer: Any = None
        self._subscription: Any = None
        self._next = Reread(full=True)
        self._poll = min((client.poll_seconds for client in clients.values()), default=0.5)
        if len(clients) == 1:
            [client] = clients.values()
            self._subscription = client._subscribe(job_ids=[handle.id for handle in handles])
            self._pacer = ReadPacer(
                self._subscription,
                poll_seconds=client.poll_seconds,
                fallback_seconds=client.events_fallback_seconds,
                cost_factor=1.0,
            )

    def refresh(self, handles: Sequence[JobHandle]) -> None:
        """One `get_many` per client for the unfinished handles the next read names."""
        started = time.monotonic()
        by_client: dict[int, list[JobHandle]] = {}
        for handle in handles:
            if not handle.view.is_terminal and (self._next.full or handle.id in self._next.job_ids):
                by_client.setdefault(id(handle._client), []).append(handle)
        for group in by_client.values():
            client = group[0]._client
            client.drive_embedded([handle.view for handle in group])
            for handle, view in zip(group, client.get_many([handle.id for handle in group]), strict=True):
                handle.view = view
        if self._pacer is not None:
            self._pacer.done(self._next, time.monotonic() - started)

    def until_next_read(self, deadline: float | None) -> bool:
        """Block until the next read is due; False when ``deadline`` (monotonic) came first."""
        from worker.events import Reread

        if self._pacer is not None:
            reread = self._pacer.next(deadline)
            if reread is None:
                return False
            self._next = reread
            return True
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            return False
        time.sleep(self._poll if deadline is None else min(self._poll, deadline - now))
        self._next = Reread(full=True)
        return True

    def __enter__(self) -> _Watch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._subscription is not None:
            self._subscription.close()


def _satisfied(return_when: str, done: set[JobHandle], not_done: set[JobHandle]) -> bool:
    if not not_done:
        return True
    if return_when == FIRST_COMPLETED:
        return bool(done)
    if return_when == FIRST_EXCEPTION:
        return any(handle.view.status != JobStatus.SUCCEEDED for handle in done)
    return False


def _raise_for(view: JobView) -> None:
    if view.status == JobStatus.FAILED:
        raise JobFailed(view)
    if view.status == JobStatus.CANCELLED:
        raise JobCancelled(view)


def _unique(handles: Iterable[JobHandle]) -> list[JobHandle]:
    seen: dict[int, JobHandle] = {}
    for handle in handles:
        if not isinstance(handle, JobHandle):
            raise TypeError(f"expected JobHandle objects (what submit_* return), got {type(handle).__name__}")
        seen.setdefault(id(handle), handle)
    return list(seen.values())


def _finish_order(handle: JobHandle) -> tuple[float, str]:
    finished = handle.view.finished_at
    return (finished.timestamp() if finished is not None else float("inf"), handle.id)
