"""[issue 13] The Redis template path of `CeleryPublisher` writes what kombu writes, and a Celery
worker (kombu's Redis transport, task protocol v2) runs it, most urgent first."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from worker.celery_app import make_producer_app
from worker.jobstore import PublishTarget
from worker.publish import RUN_JOB_TASK_NAME, CeleryPublisher
from worker.settings import load_settings


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def _snapshot(client: redis.Redis) -> tuple[dict[bytes, list[dict[str, Any]]], dict[bytes, set[bytes]]]:
    """Every list (decoded messages, oldest first) and set (kombu's bindings) in the database."""
    lists: dict[bytes, list[dict[str, Any]]] = {}
    sets: dict[bytes, set[bytes]] = {}
    for key in client.keys("*"):
        kind = client.type(key)
        if kind == b"list":
            lists[key] = [json.loads(raw) for raw in reversed(client.lrange(key, 0, -1))]
        elif kind == b"set":
            sets[key] = client.smembers(key)
    return lists, sets


def _targets() -> list[PublishTarget]:
    ids = [str(uuid.uuid4()) for _ in range(12)]
    return [
        *(PublishTarget(job_id, "model-a", priority) for priority, job_id in enumerate(ids[:10])),
        PublishTarget(ids[10], "model-b", 0),
        PublishTarget(ids[11], "model-b", 9),
        PublishTarget("odd 'id' \"é\"", "model-b", 4),  # not a plain id: kombu builds that one itself
    ]


def test_fast_payloads_equal_kombus_field_by_field(redis_url: str, broker: redis.Redis) -> None:
    targets = _targets()
    kombu_path = CeleryPublisher(redis_url, fast=False)
    kombu_path.publish(targets)
    expected_lists, expected_sets = _snapshot(broker)
    broker.flushdb()
    fast = CeleryPublisher(redis_url)
    fast.publish(targets[:3])
    fast.publish(targets[3:])  # the second call reuses the templates
    assert fast.fast and not kombu_path.fast
    lists, sets = _snapshot(broker)
    kombu_path.close()
    fast.close()

    # Same lists (priority sub-queues 'model-a\x06\x163' ...), same bindings declared.
    assert sorted(lists) == sorted(expected_lists) and len(lists) == 7
    assert b"model-a\x06\x169" in lists and b"model-b" in lists
    assert sets == expected_sets and sets
    tags: list[str] = []
    for key, messages in expected_lists.items():
        assert len(lists[key]) == len(messages)
        for mine, theirs in zip(lists[key], messages, strict=True):
            assert set(mine) == set(theirs)
            assert mine["headers"] == theirs["headers"]  # task, id, root_id, argsrepr, origin ...
            assert mine["body"] == theirs["body"]  # base64 of [[job_id], {}, {callbacks ...}]
            assert (mine["content-type"], mine["content-encoding"]) == (
                theirs["content-type"],
                theirs["content-encoding"],
            )
            tag = mine["properties"].pop("delivery_tag")
            theirs["properties"].pop("delivery_tag")
            assert mine["properties"] == theirs["properties"]  # correlation_id, priority, delivery_info
            assert str(uuid.UUID(tag)) == tag
            tags.append(tag)
    assert len(set(tags)) == len(targets)  # a fresh delivery tag per message
    one = lists[b"model-a\x06\x169"][0]
    assert one["headers"]["task"] == RUN_JOB_TASK_NAME
    assert one["headers"]["argsrepr"] == repr([one["headers"]["id"]])
    assert one["properties"]["delivery_info"] == {"exchange": "", "routing_key": "model-a"}


def test_memory_broker_keeps_the_kombu_path() -> None:
    publisher = CeleryPublisher("memory://")
    publisher.publish([PublishTarget(str(uuid.uuid4()), "model-a", 0)])
    assert not publisher.fast
    publisher.close()


def test_unreachable_redis_raises_and_a_later_publish_works(redis_url: str, broker: redis.Redis) -> None:
    dead = CeleryPublisher("redis://127.0.0.1:1/0")
    with pytest.raises(Exception):  # noqa: B017 - kombu's / redis-py's connection error
        dead.publish([PublishTarget(str(uuid.uuid4()), "model-a", 9)])
    publisher = CeleryPublisher(redis_url)
    job_id = str(uuid.uuid4())
    publisher.publish([PublishTarget(job_id, "model-a", 9)])  # most urgent: the list 'model-a' itself
    broker.client_kill_filter(_type="normal", skipme=True)  # the publisher's pooled connection dies
    publisher.publish([PublishTarget(job_id, "model-a", 9)])  # a duplicate is harmless (the claim)
    assert broker.llen("model-a") == 2
    publisher.close()


def test_a_celery_worker_runs_fast_messages_most_urgent_first(redis_url: str, broker: redis.Redis) -> None:
    from celery.contrib.testing.worker import start_worker

    settings = load_settings({})
    app = make_producer_app(redis_url, settings)
    ran: list[str] = []
    done = threading.Event()
    ids = {priority: str(uuid.uuid4()) for priority in (0, 4, 9, 6)}
    odd = "odd 'id'"

    class RunJob(app.Task):
        name = RUN_JOB_TASK_NAME

        def run(self, job_id: str) -> None:
            ran.append(job_id)
            if len(ran) == len(ids) + 1:
                done.set()

    # Registered over whatever has the name: once another test in this process has imported
    # worker.tasks, its run_job (a shared task) joins every new app, and a plain @app.task of the same
    # name would lose to it, so the worker would run the real task and this one never.
    app.register_task(RunJob())

    publisher = CeleryPublisher(redis_url)
    publisher.publish([PublishTarget(job_id, "fast-queue", priority) for priority, job_id in ids.items()])
    publisher.publish([PublishTarget(odd, "fast-queue", 0)])
    assert publisher.fast
    with start_worker(app, pool="solo", perform_ping_check=False, queues=["fast-queue"], shutdown_timeout=30):
        assert done.wait(30), f"the worker ran only {ran}"
    publisher.close()
    # Sent as 9 - p and folded into kombu's steps: 9 -> 0; 4 -> 5 and 6 -> 3 share step 3 (in the
    # order sent); 0 and the odd id -> 9 (the plain list 'fast-queue').
    assert ran == [ids[9], ids[4], ids[6], ids[0], odd]
