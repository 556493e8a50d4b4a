"""Long-running loops survive faults: one log line per failure and back-off step, no traceback
storm, a longer wait while failing, recovery afterwards.

The heartbeat thread meets a real PostgreSQL outage (a FaultProxy in front of the shared server
refuses, then forwards again); the queue-depth collector meets its own `redis-server` stopped and
started again (the shared Redis is never touched).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from datetime import datetime
from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry
from sqlalchemy.engine import make_url

from tests.support import RedisServer
from worker import metrics
from worker.backoff import Backoff
from worker.db import make_engine, session_factory
from worker.faults import FaultProxy
from worker.registry import Presence, WorkerRegistry
from worker.testing import wait_for


def _lines(caplog: pytest.LogCaptureFixture, logger: str, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger and r.levelno == level]


def test_backoff_steps_and_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test.backoff")
    backoff = Backoff("the thing", logging.getLogger("test.backoff"))
    error = ConnectionRefusedError(111, "Connection refused\nsecond line")
    assert [backoff.failed(error, 10) for _ in range(6)] == [10, 20, 40, 40, 40, 40]
    warnings = _lines(caplog, "test.backoff", logging.WARNING)
    assert [r.getMessage() for r in warnings] == [
        "the thing failed (ConnectionRefusedError: [Errno 111] Connection refused); retrying in 10s",
        "the thing failed (ConnectionRefusedError: [Errno 111] Connection refused); retrying in 20s (2 failures in a row)",
        "the thing failed (ConnectionRefusedError: [Errno 111] Connection refused); retrying in 40s (3 failures in a row)",
    ]
    assert not any(r.exc_info for r in caplog.records)
    backoff.succeeded()
    assert (
        "the thing works again after 6 failure(s)"
        in _lines(caplog, "test.backoff", logging.INFO)[0].getMessage()
    )
    assert backoff.failed(error, 10) == 10  # reset by the success
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="test.backoff")
    backoff.failed(error, 10)
    assert any(r.exc_info for r in caplog.records)  # the traceback only at DEBUG


class _FlakyRegistry:
    """Registry stand-in whose writes fail while `down` is set; records when it was called."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.calls: list[float] = []
        self.rows: set[str] = set()

    def _call(self) -> None:
        self.calls.append(time.monotonic())
        if self.down.is_set():
            raise OSError("connection refused")

    def heartbeat(self, worker_id: str, **_: object) -> bool:
        self._call()
        return worker_id in self.rows

    def register(self, worker_id: str, **_: object) -> list[str]:
        self._call()
        self.rows.add(worker_id)
        return []

    def prune(self, _older_than: float) -> int:
        self._call()
        return 0

    def unregister(self, worker_id: str) -> None:
        self._call()
        self.rows.discard(worker_id)

    def queue_waits(self, _ids: list[str], _worker_id: str) -> list[float]:
        return []


def test_presence_backs_off_while_failing_and_logs_few_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="worker.registry")
    flaky = _FlakyRegistry()
    flaky.down.set()
    presence = Presence(flaky, "w-flaky", model_name="m", queue="m", interval_seconds=0.05)  # type: ignore[arg-type]
    presence.start()
    try:
        time.sleep(1.2)
        assert presence.alive and flaky.rows == set()
        gaps = [b - a for a, b in zip(flaky.calls, flaky.calls[1:], strict=False)]
        assert len(flaky.calls) <= 10, gaps  # 0.05, 0.1, then 0.2 s apart: not one try per beat (24)
        assert max(gaps) >= 0.18
        presence.job_started("j1")  # a job event does not cut the back-off short
        calls = len(flaky.calls)
        time.sleep(0.1)
        assert len(flaky.calls) <= calls + 1
        warnings = _lines(caplog, "worker.registry", logging.WARNING)
        assert len(warnings) == 3 and not any(r.exc_info for r in caplog.records)
        assert "heartbeat of worker w-flaky failed (OSError: connection refused)" in warnings[0].getMessage()
        flaky.down.clear()
        wait_for(lambda: flaky.rows == {"w-flaky"}, 5, "not registered after the outage")
        wait_for(lambda: _lines(caplog, "worker.registry", logging.INFO), 5, "no recovery line")
        assert "works again" in _lines(caplog, "worker.registry", logging.INFO)[0].getMessage()
    finally:
        presence.stop()
    assert flaky.rows == set()


@pytest.mark.integration
def test_presence_survives_a_database_outage_and_registers_again(
    migrated_pg_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="worker.registry")
    upstream = make_url(migrated_pg_url)
    proxy = FaultProxy(upstream.host or "127.0.0.1", upstream.port or 5432, name="postgresql").start()
    through = upstream.set(port=proxy.port).render_as_string(hide_password=False)
    engine, direct_engine = make_engine(through), make_engine(migrated_pg_url)
    presence = Presence(
        WorkerRegistry(session_factory(engine)),
        "w-outage",
        model_name="outage",
        queue="outage",
        interval_seconds=0.1,
    )
    direct = WorkerRegistry(session_factory(direct_engine))

    def beat() -> datetime | None:
        rows = direct.list(worker_id="w-outage")
        return rows[0].heartbeat_at if rows else None

    try:
        presence.start()
        wait_for(beat, 10, "never registered")
        proxy.refuse()  # PostgreSQL refuses; the pooled connection is reset
        time.sleep(0.3)
        last_before = beat()
        time.sleep(2.0)
        assert presence.alive and beat() == last_before  # no write got through, the thread lives
        direct.unregister("w-outage")  # as if another worker expired the silent row meanwhile
        warnings = _lines(caplog, "worker.registry", logging.WARNING)
        assert 1 <= len(warnings) <= 3, [r.getMessage() for r in warnings]  # first failure + back-off steps
        assert "heartbeat of worker w-outage failed (OperationalError: " in warnings[0].getMessage()
        assert not any(r.exc_info for r in caplog.records)
        proxy.restore()  # the database is back on the same address
        wait_for(lambda: beat() is not None, 10, "not registered again after the outage")
        first = beat()
        wait_for(lambda: (beat() or first) > first, 5, "heartbeat does not advance after the outage")  # type: ignore[operator]
        assert any("works again" in r.getMessage() for r in _lines(caplog, "worker.registry", logging.INFO))
    finally:
        presence.stop()
        proxy.close()
        engine.dispose()
        assert direct.list(worker_id="w-outage") == []
        direct_engine.dispose()


def _samples(collector: object) -> dict[str, float]:
    return {
        s.name if not s.labels else f"{s.name}{sorted(s.labels.items())}": s.value
        for family in collector.collect()
        for s in family.samples
    }  # type: ignore[attr-defined]


@pytest.mark.integration
def test_queue_depth_collector_with_its_redis_down_and_back(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="worker.metrics")
    collector = metrics.QueueDepthCollector(redis_server.url, ["q1"], timeout_seconds=0.5, retry_seconds=1.0)
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        assert _samples(collector) == {
            "diffgentor_queue_depth[('queue', 'q1')]": 0,
            "diffgentor_broker_up": 1,
        }
        redis_server.stop()
        started = time.monotonic()
        for _ in range(20):  # scrapes while Redis is down: no exception, no traceback, one line
            text = generate_latest(registry).decode()
            assert "diffgentor_broker_up 0.0" in text and 'diffgentor_queue_depth{queue="q1"}' not in text
        assert time.monotonic() - started < 2  # within the back-off, Redis is not even asked
        warnings = _lines(caplog, "worker.metrics", logging.WARNING)
        assert len(warnings) == 1 and not any(r.exc_info for r in caplog.records)
        assert "queue depth read from the broker for q1 failed (ConnectionError: " in warnings[0].getMessage()
        time.sleep(1.1)
        assert _samples(collector)["diffgentor_broker_up"] == 0  # a second failure: the next back-off step
        assert len(_lines(caplog, "worker.metrics", logging.WARNING)) == 2
        redis_server.start()  # same port
        wait_for(lambda: _samples(collector)["diffgentor_broker_up"] == 1, 5, "collector did not recover")
        assert any("works again" in r.getMessage() for r in _lines(caplog, "worker.metrics", logging.INFO))
    finally:
        collector.close()


def test_collectors_never_raise_into_the_exporter(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="worker.metrics")
    collector = metrics.QueueDepthCollector("redis://127.0.0.1:1/0", ["q"], retry_seconds=0)

    def broken() -> dict[str, int]:
        raise RuntimeError("unexpected reply")

    monkeypatch.setattr(collector, "depths", broken)

    class _BrokenCuda:
        @staticmethod
        def is_available() -> bool:
            return True

        @staticmethod
        def is_initialized() -> bool:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=_BrokenCuda()))
    registry = CollectorRegistry()
    registry.register(collector)
    registry.register(metrics.AcceleratorMemoryCollector())
    for _ in range(5):
        assert "diffgentor_broker_up 0.0" in generate_latest(registry).decode()
    warnings = [r.getMessage() for r in _lines(caplog, "worker.metrics", logging.WARNING)]
    assert sum("RuntimeError: unexpected reply" in m for m in warnings) == 3  # first + 2 back-off steps
    assert sum("RuntimeError: CUDA error" in m for m in warnings) == 3
    assert not any(r.exc_info for r in caplog.records)
    collector.close()
