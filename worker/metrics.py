"""Prometheus metrics of a GPU worker: instruments, collectors and the HTTP exporter.

Exporter placement: each worker runs exactly one process that executes jobs (the prefork
child with `-c 1`, or the main process with `--pool solo`), so that process serves
`/metrics` itself on `DG_METRICS_PORT` (0 or unset: off). Prometheus multiprocess mode is
not needed: no two processes ever hold job metrics for the same worker. A replaced child
starts its counters from zero; `rate()`/`increase()` treat that as a counter reset.

Queue depth is read from Redis at scrape time (LLEN of the queue and of kombu's priority
sub-lists), so it is correct even while the worker is busy or not consuming.

A scrape never fails because a dependency does: with Redis down the collector exports
`diffgentor_broker_up 0` without depths, logs one line (first failure and each back-off
step, `worker.backoff.Backoff`) and does not try Redis again for 5, 10, then 20 s, so a hung
broker does not cost every scrape its timeout; a collector error of any other kind is
handled the same way instead of raising into prometheus-client on every scrape.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.backoff import Backoff

log = logging.getLogger(__name__)

METRICS_PORT_ENV = "DG_METRICS_PORT"
# kombu's Redis transport keeps priority p != 0 of queue q in the list "q\x06\x16p".
KOMBU_PRIORITY_SEPARATOR = "\x06\x16"
# From a 1-step tiny job (tens of ms) to the hour-long hard limit of a large one.
RUN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)

REGISTRY = CollectorRegistry(auto_describe=True)

JOBS_FINISHED = Counter(
    "diffgentor_jobs_finished",
    "Deliveries handled, by model and outcome "
    "(succeeded, failed, cancelled, skipped = duplicate/finished/poison, lost = taken over)",
    ["model", "status"],
    registry=REGISTRY,
)
JOB_RUN_SECONDS = Histogram(
    "diffgentor_job_run_seconds",
    "Wall time of one delivery in the worker, claim to completion (an overlapped finish included)",
    ["model", "status"],
    buckets=RUN_BUCKETS,
    registry=REGISTRY,
)
JOB_QUEUE_WAIT_SECONDS = Histogram(
    "diffgentor_job_queue_wait_seconds",
    "Time from publish (or creation) to the claim by this worker",
    ["model"],
    buckets=WAIT_BUCKETS,
    registry=REGISTRY,
)
MODEL_LOAD_SECONDS = Gauge(
    "diffgentor_model_load_seconds",
    "Duration of the last model load in this process",
    ["model"],
    registry=REGISTRY,
)
MODEL_LOADS = Counter("diffgentor_model_loads", "Model loads in this process", ["model"], registry=REGISTRY)
STEPS_PER_SECOND = Gauge(
    "diffgentor_steps_per_second",
    "Denoising steps per second of the last generation",
    ["model"],
    registry=REGISTRY,
)
WORKER_BUSY = Gauge(
    "diffgentor_worker_busy", "1 while a delivery is being handled", ["model"], registry=REGISTRY
)
LAST_JOB_FINISHED = Gauge(
    "diffgentor_worker_last_job_finished_timestamp_seconds",
    "Unix time the last delivery was handled",
    ["model"],
    registry=REGISTRY,
)


class QueueDepthCollector(Collector):
    """`diffgentor_queue_depth{queue}`: messages waiting in Redis for each model queue.

    `collect()` never raises: a failed read exports `diffgentor_broker_up 0` (and no depth),
    and Redis is not asked again before `retry_seconds` x 1, 2, 4 (consecutive failures).
    """

    def __init__(
        self,
        broker_url: str,
        queues: Sequence[str],
        priority_steps: Iterable[int] = (0, 3, 6, 9),
        timeout_seconds: float = 1.0,
        retry_seconds: float = 5.0,
    ) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.queues = list(queues)
        self.retry_seconds = retry_seconds
        self._priorities = [p for p in priority_steps if p]
        # A short timeout and no client-side retries: a scrape must answer even while Redis is
        # unreachable (the back-off below decides when to try again).
        self._redis = redis.Redis.from_url(
            broker_url,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 0),
        )
        self._backoff = Backoff(f"queue depth read from the broker for {', '.join(self.queues) or '-'}", log)
        self._next_read = 0.0  # time.monotonic() before which Redis is not asked (back-off)

    def lists(self, queue: str) -> list[str]:
        return [queue, *(f"{queue}{KOMBU_PRIORITY_SEPARATOR}{p}" for p in self._priorities)]

    def depths(self) -> dict[str, int]:
        pipe = self._redis.pipeline(transaction=False)
        for queue in self.queues:
            for name in self.lists(queue):
                pipe.llen(name)
        sizes = iter(pipe.execute())
        return {queue: sum(int(next(sizes)) for _ in self.lists(queue)) for queue in self.queues}

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "diffgentor_queue_depth",
            "Messages waiting in Redis per model queue (all priority sub-lists)",
            labels=["queue"],
        )
        up = GaugeMetricFamily("diffgentor_broker_up", "1 if the broker answered the queue-depth read")
        return depth, up

    def describe(self) -> Iterable[GaugeMetricFamily]:
        """Without samples: registering the collector must not read Redis."""
        return list(self._families())

    def collect(self) -> Iterable[GaugeMetricFamily]:
        depth, up = self._families()
        now = time.monotonic()
        sizes: dict[str, int] | None = None
        if now >= self._next_read:
            try:
                sizes = self.depths()
            except Exception as exc:  # the scrape still succeeds; broker_up tells the broker is down
                self._next_read = now + self._backoff.failed(exc, self.retry_seconds)
            else:
                self._backoff.succeeded()
                self._next_read = 0.0
        for queue, size in (sizes or {}).items():
            depth.add_metric([queue], size)
        up.add_metric([], 0 if sizes is None else 1)
        yield depth
        yield up

    def close(self) -> None:
        self._redis.close()


class AcceleratorMemoryCollector(Collector):
    """CUDA peak allocated/reserved bytes per device; nothing on CPU or before CUDA is in use.

    It never imports torch or initialises CUDA itself: a scrape must not change the process.
    A CUDA error (a device fault) exports nothing and logs one line per back-off step instead
    of failing every scrape with a traceback.
    """

    def __init__(self) -> None:
        self._backoff = Backoff("accelerator memory read", log)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterable[GaugeMetricFamily]:
        torch = sys.modules.get("torch")
        try:
            if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
                return
            allocated = GaugeMetricFamily(
                "diffgentor_accelerator_max_allocated_bytes",
                "torch.cuda.max_memory_allocated per device",
                labels=["device"],
            )
            reserved = GaugeMetricFamily(
                "diffgentor_accelerator_max_reserved_bytes",
                "torch.cuda.max_memory_reserved per device",
                labels=["device"],
            )
            for index in range(torch.cuda.device_count()):
                allocated.add_metric([f"cuda:{index}"], torch.cuda.max_memory_allocated(index))
                reserved.add_metric([f"cuda:{index}"], torch.cuda.max_memory_reserved(index))
        except Exception as exc:
            self._backoff.failed(exc, 0)
            return
        self._backoff.succeeded()
        yield allocated
        yield reserved


REGISTRY.register(AcceleratorMemoryCollector())


# ---- recording ------------------------------------------------------------------------------


def job_started(model: str) -> None:
    WORKER_BUSY.labels(model).set(1)


def job_finished(model: str, status: str, run_seconds: float, *, busy: bool = False) -> None:
    """`busy`: [issue 13] another job is already running (its finish overlapped the next job)."""
    JOBS_FINISHED.labels(model, status).inc()
    JOB_RUN_SECONDS.labels(model, status).observe(run_seconds)
    WORKER_BUSY.labels(model).set(1 if busy else 0)
    LAST_JOB_FINISHED.labels(model).set(time.time())


def set_busy(model: str, busy: bool) -> None:
    WORKER_BUSY.labels(model).set(1 if busy else 0)


def queue_waited(model: str, seconds: float) -> None:
    JOB_QUEUE_WAIT_SECONDS.labels(model).observe(max(seconds, 0.0))


class InstrumentedEngine:
    """Wraps an engine: records steps per second after each generation, passes everything through."""

    def __init__(self, engine: Any, model: str) -> None:
        self._engine = engine
        self._model = model

    @property
    def provenance(self) -> Any:
        return self._engine.provenance

    def generate(self, request: Any, step_callback: Any = None) -> Any:
        result = self._engine.generate(request, step_callback)
        denoise = result.timings.get("denoise") if getattr(result, "timings", None) else None
        if denoise:
            STEPS_PER_SECOND.labels(self._model).set(request.num_inference_steps / denoise)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def instrument_engine(
    factory: Callable[[], Any], model: str | None = None
) -> Callable[[], InstrumentedEngine]:
    """A factory that times the model load and returns an instrumented engine."""

    def load() -> InstrumentedEngine:
        name = model or current_model()
        started = time.perf_counter()
        engine = factory()
        MODEL_LOAD_SECONDS.labels(name).set(time.perf_counter() - started)
        MODEL_LOADS.labels(name).inc()
        return InstrumentedEngine(engine, name)

    return load


# ---- process wiring -------------------------------------------------------------------------

_model: str = "unknown"
_exporter: Any = None


def current_model() -> str:
    return _model


def metrics_port(environ: dict[str, str] | None = None) -> int:
    raw = (environ if environ is not None else os.environ).get(METRICS_PORT_ENV, "").strip()
    if not raw:
        return 0
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{METRICS_PORT_ENV}={raw!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{METRICS_PORT_ENV}={raw!r} is out of range")
    return port


def start_exporter(
    model: str, queues: Sequence[str], broker_url: str | None, port: int, addr: str = "0.0.0.0"
) -> Any:
    """Serve REGISTRY on `port` from this process (call it in the process that runs jobs)."""
    global _model, _exporter
    _model = model
    if broker_url and broker_url.startswith(("redis://", "rediss://", "unix://")) and queues:
        REGISTRY.register(QueueDepthCollector(broker_url, queues))
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    _exporter = server
    log.info("Prometheus metrics on %s:%d/metrics (pid %d)", addr, port, os.getpid())
    return server


def set_model(model: str) -> None:
    global _model
    _model = model
