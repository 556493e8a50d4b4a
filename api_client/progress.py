"""Progress while waiting on jobs: jobs finished, plus the denoising steps of the running ones.

On a terminal this is a tqdm bar: it counts jobs, running jobs add their step fraction so a single
long job still moves, and the postfix shows each running job's ``step/total``. When the stream is
not a terminal (a log file, CI, `2> log`), carriage-return redraws would pile up into one unreadable
line, so plain lines are written instead: one whenever a job finishes and at most one every
``plain_interval_seconds`` while steps advance. Everything goes to stderr so stdout stays scriptable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from tqdm import tqdm

PLAIN_INTERVAL_SECONDS = 10.0
_SHOWN_RUNNING = 4


@dataclass(frozen=True)
class JobProgress:
    job_id: str
    finished: bool
    step: int | None = None  # set while the job runs
    total: int | None = None


class WaitProgressBar:
    def __init__(
        self,
        total_jobs: int,
        description: str = "jobs",
        stream: TextIO | None = None,
        *,
        plain: bool | None = None,
        plain_interval_seconds: float = PLAIN_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``plain=None``: a tqdm bar when ``stream`` is a terminal, plain lines otherwise."""
        self._stream = stream or sys.stderr
        self._total = total_jobs
        self._description = description
        self._plain = (not _is_terminal(self._stream)) if plain is None else plain
        self._interval = plain_interval_seconds
        self._clock = clock
        self._started = clock()
        self._last_line_at: float | None = None
        self._last_state: tuple[object, ...] | None = None
        self._last_counts: tuple[object, ...] | None = None
        self._n = 0.0
        self._bar: tqdm | None = None
        if not self._plain:
            self._bar = tqdm(
                total=total_jobs,
                desc=description,
                unit="job",
                file=self._stream,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.2f}/{total} jobs [{elapsed}<{remaining}]{postfix}",
                dynamic_ncols=True,
            )

    @property
    def plain(self) -> bool:
        return self._plain

    @property
    def n(self) -> float:
        """Jobs done, counting the step fraction of running ones (what the bar shows)."""
        return self._n

    def update(self, jobs: list[JobProgress], notice: str | None = None) -> None:
        """``notice``: a line-end hint (e.g. that no live worker serves the waiting jobs)."""
        finished = sum(1 for job in jobs if job.finished)
        running = [job for job in jobs if not job.finished and job.step is not None and job.total]
        # A job at its last step is still decoding/uploading: it only counts as 1 once finished.
        fraction = sum(min((job.step or 0) / (job.total or 1), 0.99) for job in running)
        self._n = finished + fraction
        steps = " ".join(f"{job.job_id[:8]}:{job.step}/{job.total}" for job in running[:_SHOWN_RUNNING])
        more = f" +{len(running) - _SHOWN_RUNNING}" if len(running) > _SHOWN_RUNNING else ""
        status = f"done {finished}, running {len(running)} {steps}{more}".rstrip()
        if self._bar is not None:
            self._bar.n = self._n
            self._bar.set_postfix_str(f"{status}; {notice}" if notice else status, refresh=False)
            self._bar.refresh()
            return
        waiting = len(jobs) - finished - len(running)
        detail = f" ({steps}{more})" if running else ""
        summary = f"{finished}/{self._total} finished, {len(running)} running{detail}, {waiting} waiting"
        if notice:
            summary += f"; {notice}"
        counts = (finished, tuple(job.job_id for job in running), notice is not None)
        self._plain_update(counts, summary, (counts, tuple(job.step for job in running)))

    def _plain_update(self, counts: tuple[object, ...], summary: str, state: tuple[object, ...]) -> None:
        now = self._clock()
        line = f"{self._description}: {summary} [{_clock_text(now - self._started)}]"
        if state == self._last_state:
            return
        due = self._last_line_at is None or now - self._last_line_at >= self._interval
        if counts != self._last_counts or due:  # a job started or finished, or the interval passed
            self._stream.write(line + "\n")
            self._stream.flush()
            self._last_line_at = now
            self._last_state = state
            self._last_counts = counts

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> WaitProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real file
        return False


def _clock_text(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"
