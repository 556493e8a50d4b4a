"""Send job ids to the model queues (producer side: no torch, no task code imported).

Priority: one Redis list per model queue, with kombu's Redis priority steps. kombu polls
the priority sub-lists of a queue in order in a single BRPOP, so a more urgent job is
taken first by the next free worker; with prefetch 1 and acks late a worker never holds
a waiting message, so nothing already fetched escapes the ordering. Redis counts 0 as the
most urgent, so a spec priority p (0 normal .. 9 most urgent) is sent as 9 - p; kombu folds
the ten levels into its four steps (0, 3, 6, 9).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from schemas.specs import MAX_PRIORITY
from worker.jobstore import PublishTarget

if TYPE_CHECKING:
    from celery import Celery

RUN_JOB_TASK_NAME = "diffgentor.run_job"
PUBLISH_PIPELINE_SIZE = 1000  # Redis commands per pipeline round trip


class Publisher(Protocol):
    def publish(self, targets: Sequence[PublishTarget]) -> None:
        """Deliver each job id to its model queue; raises if any could not be sent."""
        ...


def queue_name(model_name: str) -> str:
    """The Celery queue a model's workers consume: the model name itself."""
    return model_name


def redis_priority(priority: int) -> int:
    return MAX_PRIORITY - priority


class CeleryPublisher:
    def __init__(self, broker_url: str | None = None, *, app: Celery | None = None) -> None:
        if app is None:
            if broker_url is None:
                raise ValueError("CeleryPublisher needs a broker_url or a Celery app")
            from worker.celery_app import make_producer_app

            app = make_producer_app(broker_url)
        self.app = app

    def publish(self, targets: Sequence[PublishTarget]) -> None:
        if not targets:
            return
        amqp = self.app.amqp
        declared: set[str] = set()
        # One connection, one producer and kombu's publish batch for the whole call: the messages
        # (Celery's own task-message v2 from `create_task_message`, kombu's own envelope) are
        # LPUSHed through non-transactional Redis pipelines of PUBLISH_PIPELINE_SIZE commands
        # instead of one round trip each. This is what `send_task` does for a direct queue
        # (anonymous exchange, routing key = queue name), minus its per-call routing overhead.
        # A failed flush raises; the rows then stay unpublished for the sweeper.
        with self.app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_PIPELINE_SIZE):
            for target in targets:
                queue = queue_name(target.model_name)
                message = amqp.create_task_message(
                    target.job_id,
                    RUN_JOB_TASK_NAME,
                    [target.job_id],
                    {},
                    ignore_result=True,
                )
                declare = None if queue in declared else [amqp.queues[queue]]
                declared.add(queue)
                producer.publish(
                    message.body,
                    exchange="",
                    routing_key=queue,
                    serializer="json",
                    headers=message.headers,
                    priority=redis_priority(target.priority),
                    retry=False,
                    declare=declare,
                    **message.properties,
                )

    def close(self) -> None:
        self.app.close()
