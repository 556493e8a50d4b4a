"""`Batch`: a handle on a batch record (jobs submitted together), from `DiffgentorClient.batch(...)`.

    batch = client.batch("3f2a9c1e")       # an id or a unique prefix (at least 4 characters)
    batch.counts()                          # {"queued": 0, "running": 2, "succeeded": 95, ...}
    batch.wait(timeout=3600, progress=True) # polls the counts, never every job
    batch.retry_failed()                    # new linked jobs for the failed/cancelled rows
    batch.fetch("out/")                     # out/000000.png ... ({index:06d}_{j:02d}.png for N images)
    batch.export("batch.csv")               # or .jsonl

Counts, listings and actions read "the latest job of each row": a retry replaces its row's job
(docs/jobs.md, "Batches"). Rows are read a page at a time, so a 100,000-job batch never loads at once.
"""

from __future__ import annotations

import builtins
import csv
import functools
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from api_client.errors import (
    BatchNotFound,
    DiffgentorError,
    InputFileError,
    UsageError,
    WaitTimeout,
    path_problem,
)
from schemas.enums import JobStatus
from schemas.views import BatchCounts, BatchProgress, BatchView, JobView

if TYPE_CHECKING:
    from api_client.client import DiffgentorClient
    from worker.batches import BatchCancel, BatchStore

EXPORT_FORMATS = ("csv", "jsonl")
EXPORT_COLUMNS = ("index", "job_id", "status", "seed", "prompt", "params", "artifact_uris", "sha256", "error")
PLAIN_INTERVAL_SECONDS = 10.0
POLL_COST_FACTOR = 10  # `wait` sleeps at least this many times what its last poll took
_UNSUCCESSFUL = (JobStatus.FAILED, JobStatus.CANCELLED)


class BatchWaitTimeout(WaitTimeout):
    """`Batch.wait` ran out of time (exit 7); names the batch to reattach to, not its job ids."""

    def __init__(self, batch_id: str, unfinished: int, timeout_s: float) -> None:
        DiffgentorError.__init__(
            self,
            f"{unfinished} job(s) of batch {batch_id} still unfinished after {timeout_s:g}s; "
            f"reattach with: diffgentor batch wait {batch_id}",
        )
        self.pending_ids: list[str] = []
        self.batch_id = batch_id
        self.unfinished = unfinished


def batch_store(client: DiffgentorClient) -> BatchStore:
    from worker.batches import BatchStore

    return BatchStore(client.store)


def resolve_batch_id(client: DiffgentorClient, batch: str | Batch | BatchView) -> str:
    """A batch id, or a unique prefix of one (at least 4 characters), as `resolve_job_id` takes jobs."""
    from api_client.refs import resolve_prefix

    if isinstance(batch, Batch | BatchView):
        return batch.id
    return resolve_prefix(
        str(batch),
        noun="batch",
        listing="diffgentor batches",
        lookup=lambda prefix, limit: batch_store(client).resolve_prefix(prefix, limit=limit),
        not_found=BatchNotFound,
    )


def open_batch(client: DiffgentorClient, batch: str | Batch | BatchView) -> Batch:
    from worker.batches import BatchNotFound as MissingBatch

    batch_id = resolve_batch_id(client, batch)
    try:
        return Batch(client, batch_store(client).get(batch_id))
    except MissingBatch:
        raise BatchNotFound(batch_id) from None


def list_batches(
    client: DiffgentorClient, *, limit: int = 50, offset: int = 0, owner: str | None = None
) -> builtins.list[Batch]:
    try:
        views = batch_store(client).list(limit=limit, offset=offset, owner=owner)
    except ValueError as exc:  # limit/offset out of range
        raise UsageError(str(exc)) from None
    return [Batch(client, view) for view in views]


def progress_of(
    client: DiffgentorClient, batches: Sequence[Batch], window_seconds: float
) -> list[BatchProgress]:
    """Counts, throughput and ETA of several batches in two statements (`diffgentor batches`)."""
    return batch_store(client).progress_many([batch.view for batch in batches], window_seconds=window_seconds)


class Batch:
    """A batch record and what can be done with all of its rows at once."""

    def __init__(self, client: DiffgentorClient, view: BatchView) -> None:
        self._client = client
        self.view = view

    def __repr__(self) -> str:
        return f"Batch(id={self.id!r}, name={self.name!r}, job_count={self.job_count})"

    @property
    def id(self) -> str:
        return self.view.id

    @property
    def name(self) -> str:
        return self.view.name

    @property
    def owner(self) -> str:
        return self.view.owner

    @property
    def model_name(self) -> str:
        return self.view.model_name

    @property
    def created_at(self) -> datetime:
        return self.view.created_at

    @property
    def job_count(self) -> int:
        return self.view.job_count

    @property
    def _store(self) -> BatchStore:
        return batch_store(self._client)

    # ---- progress ----------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """status -> number of rows whose latest job has it (every status present)."""
        return self._store.counts(self.id).as_dict()

    def progress(self, window_seconds: float = 600.0) -> BatchProgress:
        """Counts, jobs finished in the last ``window_seconds`` and the ETA that rate gives."""
        return self._store.progress(self.view, window_seconds=window_seconds)

    def wait(
        self,
        timeout: float | None = None,
        progress: bool = False,
        *,
        on_update: Callable[[BatchProgress], None] | None = None,
    ) -> dict[str, int]:
        """Poll the counts (two index-only statements, whatever the size) until no row is queued or
        running; returns the final counts. Raises `WaitTimeout` (a `BatchWaitTimeout` naming the
        batch) when ``timeout`` seconds pass first. Embedded mode: unfinished rows that no process
        runs (an interrupted run's) are run by this process first.

        [issue 11] Subscribed to the batch's events before the first read: a job that starts or
        ends makes it read the counts again at once (never sooner than POLL_COST_FACTOR x the last
        read's time after it; progress at most every poll interval); without events it reads them
        every DG_EVENTS_FALLBACK_SECONDS anyway, or every poll interval when events are off."""
        from worker.events import ReadPacer, Reread

        deadline = None if timeout is None else time.monotonic() + timeout
        watched = self._run_unfinished_here()
        display = BatchProgressDisplay(self.view) if progress else None
        subscription = self._client._subscribe(batch_ids=[self.id])  # before the first read of the counts
        # A huge batch's counts take tens of ms: read them at most every POLL_COST_FACTOR x that
        # (<= ~10 % of a database core); without events: every max(poll interval, that), as before.
        pacer = ReadPacer(
            subscription,
            poll_seconds=self._client.poll_seconds,
            fallback_seconds=self._client.events_fallback_seconds,
            cost_factor=POLL_COST_FACTOR,
        )
        try:
            while True:
                polled = time.monotonic()
                current = self.progress()
                spent = time.monotonic() - polled
                pacer.done(Reread(full=True), spent)
                if display is not None:
                    display.update(current)
                if on_update is not None:
                    on_update(current)
                self._raise_if_runner_stopped(watched)
                if current.counts.unfinished == 0:
                    return current.counts.as_dict()
                if pacer.next(deadline) is None:  # [issue 11] an event, the fallback, or the deadline
                    raise BatchWaitTimeout(self.id, current.counts.unfinished, timeout or 0.0)
        finally:
            subscription.close()
            if display is not None:
                display.close()

    def _run_unfinished_here(self) -> list[str]:
        if not self._client.embedded:
            return []
        ids: list[str] = []
        for page in self._store.job_pages(self.id, statuses=[JobStatus.QUEUED, JobStatus.RUNNING]):
            self._client._run_unfinished_here(page)
            ids.extend(job.id for job in page)
        return ids

    def _raise_if_runner_stopped(self, job_ids: list[str]) -> None:
        runner = self._client.__dict__.get("_embedded_runner")
        error = runner.error_for(job_ids) if job_ids and runner is not None else None
        if error is not None:
            raise DiffgentorError(f"the in-process job runner stopped: {error}")

    # ---- rows --------------------------------------------------------------------------------

    def jobs(self, statuses: Sequence[JobStatus | str] | None = None) -> Iterator[JobView]:
        """The latest job of each row in `batch_index` order, read a page at a time."""
        try:
            wanted = None if statuses is None else [JobStatus(status) for status in statuses]
        except ValueError:
            choices = ", ".join(status.value for status in JobStatus)
            raise UsageError(f"unknown job status in {list(statuses or [])}; use one of {choices}") from None
        return self._store.jobs(self.id, statuses=wanted)

    def failed_jobs(self) -> Iterator[JobView]:
        """Rows whose latest job failed or was cancelled."""
        return self.jobs(_UNSUCCESSFUL)

    # ---- actions -----------------------------------------------------------------------------

    def cancel(self) -> BatchCancel:
        """Queued rows never start; running ones stop at their next step (`.cancelled`, `.stopping`)."""
        return self._store.cancel(self.id)

    def retry_failed(self) -> builtins.list[JobView]:
        """A new queued job (same spec and seed, linked by `retry_of`, same batch index) for every row
        whose latest job failed or was cancelled, published now; returns the new jobs by index."""
        from worker.submission import retry_failed_batch

        self._client._check_before_submit()
        made = retry_failed_batch(self._client.store, self._client._publisher, self.id)
        self._client._run_unfinished_here(made)
        return made

    # ---- results -----------------------------------------------------------------------------

    def fetch(self, folder: str | os.PathLike[str]) -> builtins.list[Path]:
        """Download every succeeded row's PNGs into ``folder`` as ``{batch_index:06d}.png``, or
        ``{batch_index:06d}_{j:02d}.png`` (j = the artifact index) when its job made several images."""
        target = Path(folder)
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputFileError(path_problem(exc, "the fetch folder")) from None
        paths: list[Path] = []
        for job in self.jobs([JobStatus.SUCCEEDED]):
            for artifact, name in zip(
                sorted(job.artifacts, key=lambda a: a.index), artifact_file_names(job), strict=True
            ):
                path = target / name
                self._client._storage_call(
                    functools.partial(self._client.artifacts.download, artifact.uri, path)
                )
                paths.append(path)
        return paths

    def export(self, path: str | os.PathLike[str], format: str | None = None) -> int:
        """Write one record per row (index, job_id, status, seed, prompt, params, artifact_uris,
        sha256, error) as CSV or JSON lines (``format``, else the suffix: .csv, .jsonl/.ndjson);
        written whole or not at all. Returns the number of rows written."""
        from worker.files import atomic_file

        target = Path(path)
        if target.is_dir():
            raise InputFileError(f"cannot use the export file {target}: it is a folder, not a file")
        kind = export_format(target, format)
        written = 0
        try:
            with atomic_file(target) as raw:
                text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
                writer = _record_writer(text, kind)
                for job in self.jobs():
                    writer(export_record(job))
                    written += 1
                text.flush()
                text.detach()  # atomic_file closes the binary file itself
        except OSError as exc:
            if exc.filename is None:
                raise
            raise InputFileError(path_problem(exc, "the export file")) from None
        return written


def artifact_file_names(job: JobView) -> list[str]:
    """`{index:06d}.png` for a job with one image, `{index:06d}_{j:02d}.png` for each of several."""
    index = job.batch_index or 0
    artifacts = sorted(job.artifacts, key=lambda a: a.index)
    if len(artifacts) == 1:
        return [f"{index:06d}.png"]
    return [f"{index:06d}_{artifact.index:02d}.png" for artifact in artifacts]


def export_format(path: Path, format: str | None) -> str:
    if format is not None:
        if format not in EXPORT_FORMATS:
            raise UsageError(f"unknown export format {format!r}; use one of {', '.join(EXPORT_FORMATS)}")
        return format
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise UsageError(
        f"cannot tell the export format of {path} from its suffix: name it .csv or .jsonl, or pass --format"
    )


def export_record(job: JobView) -> dict[str, Any]:
    artifacts = sorted(job.artifacts, key=lambda a: a.index)
    error = f"{job.error_type}: {job.error_message}" if job.error_type else ""
    return {
        "index": job.batch_index,
        "job_id": job.id,
        "status": job.status.value,
        "seed": job.seed,
        "prompt": job.spec.get("prompt", job.spec.get("instruction", "")),
        "params": job.spec.get("params", {}),
        "artifact_uris": [artifact.uri for artifact in artifacts],
        "sha256": [artifact.sha256 for artifact in artifacts],
        "error": error,
    }


def _record_writer(out: TextIO, kind: str) -> Callable[[dict[str, Any]], None]:
    if kind == "jsonl":

        def write_line(record: dict[str, Any]) -> None:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")

        return write_line
    writer = csv.DictWriter(out, fieldnames=EXPORT_COLUMNS)
    writer.writeheader()

    def write_csv(record: dict[str, Any]) -> None:
        # Lists and the params object as JSON text, one cell each; no value -> an empty cell.
        writer.writerow(
            {
                key: json.dumps(value, ensure_ascii=False) if isinstance(value, list | dict) else value
                for key, value in record.items()
            }
        )

    return write_csv


# ------------------------------------------------------------------------------------ display


def bar_text(counts: BatchCounts, width: int = 20) -> str:
    """`[########------------]  40%` of the rows finished."""
    total = counts.total
    fraction = counts.finished / total if total else 1.0
    filled = min(width, int(fraction * width))
    return f"[{'#' * filled}{'-' * (width - filled)}] {fraction * 100:3.0f}%"


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def progress_text(progress: BatchProgress) -> str:
    """One line: bar, finished/total, counts per status, rate over the window and ETA."""
    counts = progress.counts
    parts = " ".join(f"{status}={n}" for status, n in counts.as_dict().items())
    window = duration_text(progress.window_seconds)
    return (
        f"{bar_text(counts)} {counts.finished}/{counts.total} finished  {parts}  "
        f"{progress.per_minute:.1f}/min (last {window})  eta {duration_text(progress.eta_seconds)}"
    )


class BatchProgressDisplay:
    """`Batch.wait(progress=True)`: a tqdm bar of finished rows on a terminal, else a plain line
    when a row finishes, at most every `PLAIN_INTERVAL_SECONDS` (and the last one)."""

    def __init__(self, batch: BatchView, stream: TextIO | None = None, *, plain: bool | None = None) -> None:
        self._stream = stream or sys.stderr
        self._name = batch.name or batch.id[:8]
        is_terminal = _is_terminal(self._stream)
        self._plain = (not is_terminal) if plain is None else plain
        self._bar: Any = None
        self._last_line_at: float | None = None
        self._last_finished: int | None = None
        self._done_shown = False
        if not self._plain:
            from tqdm import tqdm

            self._bar = tqdm(
                total=batch.job_count,
                desc=f"batch {self._name}",
                unit="job",
                file=self._stream,
                dynamic_ncols=True,
            )

    def update(self, progress: BatchProgress) -> None:
        counts = progress.counts
        status = (
            f"ok {counts.succeeded}, failed {counts.failed}, cancelled {counts.cancelled}, "
            f"running {counts.running}, queued {counts.queued}; {progress.per_minute:.1f}/min, "
            f"eta {duration_text(progress.eta_seconds)}"
        )
        if self._bar is not None:
            self._bar.total = counts.total
            self._bar.n = counts.finished
            self._bar.set_postfix_str(status, refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        due = self._last_line_at is None or now - self._last_line_at >= PLAIN_INTERVAL_SECONDS
        done = counts.unfinished == 0 and not self._done_shown
        if done or (due and counts.finished != self._last_finished):
            line = f"batch {self._name}: {counts.finished}/{counts.total} finished ({status})"
            self._stream.write(line + "\n")
            self._stream.flush()
            self._last_line_at = now
            self._last_finished = counts.finished
            self._done_shown = counts.unfinished == 0

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
