"""The Celery app, configured from `DG_*` settings (`celery -A worker.celery_app worker`).

Only the job id travels in a message; the job row is the truth, so results are ignored.
Redis redelivers an unacked message after the visibility timeout, so it is set (in all
three places Celery reads it) above the hard time limit, and kombu's restore sweep cadence
comes from settings so tests and operators can shorten the recovery of a killed worker.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from schemas.specs import DEFAULT_MODEL_NAME
from worker.settings import Settings, load_settings

SWEEP_TASK_NAME = "diffgentor.sweep"
SWEEP_QUEUE = "diffgentor.sweep"
# kombu's Redis priority steps: four sub-lists per queue, polled most urgent first.
PRIORITY_STEPS = [0, 3, 6, 9]


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    return {
        "visibility_timeout": settings.visibility_timeout_seconds,
        "unacked_restore_interval": settings.unacked_restore_interval_seconds,
        "unacked_restore_throttle": settings.unacked_restore_throttle,
        "priority_steps": PRIORITY_STEPS,
        "queue_order_strategy": "priority",
    }


def make_producer_app(broker_url: str, settings: Settings | None = None) -> Celery:
    """A light app for publishing only (client side): same serialisation and transport options."""
    settings = settings or load_settings()
    app = Celery("diffgentor", broker=broker_url, set_as_current=False)
    _configure(app, settings)
    return app


def make_celery_app(settings: Settings | None = None) -> Celery:
    settings = settings or load_settings()
    app = Celery("diffgentor", broker=settings.worker_broker_url, include=["worker.tasks"])
    _configure(app, settings)
    app.conf.beat_schedule = {
        "diffgentor-sweep": {
            "task": SWEEP_TASK_NAME,
            "schedule": settings.sweep_interval_seconds,
            "options": {"queue": SWEEP_QUEUE, "expires": settings.sweep_interval_seconds},
        }
    }
    app.conf.task_routes = {SWEEP_TASK_NAME: {"queue": SWEEP_QUEUE}}
    return app


def configure_app(app: Celery, settings: Settings) -> None:
    """Re-apply settings to an existing app (start_worker with explicit settings)."""
    app.conf.broker_url = settings.worker_broker_url
    _configure(app, settings)


def _configure(app: Celery, settings: Settings) -> None:
    transport = broker_transport_options(settings)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        # Ack after the job body returns; a crash mid-job leaves the message for redelivery,
        # and the claim makes the second delivery harmless.
        task_acks_late=True,
        task_acks_on_failure_or_timeout=True,
        # A killed child requeues its message; the attempts cap in the claim stops a loop.
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_default_queue=DEFAULT_MODEL_NAME,  # every job names its queue; this is only a fallback
        task_create_missing_queues=True,
        task_soft_time_limit=settings.soft_time_limit_seconds,
        task_time_limit=settings.hard_time_limit_seconds,
        broker_transport_options=transport,
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_seconds},
        visibility_timeout=settings.visibility_timeout_seconds,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a GPU worker waits for Redis to come back, it does not exit
        # Decided, not defaulted (Celery 6 flips it): after a broker reconnect the running job's
        # message can no longer be acked and comes back later; its redelivery is refused by the
        # claim (live lease, or finished), so the GPU work is kept instead of being killed.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # SIGTERM stays a warm shutdown that finishes the job. A cold shutdown (SIGQUIT, second
        # SIGTERM) first waits this long for the job, then restores the unacked message to Redis
        # at once instead of after the visibility timeout; the lease/sweeper covers the rest.
        worker_soft_shutdown_timeout=settings.soft_shutdown_timeout_seconds,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )


app = make_celery_app()
