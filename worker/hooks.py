"""Celery wiring of the operations hooks, in one place (connected by `worker.tasks`).

In the process that runs jobs (the prefork child, or the main process with `--pool solo`):
the Prometheus exporter and the per-delivery timings (`worker.metrics`), and the worker's
presence in the workers table (`worker.registry`). The registry and the metrics modules know
nothing of Celery; this module only connects their operations to Celery's signals.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from worker import metrics, process
from worker.registry import Presence, WorkerRegistry, node_name

log = logging.getLogger(__name__)

_installed = False
_presence: Presence | None = None
_node: str | None = None  # this worker's Celery node name, set in the main process by `worker_init`

# [issue 13] Overlapped finish: a task that returns `finishing` has handed its job to the finisher
# thread; the job ends (metrics, registry) when that thread reports it through `finish_done`,
# possibly after the next job's task started. `_current` is the job whose task is running now.
_lock = threading.Lock()
_current: str | None = None
_finishing: dict[str, float] = {}  # job id -> perf_counter at its task's start
_ended_early: dict[str, str] = {}  # job id -> outcome, when the finish beat its task's postrun
FINISHING = "finishing"


def current_presence() -> Presence | None:
    return _presence


def model_queues(app: Any) -> list[str]:
    """The model queues this worker consumes (`-Q`), without the sweeper's queue."""
    from worker.celery_app import SWEEP_QUEUE

    return [name for name in app.amqp.queues.consume_from or {} if name != SWEEP_QUEUE]


def remember_node(sender: object = None, **_: object) -> None:
    """`worker_init` handler: the WorkController, in the main process before the pool starts.

    Prefork children inherit the name, so it is there even where `worker_process_init`
    carries no sender (Celery < 5.6 sends None; 5.6+ sends the node name, which wins).
    """
    global _node
    _node = node_name(getattr(sender, "hostname", None)) or _node


def install(app: Any) -> None:
    """Connect the hooks to Celery's signals once per process."""
    from celery import signals

    from worker.publish import RUN_JOB_TASK_NAME

    global _installed
    if _installed:
        return
    _installed = True
    started: dict[str, float] = {}

    def on_process_init(sender: object = None, **_: object) -> None:
        global _presence
        queues = model_queues(app)
        model = queues[0] if queues else "unknown"
        metrics.set_model(model)
        port = metrics.metrics_port()
        if port:
            try:
                metrics.start_exporter(model, queues, app.conf.broker_url, port)
            except OSError:  # the worker still serves jobs; the scrape target shows it down
                log.exception("could not serve metrics on port %d", port)
        from worker.db import make_engine, session_factory

        try:
            settings = process.settings()
            registry = WorkerRegistry(session_factory(make_engine(settings.database_url)))
            presence = Presence(
                registry,
                process.worker_id(),
                model_name=model,
                queue=",".join(queues),
                interval_seconds=settings.heartbeat_seconds,
                node=node_name(sender) or _node,
            )
            presence.start()
        except Exception:  # jobs still run; `diffgentor health` shows no worker for this model
            log.exception("could not register this worker in the workers table")
            return
        _presence = presence

    def on_prerun(task_id: str, task: Any, args: tuple[object, ...] = (), **_: object) -> None:
        global _current
        if getattr(task, "name", None) != RUN_JOB_TASK_NAME:
            return
        started[task_id] = time.perf_counter()
        with _lock:
            _current = str(args[0]) if args else None
            metrics.job_started(metrics.current_model())
            if _presence is not None and args:
                _presence.job_started(str(args[0]))

    def on_postrun(
        task_id: str, task: Any, args: tuple[object, ...] = (), retval: object = None, **_: object
    ) -> None:
        global _current
        if getattr(task, "name", None) != RUN_JOB_TASK_NAME:
            return
        status = retval if isinstance(retval, str) else "error"
        began = started.pop(task_id, None)
        job_id = str(args[0]) if args else None
        with _lock:
            _current = None
            if status == FINISHING and job_id is not None:
                early = _ended_early.pop(job_id, None)
                if early is None:  # the finisher thread reports the end (`finish_done`)
                    _finishing[job_id] = began if began is not None else time.perf_counter()
                    return
                status = early
            _job_ended(job_id, status, began)

    def on_shutdown(**_: object) -> None:
        global _presence
        from worker.finisher import drain_process_finisher

        # [issue 13] warm shutdown: the handed-over finish completes before the process exits
        # (each finish has its own deadline, DG_FINISH_TIMEOUT_SECONDS).
        drain_process_finisher()
        presence, _presence = _presence, None
        if presence is not None:
            presence.stop()

    signals.worker_init.connect(remember_node, weak=False)
    signals.worker_process_init.connect(on_process_init, weak=False)
    signals.task_prerun.connect(on_prerun, weak=False)
    signals.task_postrun.connect(on_postrun, weak=False)
    # prefork child: worker_process_shutdown; solo pool (no child): worker_shutdown.
    signals.worker_process_shutdown.connect(on_shutdown, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)


def _job_ended(job_id: str | None, status: str, began: float | None) -> None:
    """Record the end of a job's delivery (called with `_lock` held). The next job may already be
    current (overlapped finish): the busy gauge and the registry's current job stay on it."""
    model = metrics.current_model()
    busy = _current is not None or bool(_finishing)
    if began is not None:
        metrics.job_finished(model, status, time.perf_counter() - began, busy=busy)
    else:
        metrics.set_busy(model, busy)
    if _presence is not None and job_id is not None:
        _presence.job_finished(job_id, status)
        if _current is not None:
            _presence.job_started(_current)


def finish_done(job_id: str, status: str, _seconds: float = 0.0) -> None:
    """[issue 13] The finisher thread ended a handed-over job: record it as its task's end."""
    with _lock:
        began = _finishing.pop(job_id, None)
        if began is None:  # its task has not run its postrun yet: that records it
            _ended_early[job_id] = status
            return
        _job_ended(job_id, status, began)
