"""Job events: best-effort hints pushed after each fenced state change, so waiters wake at once.

The job table stays the source of truth. An event only says "job X (of batch B) changed: read it
again"; a waiter that misses one still re-reads its rows every `DG_EVENTS_FALLBACK_SECONDS`, so a
lost event delays an update by at most that and never hangs a wait (docs/events.md).

Publisher side. `JobStore` emits a `JobEvent` after the commit of each fenced change it makes:
``running`` (claim), ``progress`` (a progress write, so at most every DG_PROGRESS_INTERVAL_SECONDS
per job), ``queued`` (a hand-back after a fault, a lease released by the sweeper), and the terminal
``succeeded`` / ``failed`` / ``cancelled``. An `EventSink` takes it:

* `LocalHub` (every process, always): wakes waiters in the same process. This is how embedded mode
  (no Redis) pushes: the runner thread and the waiting client share the process.
* `RedisEventPublisher` (queue mode, `DG_EVENTS` on): one daemon thread per process PUBLISHes each
  event on ``diffgentor:events:job:<job_id>`` and, for a batch job, every event but ``progress`` on
  ``diffgentor:events:batch:<batch_id>`` (a batch's counts only change when a job starts or ends).
  `emit()` never blocks: it puts the event on a bounded queue (a full queue drops it). The thread
  sends whatever is queued in one pipeline, with 0.5 s socket timeouts and no client retries; after
  a failure it drops events for a growing pause (1, 2, 4 ... 30 s, one log line per step), so a Redis
  outage neither slows nor fails a job: the waiters fall back to reading the table.

Waiter side. `subscribe(settings, job_ids=..., batch_ids=...)` returns a `Subscription`, taken
BEFORE the first read of the rows (for Redis: after the server confirmed every SUBSCRIBE), so an
event between that read and the subscription cannot be lost. `wait(timeout)` returns a `Wake`
as soon as events arrive (or when the timeout passes); ``Wake.lost`` says events may have been
missed (the connection dropped), so everything must be read again. Without events (DG_EVENTS=0,
Redis unreachable) the subscription is `Polling`: ``push`` is False and `wait` just sleeps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from worker.backoff import Backoff

if TYPE_CHECKING:
    from worker.settings import Settings

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "diffgentor:events"
EVENT_TYPES = ("running", "progress", "queued", "succeeded", "failed", "cancelled")
TERMINAL_EVENT_TYPES = frozenset({"succeeded", "failed", "cancelled"})
PUBLISH_TIMEOUT_SECONDS = 0.5  # connect and socket timeout of the publishing thread
PUBLISH_QUEUE_SIZE = 10_000  # events waiting for the thread; beyond that they are dropped
PUBLISH_PIPELINE_SIZE = 500  # events sent in one pipeline round trip
PUBLISH_MAX_PAUSE_SECONDS = 30.0  # the longest pause in publishing after failures
SUBSCRIBE_TIMEOUT_SECONDS = 2.0  # connect + every SUBSCRIBE confirmed, or the waiter polls instead
SUBSCRIBE_CHUNK = 1000  # channels per SUBSCRIBE command
RESUBSCRIBE_SECONDS = 5.0  # after a lost connection, how often a waiter tries to subscribe again


def job_channel(job_id: str) -> str:
    return f"{CHANNEL_PREFIX}:job:{job_id}"


def batch_channel(batch_id: str) -> str:
    return f"{CHANNEL_PREFIX}:batch:{batch_id}"


@dataclass(frozen=True)
class JobEvent:
    """One state change of one job, as published (JSON): a hint to read the row again."""

    type: str  # one of EVENT_TYPES
    job_id: str
    batch_id: str | None = None
    step: int | None = None  # progress events
    total: int | None = None
    at: float = field(default_factory=time.time)  # Unix time of the emit (after the commit)

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENT_TYPES

    def to_json(self) -> str:
        data: dict[str, Any] = {"type": self.type, "job_id": self.job_id, "batch_id": self.batch_id}
        if self.step is not None:
            data.update(step=self.step, total=self.total)
        data["at"] = round(self.at, 6)
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> JobEvent | None:
        """The event, or None for anything that is not one (a stray message is ignored)."""
        try:
            data = json.loads(raw)
            return cls(
                type=str(data["type"]),
                job_id=str(data["job_id"]),
                batch_id=data.get("batch_id"),
                step=data.get("step"),
                total=data.get("total"),
                at=float(data.get("at", 0.0)),
            )
        except (ValueError, KeyError, TypeError):
            return None


class EventSink(Protocol):
    def emit(self, event: JobEvent) -> None:
        """Hand the event on; never raises and never blocks on the network."""
        ...


# ------------------------------------------------------------------------------------- waiting


@dataclass(frozen=True)
class Wake:
    """What woke a waiter: the events received (possibly none: the timeout passed)."""

    events: tuple[JobEvent, ...] = ()
    lost: bool = False  # events may have been missed (connection lost or re-made): read everything

    @property
    def job_ids(self) -> set[str]:
        return {event.job_id for event in self.events}

    @property
    def batch_ids(self) -> set[str]:
        return {event.batch_id for event in self.events if event.batch_id is not None}

    @property
    def urgent(self) -> bool:
        """Something other than progress happened (a job started, ended or went back to the queue)."""
        return self.lost or any(event.type != "progress" for event in self.events)


class Subscription(Protocol):
    @property
    def push(self) -> bool:
        """True while events arrive (the waiter may read less often); False: poll."""
        ...

    def wait(self, timeout: float) -> Wake:
        """Until events arrive or ``timeout`` seconds pass."""
        ...

    def close(self) -> None: ...


class Polling:
    """No events (DG_EVENTS=0, Redis unreachable): the waiter reads the table every poll interval."""

    push = False

    def wait(self, timeout: float) -> Wake:
        if timeout > 0:
            time.sleep(timeout)
        return Wake()

    def close(self) -> None:
        pass


class LocalSubscription:
    """Events emitted in this process (embedded mode's runner thread) for some jobs and batches."""

    push = True

    def __init__(self, hub: LocalHub, job_ids: Iterable[str], batch_ids: Iterable[str]) -> None:
        self._hub = hub
        self.job_ids = frozenset(job_ids)
        self.batch_ids = frozenset(batch_ids)
        self._condition = threading.Condition()
        self._pending: list[JobEvent] = []

    def wants(self, event: JobEvent) -> bool:
        if event.job_id in self.job_ids:
            return True
        # A batch's counts only change when a job starts or ends: no progress on batch channels.
        return event.batch_id is not None and event.batch_id in self.batch_ids and event.type != "progress"

    def deliver(self, event: JobEvent) -> None:
        with self._condition:
            self._pending.append(event)
            self._condition.notify_all()

    def wait(self, timeout: float) -> Wake:
        with self._condition:
            if not self._pending and timeout > 0:
                self._condition.wait(timeout)
            events, self._pending = tuple(self._pending), []
        return Wake(events)

    def close(self) -> None:
        self._hub.unsubscribe(self)


class LocalHub:
    """In-process fan-out of events to the subscriptions of this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscriptions: set[LocalSubscription] = set()

    def emit(self, event: JobEvent) -> None:
        with self._lock:
            if not self._subscriptions:
                return
            targets = [sub for sub in self._subscriptions if sub.wants(event)]
        for subscription in targets:
            subscription.deliver(event)

    def subscribe(self, job_ids: Iterable[str] = (), batch_ids: Iterable[str] = ()) -> LocalSubscription:
        subscription = LocalSubscription(self, job_ids, batch_ids)
        with self._lock:
            self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: LocalSubscription) -> None:
        with self._lock:
            self._subscriptions.discard(subscription)


LOCAL_HUB = LocalHub()


class RedisSubscription:
    """Redis pub/sub on the jobs' and batches' channels, confirmed before the first read.

    A lost connection is not retried inside redis-py (events sent meanwhile would be silently
    missed): the subscription reports ``lost`` once, polls, and subscribes again every
    `RESUBSCRIBE_SECONDS`; the wake after a new subscription is ``lost`` too (read everything).
    """

    def __init__(
        self,
        url: str,
        channels: Sequence[str],
        *,
        timeout_seconds: float = SUBSCRIBE_TIMEOUT_SECONDS,
        resubscribe_seconds: float = RESUBSCRIBE_SECONDS,
    ) -> None:
        self.url = url
        self.channels = list(dict.fromkeys(channels))
        self.timeout_seconds = timeout_seconds
        self.resubscribe_seconds = resubscribe_seconds
        self._client: Any = None
        self._pubsub: Any = None
        self._buffer: list[JobEvent] = []
        self._next_try = 0.0
        self._connect()  # raises when Redis cannot be reached: the caller polls instead

    @property
    def push(self) -> bool:
        return self._pubsub is not None

    def _connect(self) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis.from_url(
            self.url,
            socket_connect_timeout=self.timeout_seconds,
            socket_timeout=self.timeout_seconds,
            retry=Retry(NoBackoff(), 0),
        )
        pubsub = client.pubsub()
        try:
            for start in range(0, len(self.channels), SUBSCRIBE_CHUNK):
                pubsub.subscribe(*self.channels[start : start + SUBSCRIBE_CHUNK])
            # Redis confirms each channel in order: once all are confirmed, every event published
            # from now on reaches us, so the caller's first read cannot miss one.
            confirmed = 0
            deadline = time.monotonic() + self.timeout_seconds
            while confirmed < len(self.channels):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"Redis confirmed {confirmed} of {len(self.channels)} subscriptions")
                message = pubsub.get_message(timeout=left)
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    confirmed += 1
                else:
                    self._take(message)
        except BaseException:
            pubsub.close()
            client.close()
            raise
        self._client, self._pubsub = client, pubsub

    def _take(self, message: dict[str, Any]) -> None:
        if message.get("type") == "message":
            event = JobEvent.from_json(message["data"])
            if event is not None:
                self._buffer.append(event)

    def wait(self, timeout: float) -> Wake:
        if self._pubsub is None:
            return self._wait_disconnected(timeout)
        try:
            if not self._buffer:
                message = self._pubsub.get_message(timeout=max(timeout, 0.0))
                if message is not None:
                    self._take(message)
            for _ in range(10_000):  # whatever else already arrived, without waiting
                message = self._pubsub.get_message(timeout=0.0)
                if message is None:
                    break
                self._take(message)
        except Exception as exc:
            log.info("job events: the Redis subscription broke (%s); reading the job table instead", exc)
            self._drop()
            self._next_try = time.monotonic() + self.resubscribe_seconds
            return Wake(tuple(self._take_buffer()), lost=True)
        return Wake(tuple(self._take_buffer()))

    def _wait_disconnected(self, timeout: float) -> Wake:
        now = time.monotonic()
        if now >= self._next_try:
            try:
                self._connect()
            except Exception:
                self._next_try = now + self.resubscribe_seconds
            else:
                return Wake(tuple(self._take_buffer()), lost=True)  # events may have been missed meanwhile
        if timeout > 0:
            time.sleep(timeout)
        return Wake()

    def _take_buffer(self) -> list[JobEvent]:
        events, self._buffer = self._buffer, []
        return events

    def _drop(self) -> None:
        for item in (self._pubsub, self._client):
            if item is not None:
                with contextlib.suppress(Exception):  # already broken
                    item.close()
        self._pubsub = self._client = None

    def close(self) -> None:
        self._drop()


@dataclass(frozen=True)
class Reread:
    """What a waiter reads next: everything it waits on (``full``), or only these jobs."""

    full: bool
    job_ids: frozenset[str] = frozenset()


class ReadPacer:
    """When a waiter reads the job table, given its `Subscription`.

    * an urgent event (a job started, ended, went back to the queue; a lost connection): read at
      once, but never sooner than ``cost_factor`` x the last read's duration after it (a read of a
      huge batch's counts takes tens of ms: at most ~10 % of a database core);
    * progress events: at most every ``poll_seconds`` (they come at most every
      DG_PROGRESS_INTERVAL_SECONDS per job anyway);
    * without any event: everything every ``fallback_seconds`` while events arrive (``push``), every
      ``poll_seconds`` otherwise (the polling of a client without events). So a lost event delays an
      update by at most ``fallback_seconds``.
    """

    def __init__(
        self,
        subscription: Subscription,
        *,
        poll_seconds: float,
        fallback_seconds: float,
        cost_factor: float = 10.0,
        clock: Any = time.monotonic,
    ) -> None:
        self.subscription = subscription
        self.poll_seconds = poll_seconds
        self.fallback_seconds = fallback_seconds
        self.cost_factor = cost_factor
        self._clock = clock
        now = clock()
        self._last_full = now
        self._last_read = now
        self._last_cost = 0.0
        self._dirty: set[str] = set()
        self._urgent = False
        self._lost = False
        self.wakes = 0  # subscription wakes with events (benchmarks, tests)

    @property
    def interval(self) -> float:
        """Between two full reads: the fallback (events arrive) or the poll interval, and never less
        than ``cost_factor`` x what the last read took."""
        base = self.fallback_seconds if self.subscription.push else self.poll_seconds
        return max(base, self.cost_factor * self._last_cost)

    def next(self, deadline: float | None = None) -> Reread | None:
        """Block until something should be read; None when ``deadline`` (monotonic) came first."""
        while True:
            now = self._clock()
            if self._lost or now >= self._last_full + self.interval:
                return Reread(full=True)
            if self._dirty:
                gap = self.cost_factor * self._last_cost
                due = self._last_read + (gap if self._urgent else max(gap, self.poll_seconds))
                if now >= due:
                    return Reread(full=False, job_ids=frozenset(self._dirty))
            else:
                due = self._last_full + self.interval
            due = min(due, self._last_full + self.interval)
            if deadline is not None:
                if now >= deadline:
                    return None
                due = min(due, deadline)
            wake = self.subscription.wait(max(due - now, 0.0))
            if wake.events:
                self.wakes += 1
            self._lost = self._lost or wake.lost
            self._urgent = self._urgent or wake.urgent
            self._dirty |= wake.job_ids | wake.batch_ids

    def done(self, reread: Reread, cost_seconds: float) -> None:
        """Record the read that `next` asked for (and how long it took)."""
        now = self._clock()
        self._last_read = now
        self._last_cost = cost_seconds
        if reread.full:
            self._last_full = now
            self._lost = False
            self._dirty.clear()
        else:
            self._dirty -= reread.job_ids
        self._urgent = False


def events_enabled(settings: Settings) -> bool:
    """Whether this configuration publishes and consumes Redis events (queue mode with DG_EVENTS on)."""
    url = settings.broker_url
    return bool(getattr(settings, "events", True)) and url is not None and not url.startswith("memory://")


def subscribe(
    settings: Settings, *, job_ids: Iterable[str] = (), batch_ids: Iterable[str] = ()
) -> Subscription:
    """A subscription to these jobs' and batches' events; take it BEFORE the first read of their rows.

    Embedded mode: this process's `LocalHub`. Queue mode: Redis pub/sub, or `Polling` when
    DG_EVENTS=0 or Redis does not answer within `SUBSCRIBE_TIMEOUT_SECONDS` (one log line).
    """
    if not getattr(settings, "events", True):
        return Polling()
    if settings.broker_url is None:
        return LOCAL_HUB.subscribe(job_ids, batch_ids)
    if not events_enabled(settings):
        return Polling()
    channels = [job_channel(job_id) for job_id in job_ids] + [
        batch_channel(batch_id) for batch_id in batch_ids
    ]
    try:
        return RedisSubscription(settings.broker_url, channels)
    except Exception as exc:
        from worker.redact import redact_urls_in

        log.info("job events unavailable (%s); polling the job table", redact_urls_in(str(exc)))
        return Polling()


# ------------------------------------------------------------------------------------ publishing


class RedisEventPublisher:
    """PUBLISHes events from one daemon thread per process; `emit` never blocks.

    The thread starts on the first emit in a process (a prefork child gets its own), sends what is
    queued in one pipeline, and after a failure drops events for a growing pause. `flush` waits
    until the queue is empty (tests, benchmarks).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_seconds: float = PUBLISH_TIMEOUT_SECONDS,
        queue_size: int = PUBLISH_QUEUE_SIZE,
        max_pause_seconds: float = PUBLISH_MAX_PAUSE_SECONDS,
    ) -> None:
        self.url = url
        self.timeout_seconds = timeout_seconds
        self.queue_size = queue_size
        self.max_pause_seconds = max_pause_seconds
        self.published = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue[JobEvent] = queue.Queue(queue_size)
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._down_until = 0.0
        self._backoff = Backoff("publishing job events to Redis", log, max_factor=int(max_pause_seconds))

    def emit(self, event: JobEvent) -> None:
        self._ensure_thread()
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued event was sent (or dropped); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            return
        with self._lock:
            if self._pid != os.getpid():  # forked: the parent's queue and thread are not ours
                self._queue = queue.Queue(self.queue_size)
                self._pid = os.getpid()
                self._thread = None
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="diffgentor-events", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        events = self._queue
        client: Any = None
        while True:
            batch = [events.get()]
            while len(batch) < PUBLISH_PIPELINE_SIZE:
                try:
                    batch.append(events.get_nowait())
                except queue.Empty:
                    break
            try:
                if time.monotonic() < self._down_until:
                    self.dropped += len(batch)  # Redis failed a moment ago: waiters read the table
                    continue
                if client is None:
                    client = self._client()
                pipeline = client.pipeline(transaction=False)
                for event in batch:
                    data = event.to_json()
                    pipeline.publish(job_channel(event.job_id), data)
                    if event.batch_id is not None and event.type != "progress":  # counts only change then
                        pipeline.publish(batch_channel(event.batch_id), data)
                pipeline.execute()
                self.published += len(batch)
                self._backoff.succeeded()
            except Exception as exc:
                self.dropped += len(batch)
                self._down_until = time.monotonic() + self._backoff.failed(exc, 1.0)
                if client is not None:
                    with contextlib.suppress(Exception):
                        client.close()
                    client = None
            finally:
                for _ in batch:
                    events.task_done()

    def _client(self) -> Any:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis.from_url(
            self.url,
            socket_connect_timeout=self.timeout_seconds,
            socket_timeout=self.timeout_seconds,
            retry=Retry(NoBackoff(), 0),
        )


class Fanout:
    """Several sinks as one; a sink that raises is logged at DEBUG and skipped."""

    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = sinks

    def emit(self, event: JobEvent) -> None:
        for sink in self.sinks:
            try:
                sink.emit(event)
            except Exception:  # an event is a hint: never let it fail a job
                log.debug("emitting a job event failed", exc_info=True)


_PUBLISHERS: dict[str, RedisEventPublisher] = {}
_PUBLISHERS_LOCK = threading.Lock()


def redis_publisher(url: str) -> RedisEventPublisher:
    """The process's publisher for this Redis URL (one thread and connection per URL)."""
    with _PUBLISHERS_LOCK:
        publisher = _PUBLISHERS.get(url)
        if publisher is None:
            publisher = _PUBLISHERS[url] = RedisEventPublisher(url)
        return publisher


def events_for(settings: Settings) -> EventSink:
    """Where a `JobStore` on these settings emits: this process's `LocalHub`, plus Redis in queue
    mode with DG_EVENTS on (embedded mode has no Redis: waiters in the process are woken locally)."""
    if events_enabled(settings) and settings.broker_url is not None:
        return Fanout(LOCAL_HUB, redis_publisher(settings.broker_url))
    return LOCAL_HUB
