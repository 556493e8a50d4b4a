"""Embedded mode on the producer side: run submitted jobs on one background thread.

`worker.embedded.InProcessPublisher` runs a job inside `publish()`. Calling it from a background
thread lets `submit_many` return at once and `wait` poll the job table like it does against real
workers, so the progress bar shows steps in embedded mode too.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from typing import Any

from schemas.enums import JobStatus
from schemas.tables import utcnow
from schemas.views import JobView

log = logging.getLogger(__name__)
THREAD_NAME = "diffgentor-embedded"


def quiet_library_progress_bars() -> None:
    """Turn off the tqdm bars of transformers, diffusers and huggingface_hub in this process.

    Embedded jobs load the model on the runner thread while the CLI draws its own progress bar;
    the libraries' "Loading weights" / "Writing model shards" bars would interleave with it (and
    flood logs). Called only where this process is about to load or write model weights, so a
    queue-mode producer never imports those libraries. Warnings and errors still print.
    """
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def runner_thread_alive() -> bool:
    """True while a job runs on an embedded runner thread in this process."""
    return any(thread.name == THREAD_NAME and thread.is_alive() for thread in threading.enumerate())


class EmbeddedRunner:
    def __init__(self, store: Any, publisher: Any, *, lease_seconds: float) -> None:
        self._store = store
        self._publisher = publisher
        self._lease_seconds = lease_seconds
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._known: set[str] = set()
        # Per job: an error that stopped one job's run must not abort waits on other jobs, and a
        # later enqueue of the same job (the next wait) runs it again instead of failing at once.
        self._errors: dict[str, BaseException] = {}

    def error_for(self, job_ids: Iterable[str]) -> BaseException | None:
        """The error that stopped the run of one of these jobs, if any."""
        return next((self._errors[job_id] for job_id in job_ids if job_id in self._errors), None)

    def enqueue(self, jobs: Iterable[JobView]) -> None:
        from worker.jobstore import publish_target

        # Most urgent first, then submission order, as the worker queue would; each job once.
        for job in sorted(jobs, key=lambda job: -job.priority):
            if job.id not in self._known:
                self._known.add(job.id)
                self._errors.pop(job.id, None)
                self._queue.put(publish_target(job))
        if self._thread is None or not self._thread.is_alive():
            # Daemon: on Ctrl-C the process may exit; unfinished jobs stay in the table for a rerun.
            self._thread = threading.Thread(target=self._loop, name=THREAD_NAME, daemon=True)
            self._thread.start()

    def join(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()

    def _loop(self) -> None:
        while True:
            target = self._queue.get()
            try:
                self._run(target)
            except Exception as exc:  # surfaced by DiffgentorClient.wait of this job, as one line
                log.debug("embedded job %s could not be run", target.job_id, exc_info=True)
                self._errors[target.job_id] = exc
                self._known.discard(target.job_id)  # may be enqueued again
            finally:
                self._queue.task_done()

    def _run(self, target: Any) -> None:
        self._store.mark_published([target.job_id])
        # A job left `running` by a killed earlier process is refused until its lease expires;
        # try again until then so a rerun still completes it.
        deadline = time.monotonic() + self._lease_seconds * 1.5
        while True:
            self._publisher.publish([target])
            job = self._store.get(target.job_id)
            if job.is_terminal:
                return
            if job.status == JobStatus.QUEUED and job.available_at is not None:
                # Handed back after an infrastructure fault: run it again when it is due.
                time.sleep(max(0.0, (job.available_at - utcnow()).total_seconds()))
                continue
            if time.monotonic() >= deadline:
                return
            time.sleep(1.0)
