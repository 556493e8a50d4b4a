"""Embedded mode on the client side: all a `DiffgentorClient` without a broker does differently.

Without `DG_BROKER_URL` no worker reads this job table, so the client runs its jobs itself:

* `EmbeddedRunner` is the client's publisher. The client submits through
  `worker.submission.submit_jobs` / `retry_job` exactly as in queue mode; `publish()` queues the
  job ids for ONE background thread, which runs them through `worker.embedded.InProcessPublisher`
  (the same `JobRunner` as a Celery worker). `submit_many` returns at once and `wait` polls the
  job table as it does against real workers, so the progress bar shows steps in embedded mode too.
* `EmbeddedRunner.resume()` runs jobs that an interrupted earlier run left unfinished (`wait` finds
  them, or a submit's idempotency key): nobody else would.
* `EngineCheck` validates `DG_DEEPGEN_*` and runs the worker's preflight before the first job row
  is written; `check_model_runtime()` says which extra to install when the model libraries are missing.
* Exit hook: at interpreter exit (a script that never called `close()`, or left its `with` block on
  an exception) `EmbeddedRunner.stop()` runs: jobs not started stay `queued` (the next `wait` or
  `diffgentor wait` runs them), and the job running is cancelled, so it stops at its next denoising
  step and ends `cancelled` (`retry` runs it again). The thread is joined before the interpreter tears
  down, so no thread is left inside torch (which aborted the process with "terminate called without
  an active exception"). `finish()` (the client's `close()`) runs what is queued and drops the hook.

`worker/embedded.py` holds only the worker side (run a job now, in this process), which the embedded
`diffgentor sweep` uses too; nothing under `worker/` imports this module.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from api_client.errors import MODEL_EXTRA_MODULES, ConfigurationError, MissingExtra
from schemas.enums import JobStatus
from schemas.tables import utcnow
from schemas.views import JobView

if TYPE_CHECKING:
    from worker.jobstore import PublishTarget
    from worker.settings import Settings

log = logging.getLogger(__name__)
THREAD_NAME = "diffgentor-embedded"
_STOP_POLL_SECONDS = 0.2


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


def check_model_runtime() -> None:
    """Embedded mode runs the model in this process: `MissingExtra` (naming the extra to install) when
    the model libraries (`diffgentor[deepgen]`) are missing, before any job row is written."""
    import importlib.util

    for module in MODEL_EXTRA_MODULES:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise MissingExtra(module)


class EngineCheck:
    """Embedded jobs load the engine in this process: validate `DG_DEEPGEN_*` and run the worker's
    preflight (config fits the checkpoint, device present, image token in the tokenizer) before any
    job is submitted; `ConfigurationError` otherwise.

    Once per set of DG_DEEPGEN_* values (a pass is cached, a failure is not); DG_SKIP_PREFLIGHT=1
    skips the preflight.
    """

    def __init__(self) -> None:
        self._passed: tuple[tuple[str, str], ...] | None = None

    def __call__(self) -> None:
        from worker.deepgen.env import DeepGenEnvError, read_deepgen_env
        from worker.preflight import PreflightError, deepgen_variables, run_preflight, skip_requested

        variables = deepgen_variables(os.environ)
        if self._passed == variables:
            return
        try:
            read_deepgen_env(os.environ)
        except DeepGenEnvError as exc:
            raise ConfigurationError(
                f"{exc} (the embedded default runs the model in this process; "
                "set the DG_DEEPGEN_* variables or run `diffgentor demo` for a tiny test model)"
            ) from None
        if not skip_requested(os.environ):
            try:
                run_preflight(os.environ)
            except PreflightError as exc:
                raise ConfigurationError(str(exc)) from None
        self._passed = variables


class EmbeddedRunner:
    """A `worker.publish.Publisher` that runs the published jobs on one background thread."""

    def __init__(
        self,
        store: Any,
        publisher: Any,
        *,
        lease_seconds: float,
        engine_check: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._publisher = publisher  # runs one job inside publish(): worker.embedded.InProcessPublisher
        self._lease_seconds = lease_seconds
        self._engine_check = engine_check
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._known: set[str] = set()
        # Per job: an error that stopped one job's run must not abort waits on other jobs, and a
        # later enqueue of the same job (the next wait) runs it again instead of failing at once.
        self._errors: dict[str, BaseException] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._current: Any = None  # the target being run, while one is

    @classmethod
    def for_client(
        cls,
        settings: Settings,
        store: Any,
        artifact_store: Any,
        *,
        engine_check: Callable[[], None] | None = None,
    ) -> EmbeddedRunner:
        """The runner of a client: its database and storage (no second engine, migration run or
        S3 client), the library progress bars off, `stop` registered to run at interpreter exit."""
        check_model_runtime()
        from worker.embedded import InProcessPublisher

        # The engine loads in this process on the first job: keep library bars off our progress bar.
        quiet_library_progress_bars()
        publisher = InProcessPublisher.from_settings(settings, store=store, artifact_store=artifact_store)
        runner = cls(store, publisher, lease_seconds=settings.lease_seconds, engine_check=engine_check)
        # A script that ends without close(): stop the runner thread before the interpreter tears
        # down (a thread still inside torch then aborts the process). Unregistered by finish().
        atexit.register(runner.stop)
        return runner

    def error_for(self, job_ids: Iterable[str]) -> BaseException | None:
        """The error that stopped the run of one of these jobs, if any."""
        return next((self._errors[job_id] for job_id in job_ids if job_id in self._errors), None)

    def publish(self, targets: Sequence[PublishTarget]) -> None:
        """Queue the jobs for the runner thread (started when needed); returns at once."""
        # Most urgent first, then submission order, as the worker queue would; each job once.
        if self._stopping.is_set():
            return  # the interpreter is exiting: the jobs stay queued for a later wait
        for target in sorted(targets, key=lambda target: -target.priority):
            if target.job_id not in self._known:
                self._known.add(target.job_id)
                self._errors.pop(target.job_id, None)
                self._queue.put(target)
        if self._thread is None or not self._thread.is_alive():
            # Daemon: on Ctrl-C the process may exit; unfinished jobs stay in the table for a rerun.
            self._thread = threading.Thread(target=self._loop, name=THREAD_NAME, daemon=True)
            self._thread.start()

    def enqueue(self, jobs: Iterable[JobView]) -> None:
        from worker.jobstore import publish_target

        self.publish([publish_target(job) for job in jobs])

    def resume(self, jobs: Iterable[JobView]) -> None:
        """Run unfinished jobs of an earlier, interrupted run here (the DeepGen variables checked first).

        A job this runner already has (queued, running or done) is not run again.
        """
        if self._engine_check is not None:
            self._engine_check()
        self.enqueue(jobs)

    def join(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.join()

    def finish(self) -> None:
        """Run every queued job to its end; then nothing is left for the exit hook to stop."""
        self.join()
        atexit.unregister(self.stop)

    def stop(self) -> None:
        """Stop at interpreter exit: jobs not started stay queued, the running one is cancelled.

        Returns once the runner thread has ended, so it is never inside torch while the
        interpreter shuts down. Idempotent.
        """
        thread = self._thread
        with self._lock:
            self._stopping.set()
            current = self._current
        left = self._drain()
        if thread is None or not thread.is_alive():
            return
        if current is not None or left:
            running = f"cancelling job {current.job_id} at its next step" if current is not None else ""
            queued = (
                f"{len(left)} job(s) not started stay queued (`diffgentor wait` runs them)" if left else ""
            )
            print(
                f"diffgentor: interpreter exit: {'; '.join(part for part in (running, queued) if part)}",
                file=sys.stderr,
                flush=True,
            )
        self._queue.put(None)  # ends the loop once the current job is over
        cancelled = False
        while thread.is_alive():
            if current is not None and not cancelled:
                cancelled = self._cancel_if_ours(current.job_id)
            thread.join(_STOP_POLL_SECONDS)

    def _drain(self) -> list[str]:
        left: list[str] = []
        while True:
            try:
                target = self._queue.get_nowait()
            except queue.Empty:
                return left
            if target is not None:
                left.append(target.job_id)
                self._known.discard(target.job_id)
            self._queue.task_done()

    def _cancel_if_ours(self, job_id: str) -> bool:
        """Cancel the job once this process runs it (True when done or nothing is left to do)."""
        try:
            job = self._store.get(job_id)
            if job.is_terminal or job.cancel_requested:
                return True
            if job.status != JobStatus.RUNNING:
                return False  # not claimed yet: look again on the next poll
            if job.worker_id != getattr(self._publisher, "worker_id", None):
                return True  # another process's job (left by a killed run): not ours to cancel
            self._store.cancel(job_id)
            return True
        except Exception:  # the job database is gone: the lease expires and a rerun takes over
            log.debug("could not cancel embedded job %s at exit", job_id, exc_info=True)
            return True

    def _loop(self) -> None:
        while True:
            target = self._queue.get()
            with self._lock:
                stopping = self._stopping.is_set()
                self._current = None if stopping else target
            if target is None or stopping:
                self._queue.task_done()
                if target is None:
                    return
                continue
            try:
                self._run(target)
            except Exception as exc:  # surfaced by DiffgentorClient.wait of this job, as one line
                log.debug("embedded job %s could not be run", target.job_id, exc_info=True)
                self._errors[target.job_id] = exc
                self._known.discard(target.job_id)  # may be enqueued again
            finally:
                with self._lock:
                    self._current = None
                self._queue.task_done()

    def _run(self, target: Any) -> None:
        # Marked again when it starts (a resumed job may never have been): an embedded
        # `diffgentor sweep` then leaves it alone until it is stale.
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
                if self._stopping.wait(max(0.0, (job.available_at - utcnow()).total_seconds())):
                    return  # interpreter exit: it stays queued
                continue
            if time.monotonic() >= deadline or self._stopping.wait(1.0):
                return
