"""Celery tasks: run one job (by id), and the periodic sweep.

The runner, its database engine and the DeepGen model are created lazily on the first
task, i.e. inside the prefork child: nothing CUDA-related exists in the parent that forks.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING

from celery.exceptions import Reject
from celery.worker import state as worker_state
from celery.worker.request import Request

from worker import hooks, metrics, process
from worker.celery_app import SWEEP_TASK_NAME, app
from worker.finisher import Finisher, process_finisher
from worker.publish import RUN_JOB_TASK_NAME
from worker.runner import JobRunner, ResidentEngine, RunOutcome, load_deepgen_engine
from worker.settings import Settings
from worker.transient import one_line

if TYPE_CHECKING:
    from worker.sweeper import Sweeper

log = logging.getLogger(__name__)

# Operations hooks (docs/operations.md): /metrics and the workers-table heartbeat, both in
# the process that runs jobs (the prefork child, or the main process with --pool solo).
hooks.install(app)

_runner: JobRunner | None = None
_sweeper: Sweeper | None = None
# Back-off before a delivery whose claim met a database error goes back to the queue.
DB_RETRY_MIN_SECONDS = 1.0
DB_RETRY_MAX_SECONDS = 30.0
_db_failures = 0  # consecutive, in this process


def configure(settings: Settings) -> None:
    """Settings for the jobs of this worker (set in the parent, inherited by prefork children)."""
    global _runner, _sweeper
    process.configure(settings)
    _runner = None
    if _sweeper is not None:
        _sweeper.close()
    _sweeper = None


settings = process.settings
worker_id = process.worker_id


def runner() -> JobRunner:
    global _runner
    if _runner is None:
        _runner = JobRunner.from_settings(
            settings(), ResidentEngine(metrics.instrument_engine(load_deepgen_engine))
        )
        _runner.on_done = hooks.finish_done  # [issue 13] a handed-over job's end, for metrics/registry
    return _runner


def finisher() -> Finisher | None:
    """[issue 13] The process's finisher when DG_OVERLAP_FINISH is on and a Celery worker delivered
    the task; a direct call (`run_job.run(id)`, tests, tools) finishes in line."""
    if not settings().overlap_finish or run_job.request.called_directly:
        return None
    return process_finisher(settings().finish_timeout_seconds)


class JobRequest(Request):
    """A run_job request; its hard-time-limit path records the job as failed.

    The hard limit kills the prefork child, so nothing in the job body runs; without this the
    job would stay `running` until its lease expired and then be retried up to the attempts
    cap. This runs in the worker's main process, before the child is killed; the write is
    fenced on the killed child's `host:pid:` worker-id prefix and on status `running`.
    """

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if soft or worker_state.should_terminate:  # soft: the job body handles it; cold shutdown: not a limit
            return
        job_id = self.args[0] if self.args else None
        if not isinstance(job_id, str) or self.worker_pid is None:
            return
        from sqlalchemy.pool import NullPool

        from worker.db import make_engine, session_factory
        from worker.errors import hard_time_limit_message
        from worker.jobstore import JobStore

        # A throwaway engine without a pool: no connection of the main process leaks into
        # the prefork child that replaces the killed one.
        engine = make_engine(settings().database_url, poolclass=NullPool)
        try:
            recorded = JobStore(session_factory(engine)).fail_killed_process_job(
                job_id,
                f"{socket.gethostname()}:{self.worker_pid}:",
                error_type="TimeLimitExceeded",
                error_message=hard_time_limit_message(timeout),
            )
        except Exception:
            log.exception("could not record the hard time limit of job %s; its lease will expire", job_id)
            return
        finally:
            engine.dispose()
        log.warning(
            "job %s %s at the hard time limit (%ss)",
            job_id,
            "failed" if recorded else "was not owned by the killed process",
            timeout,
        )


@app.task(name=RUN_JOB_TASK_NAME, ignore_result=True, Request=JobRequest)
def run_job(job_id: str) -> str:
    if not isinstance(job_id, str) or not job_id:
        log.error("run_job got a malformed job id %r; dropping the message", job_id)
        return RunOutcome.SKIPPED.value
    global _db_failures
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.exc import TimeoutError as PoolTimeout

    try:
        outcome = runner().run(job_id, worker_id(), finisher())
    except (DBAPIError, PoolTimeout) as exc:
        # The database failed before or during the claim (a failure inside the job body is
        # recorded by the runner): acking now would lose the only message of a queued job.
        # Put it back after a short, growing pause; the worker keeps serving, and a claim
        # that did commit is taken up again by this same worker (`claims.claim`).
        _db_failures += 1
        pause = min(DB_RETRY_MAX_SECONDS, DB_RETRY_MIN_SECONDS * 2 ** (_db_failures - 1))
        log.warning(
            "database error while claiming job %s (%s); requeueing it in %.0f s",
            job_id,
            type(exc).__name__,
            pause,
        )
        time.sleep(pause)
        # `from None`: Celery logs the reject; the chain would add a full traceback per try.
        raise Reject(f"database error: {one_line(exc)}", requeue=True) from None
    _db_failures = 0
    return outcome.value


def sweeper() -> Sweeper:
    """One job store and publisher per process for the beat sweep, not a new engine and app each time."""
    global _sweeper
    if _sweeper is None:
        from worker.sweeper import Sweeper

        _sweeper = Sweeper(settings())
    return _sweeper


@app.task(name=SWEEP_TASK_NAME, ignore_result=True)
def sweep() -> dict[str, int | str]:
    """One beat sweep; a fault is one log line and the next beat tries again (the task never raises)."""
    try:
        report = sweeper().sweep()
    except Exception as exc:
        log.warning("sweep failed (%s); the next beat tries again", one_line(exc))
        return {"error": one_line(exc)}
    return {
        "unpublished": len(report.unpublished),
        "expired": len(report.expired),
        "stale": len(report.stale),
    }
