"""A tqdm bar for waiting on jobs: jobs finished, plus the denoising steps of the running ones.

The bar counts jobs; running jobs add their step fraction so a single long job still moves, and the
postfix shows each running job's ``step/total``. It writes to stderr so stdout stays scriptable.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

from tqdm import tqdm


@dataclass(frozen=True)
class JobProgress:
    job_id: str
    finished: bool
    step: int | None = None  # set while the job runs
    total: int | None = None


class WaitProgressBar:
    def __init__(self, total_jobs: int, description: str = "jobs", stream: TextIO | None = None) -> None:
        self._bar = tqdm(
            total=total_jobs,
            desc=description,
            unit="job",
            file=stream or sys.stderr,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.2f}/{total} jobs [{elapsed}<{remaining}]{postfix}",
            dynamic_ncols=True,
        )

    def update(self, jobs: list[JobProgress]) -> None:
        finished = sum(1 for job in jobs if job.finished)
        running = [job for job in jobs if not job.finished and job.step is not None and job.total]
        # A job at its last step is still decoding/uploading: it only counts as 1 once finished.
        fraction = sum(min((job.step or 0) / (job.total or 1), 0.99) for job in running)
        self._bar.n = finished + fraction
        steps = " ".join(f"{job.job_id[:8]}:{job.step}/{job.total}" for job in running[:4])
        more = f" +{len(running) - 4}" if len(running) > 4 else ""
        self._bar.set_postfix_str(f"done {finished}, running {len(running)} {steps}{more}".rstrip(), refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> WaitProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
