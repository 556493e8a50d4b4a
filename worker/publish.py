"""Send job ids to the model queues (producer side: no torch, no task code imported).

Priority: one Redis list per model queue, with kombu's Redis priority steps. kombu polls
the priority sub-lists of a queue in order in a single BRPOP, so a more urgent job is
taken first by the next free worker; with prefetch 1 and acks late a worker never holds
a waiting message, so nothing already fetched escapes the ordering. Redis counts 0 as the
most urgent, so a spec priority p (0 normal .. 9 most urgent) is sent as 9 - p; kombu folds
the ten levels into its four steps (0, 3, 6, 9).

[issue 13] On a plain Redis broker the messages are not built one by one through kombu:
`RedisTemplates` has kombu build ONE message per (queue, priority) for a placeholder job id
(Celery's own task message, kombu's own envelope, captured instead of sent), then fills in each
job's id, body and delivery tag with string operations, and LPUSHes them through one
non-transactional pipeline on one long-lived Redis client. The bytes a Celery worker reads are
the ones kombu would have written (tests/jobs/test_publish_fast.py compares them field by field
and has a Celery worker run them). Any other broker (memory://, sentinel, a key prefix), or a
kombu whose envelope cannot be captured, keeps the kombu path.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from schemas.specs import MAX_PRIORITY
from worker.jobstore import PublishTarget

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)

RUN_JOB_TASK_NAME = "diffgentor.run_job"
PUBLISH_PIPELINE_SIZE = 1000  # Redis commands per pipeline round trip
# Values per LPUSH in the fast path: LPUSH k a b c pushes a, then b, then c (BRPOP takes a first),
# exactly like three LPUSHes in that order, in one command.
LPUSH_VALUES = 500
# Job ids the template fills in as they are: JSON and repr() leave these characters unchanged.
_PLAIN_ID = re.compile(r"[0-9A-Za-z_-]{1,200}")


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
    """Publishes `diffgentor.run_job` task messages (Celery protocol v2).

    ``fast``: None (default) uses the Redis template path whenever the broker allows it
    (`RedisTemplates.supports`), False always kombu's per-message path.
    """

    # [issue 13] Thread-safe and sending only messages: concurrent single submits may share one
    # publish call (worker.submission). Not so for a publisher that runs the jobs (embedded mode).
    groups_single_submits = True

    def __init__(
        self, broker_url: str | None = None, *, app: Celery | None = None, fast: bool | None = None
    ) -> None:
        if app is None:
            if broker_url is None:
                raise ValueError("CeleryPublisher needs a broker_url or a Celery app")
            from worker.celery_app import make_producer_app

            app = make_producer_app(broker_url)
        self.app = app
        self._want_fast = fast is not False
        self._templates: RedisTemplates | None = None
        self._lock = threading.Lock()

    def publish(self, targets: Sequence[PublishTarget]) -> None:
        if not targets:
            return
        templates = self._fast_path()
        if templates is not None:
            try:
                templates.publish(targets)  # builds every message before it sends any
                return
            except _Captured as exc:
                log.warning("Redis message templates unavailable (%s); publishing through kombu", exc)
                self._want_fast = False
        self._publish_kombu(targets)

    @property
    def fast(self) -> bool:
        """Whether publishes take the Redis template path (decided at the first publish)."""
        return self._fast_path() is not None

    def _fast_path(self) -> RedisTemplates | None:
        if not self._want_fast:
            return None
        templates = self._templates
        if templates is not None and templates.pid == os.getpid():
            return templates
        with self._lock:
            if self._templates is None or self._templates.pid != os.getpid():
                # After a fork the parent's sockets are not ours: start over, do not close them.
                if not RedisTemplates.supports(self.app):
                    self._want_fast = False
                    return None
                self._templates = RedisTemplates(self.app)  # connects; a failure raises (sweeper)
            return self._templates

    def _publish_kombu(self, targets: Sequence[PublishTarget]) -> None:
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
        with self._lock:
            templates, self._templates = self._templates, None
        if templates is not None and templates.pid == os.getpid():
            templates.close()
        self.app.close()


class _Captured(Exception):
    """kombu's envelope could not be captured as one LPUSH: use the kombu path."""


class _Collector:
    """Stands in for kombu's Redis `PublishBatch`: keeps the final commands instead of sending them."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, tuple[Any, ...]]] = []

    def publish(self, channel: Any, message: Any, **kwargs: Any) -> Any:
        return channel.basic_publish(message, _publish_batch=self, **kwargs)

    def add(self, name: str, *args: Any) -> None:
        self.commands.append((name, args))


class _Template:
    """One captured message, split around its per-job fields."""

    __slots__ = ("body_post", "body_pre", "key", "kinds", "literals")

    def __init__(self, key: str, payload: str, placeholder: str) -> None:
        message = json.loads(payload)
        properties = message["properties"]
        if properties.get("body_encoding") != "base64":
            raise _Captured(f"body encoding {properties.get('body_encoding')!r}")
        body = message["body"]
        tag = properties["delivery_tag"]
        raw = base64.b64decode(body).decode()
        if raw.count(placeholder) != 1 or payload.count(body) != 1 or payload.count(tag) != 1:
            raise _Captured("the per-job fields are not where they were expected")
        self.key = key
        self.body_pre, self.body_post = raw.split(placeholder)
        marked = (
            payload.replace(body, "\x00B\x00").replace(tag, "\x00T\x00").replace(placeholder, "\x00I\x00")
        )
        pieces = marked.split("\x00")
        self.literals = pieces[0::2]
        self.kinds = pieces[1::2]
        if not set(self.kinds) <= {"B", "T", "I"} or self.kinds.count("B") != 1:
            raise _Captured("unexpected markers in the captured message")

    def render(self, job_id: str) -> str:
        literals = self.literals
        out = [literals[0]]
        for kind, literal in zip(self.kinds, literals[1:], strict=True):
            if kind == "I":
                out.append(job_id)
            elif kind == "B":
                out.append(base64.b64encode(f"{self.body_pre}{job_id}{self.body_post}".encode()).decode())
            else:
                out.append(str(uuid.uuid4()))  # kombu's delivery tag: a fresh uuid4 per message
            out.append(literal)
        return "".join(out)


class RedisTemplates:
    """The fast Redis path of `CeleryPublisher` (see the module docstring). Thread-safe."""

    def __init__(self, app: Celery) -> None:
        from kombu import Producer

        self.app = app
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._templates: dict[tuple[str, int], _Template] = {}
        self.connection = app.connection_for_write()
        try:
            self.channel = self.connection.default_channel  # connects (kombu pings the server)
            # One redis-py client on kombu's own pool (its URL, password, TLS and socket options):
            # thread-safe, each thread's pipeline borrows a pooled connection.
            self.client = self.channel._create_client()
            self.producer = Producer(self.channel, auto_declare=False)
        except BaseException:
            self.connection.release()
            raise

    @staticmethod
    def supports(app: Celery) -> bool:
        """A plain Redis broker (not sentinel), no global key prefix, kombu's Redis publish batch."""
        from kombu.transport import redis as kombu_redis

        connection = app.connection_for_write()
        try:
            transport_cls = type(connection.transport)
            options = connection.transport_options or {}
        finally:
            connection.release()
        return (
            transport_cls is kombu_redis.Transport
            and not options.get("global_keyprefix")
            and hasattr(kombu_redis.Channel, "create_publish_batch")
        )

    def publish(self, targets: Sequence[PublishTarget]) -> None:
        by_key: dict[str, list[str]] = {}
        for target in targets:
            key, payload = self.message(target)
            by_key.setdefault(key, []).append(payload)
        with self.client.pipeline(transaction=False) as pipe:
            commands = 0
            for key, payloads in by_key.items():
                for start in range(0, len(payloads), LPUSH_VALUES):
                    pipe.lpush(key, *payloads[start : start + LPUSH_VALUES])
                    commands += 1
                    if commands >= PUBLISH_PIPELINE_SIZE:
                        pipe.execute()
                        commands = 0
            if commands:
                pipe.execute()  # raises on a lost connection: the rows stay for the sweeper

    def message(self, target: PublishTarget) -> tuple[str, str]:
        """(Redis list, payload) of one job's message, as kombu would LPUSH it."""
        queue = queue_name(target.model_name)
        priority = redis_priority(target.priority)
        if not _PLAIN_ID.fullmatch(target.job_id):
            with self._lock:  # an unusual id: kombu builds this one message itself
                return self._capture(queue, priority, target.job_id)
        template = self._templates.get((queue, priority))
        if template is None:
            template = self._template(queue, priority)
        return template.key, template.render(target.job_id)

    def _template(self, queue: str, priority: int) -> _Template:
        with self._lock:
            template = self._templates.get((queue, priority))
            if template is None:
                placeholder = str(uuid.uuid4())
                key, payload = self._capture(queue, priority, placeholder)
                template = self._templates[(queue, priority)] = _Template(key, payload, placeholder)
            return template

    def _capture(self, queue: str, priority: int, job_id: str) -> tuple[str, str]:
        """kombu's LPUSH for one message, captured instead of sent (the first one per queue also
        declares the queue, as the kombu path does). Caller holds the lock."""
        amqp = self.app.amqp
        message = amqp.create_task_message(job_id, RUN_JOB_TASK_NAME, [job_id], {}, ignore_result=True)
        collector = _Collector()
        self.producer._batch_local.current = collector
        try:
            self.producer.publish(
                message.body,
                exchange="",
                routing_key=queue,
                serializer="json",
                headers=message.headers,
                priority=priority,
                retry=False,
                declare=[amqp.queues[queue]],
                **message.properties,
            )
        finally:
            self.producer._batch_local.current = None
        if len(collector.commands) != 1 or collector.commands[0][0] != "lpush":
            raise _Captured(f"kombu sent {[name for name, _ in collector.commands]} for one message")
        key, payload = collector.commands[0][1]
        return str(key), payload if isinstance(payload, str) else payload.decode()

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            self.connection.release()
