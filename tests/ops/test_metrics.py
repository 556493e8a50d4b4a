"""Collectors and settings of the metrics module, against the real Redis."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry

from worker import metrics
from worker.jobstore import PublishTarget
from worker.publish import CeleryPublisher
from worker.testing import free_port


def _samples(collector: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in collector.collect()
        for s in family.samples
    }  # type: ignore[attr-defined]


def test_queue_depth_counts_every_priority_sub_list(redis_url: str) -> None:
    queue, other = f"depth-{uuid.uuid4().hex[:6]}", f"depth-{uuid.uuid4().hex[:6]}"
    publisher = CeleryPublisher(redis_url)
    try:
        publisher.publish(
            [PublishTarget(str(uuid.uuid4()), queue, p) for p in (0, 0, 5, 9, 9)]
            + [PublishTarget(str(uuid.uuid4()), other, 0)]
        )
    finally:
        publisher.close()
    client = redis.Redis.from_url(redis_url)
    lists = [name for name in client.keys(f"{queue}*")]
    assert len(lists) >= 2, f"expected priority sub-lists, found {lists}"  # the test means something
    collector = metrics.QueueDepthCollector(redis_url, [queue, other, "empty-queue"])
    try:
        samples = _samples(collector)
    finally:
        collector.close()
        client.delete(*lists, *client.keys(f"{other}*"))
    assert samples[("diffgentor_queue_depth", (("queue", queue),))] == 5
    assert samples[("diffgentor_queue_depth", (("queue", other),))] == 1
    assert samples[("diffgentor_queue_depth", (("queue", "empty-queue"),))] == 0
    assert samples[("diffgentor_broker_up", ())] == 1


def test_queue_depth_answers_quickly_when_the_broker_is_down() -> None:
    collector = metrics.QueueDepthCollector(f"redis://127.0.0.1:{free_port()}/0", ["q"], timeout_seconds=0.5)
    started = time.monotonic()
    samples = _samples(collector)
    assert time.monotonic() - started < 2
    assert samples == {("diffgentor_broker_up", ()): 0}


def test_no_accelerator_memory_on_cpu() -> None:
    import torch  # imported as in a worker that ran jobs on CPU

    assert not torch.cuda.is_available() or pytest.skip("this check is for CPU hosts")
    registry = CollectorRegistry()
    registry.register(metrics.AcceleratorMemoryCollector())
    assert b"accelerator" not in generate_latest(registry)


def test_metrics_port_setting() -> None:
    assert metrics.metrics_port({}) == 0
    assert metrics.metrics_port({"DG_METRICS_PORT": " 9100 "}) == 9100
    for bad in ("abc", "70000"):
        with pytest.raises(ValueError, match="DG_METRICS_PORT"):
            metrics.metrics_port({"DG_METRICS_PORT": bad})
