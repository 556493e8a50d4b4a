"""Start a GPU worker for one model queue (what `diffgentor worker --model_name deepgen` runs).

Pool choice: prefork with one child (the default). The parent never imports torch or opens
CUDA; the child loads the model lazily on its first job and keeps it. Before Celery starts, a
preflight child process (`python -m worker.preflight`) checks that the config fits the checkpoint,
the device exists and the tokenizer has the image token: a worker that cannot run jobs exits
instead of consuming and failing the queue (`DG_SKIP_PREFLIGHT=1` skips it). Prefork is the only
pool where the soft and hard time limits are enforced, and a child killed by the hard limit
or the OOM killer is replaced while the parent keeps its broker connection (the job is then
retried under the attempts cap). `solo` is available for debugging (no fork, no time limits).
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from collections.abc import Sequence
from typing import Literal

from schemas.specs import DEFAULT_MODEL_NAME, MODEL_NAME_PATTERN
from worker.publish import queue_name
from worker.settings import Settings, load_settings

Pool = Literal["prefork", "solo", "threads"]


def worker_argv(
    model_name: str,
    *,
    pool: Pool = "prefork",
    concurrency: int = 1,
    loglevel: str = "INFO",
    sweeper: bool = False,
    beat: bool = False,
    node_name: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    if not MODEL_NAME_PATTERN.match(model_name):
        raise ValueError(f"--model_name {model_name!r}: use letters, digits, '_', '.' and '-' only")
    if concurrency != 1:
        raise ValueError("concurrency must be 1: one worker process owns one GPU and one resident model")
    from worker.celery_app import SWEEP_QUEUE

    queues = [queue_name(model_name)] + ([SWEEP_QUEUE] if sweeper else [])
    node = node_name or f"{model_name}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    argv = [
        "worker",
        "-Q",
        ",".join(queues),
        "--pool",
        pool,
        "--concurrency",
        str(concurrency),
        "--prefetch-multiplier",
        "1",
        "--loglevel",
        loglevel,
        "-n",
        node,
        "--without-gossip",
        "--without-mingle",
    ]
    if beat:
        argv.append("--beat")
    return [*argv, *extra_args]


def start_worker(
    model_name: str,
    settings: Settings | None = None,
    *,
    pool: Pool = "prefork",
    concurrency: int = 1,
    loglevel: str = "INFO",
    sweeper: bool = False,
    beat: bool = False,
    node_name: str | None = None,
    extra_args: Sequence[str] = (),
    preflight: bool = True,
) -> None:
    """Run a worker in this process until it is shut down (SIGTERM: warm, finishes the job).

    First the preflight (unless `preflight=False` or DG_SKIP_PREFLIGHT=1): `worker.preflight.PreflightError`
    (one short line; the CLI exits 4) when the model cannot run, before anything is consumed.
    """
    settings = settings or load_settings()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a worker never downloads weights
    argv = worker_argv(
        model_name,
        pool=pool,
        concurrency=concurrency,
        loglevel=loglevel,
        sweeper=sweeper,
        beat=beat,
        node_name=node_name,
        extra_args=extra_args,
    )
    from worker.preflight import SKIP_VARIABLE, check_in_subprocess, skip_requested

    if not preflight or skip_requested():
        print(f"preflight skipped ({SKIP_VARIABLE}=1)" if preflight else "preflight skipped", file=sys.stderr)
    else:
        # A child process: it imports torch and may touch CUDA, which this prefork parent must never do.
        print(check_in_subprocess(loglevel=loglevel), file=sys.stderr, flush=True)
    from worker import tasks
    from worker.celery_app import app, configure_app

    configure_app(app, settings)
    tasks.configure(settings)
    app.worker_main(argv=argv)


if __name__ == "__main__":  # python -m worker.main MODEL_NAME
    from worker.preflight import EXIT_CONFIGURATION, PreflightError

    try:
        start_worker(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL_NAME)
    except PreflightError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_CONFIGURATION)
