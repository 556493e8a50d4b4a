"""Shared set-up of the benchmarks: throw-away databases, a moto S3, the tiny model, workers.

Everything runs against the real services on this machine (PostgreSQL, Redis) and is
removed afterwards. Each benchmark prints a Markdown table row and a JSON line.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.testing import WorkerProcess, free_port, temporary_database, wait_for, worker_environ

REPO_ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("DG_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_BASE = os.environ.get("DG_BENCH_REDIS_URL", "redis://127.0.0.1:6379")
BENCH_REDIS_DB = int(os.environ.get("DG_BENCH_REDIS_DB", "14"))


@contextmanager
def pg_database() -> Iterator[str]:
    """A migrated, empty PostgreSQL database, dropped afterwards."""
    from worker.db import upgrade

    with temporary_database(PG_ADMIN_URL, prefix="dg_bench_") as url:
        upgrade(url)
        yield url


@contextmanager
def redis_url() -> Iterator[str]:
    """A Redis database reserved for benchmarks (flushed before and after)."""
    import redis

    url = f"{REDIS_BASE}/{BENCH_REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@contextmanager
def s3_bucket() -> Iterator[tuple[str, str]]:
    """(endpoint, bucket) on an in-process moto server."""
    import logging

    import boto3
    from botocore.config import Config
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ.setdefault(key, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    bucket = "bench"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
    ).create_bucket(Bucket=bucket)
    try:
        yield endpoint, bucket
    finally:
        server.stop()


def tiny_model(directory: Path) -> dict[str, str]:
    from worker.deepgen.tiny import tiny_env, write_tiny_model

    return tiny_env(write_tiny_model(directory))


def worker_env(
    database_url: str,
    broker_url: str,
    endpoint: str,
    bucket: str,
    model_env: Mapping[str, str],
    home: Path,
    **extra: str,
) -> dict[str, str]:
    return worker_environ(
        database_url=database_url,
        broker_url=broker_url,
        storage_url=f"s3://{bucket}/bench",
        home=home,
        s3_endpoint_url=endpoint,
        model_env=model_env,
        **extra,
    )


def start_worker(env: Mapping[str, str], model: str, log_path: Path) -> WorkerProcess:
    """A production-style worker subprocess (`celery -A worker.celery_app worker --pool prefork -c 1`)."""
    # WARNING: the log stays small over long runs; readiness is the registry plus a warm-up job (stack()).
    return WorkerProcess.celery(env, model, log_path, loglevel="WARNING", cwd=REPO_ROOT).start()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.01) -> None:
    wait_for(condition, timeout, f"timed out waiting for {what}", interval)


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


@dataclass
class Report:
    name: str
    n: int
    figures: dict[str, Any]
    target: str
    met: bool

    def emit(self) -> None:
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.figures.items()
        )
        print(f"| {self.name} | N={self.n} | {shown} | {self.target} | {'met' if self.met else 'MISSED'} |")
        print(
            json.dumps(
                {
                    "bench": self.name,
                    "n": self.n,
                    **self.figures,
                    "target": self.target,
                    "met": self.met,
                    "machine": machine(),
                }
            )
        )


def machine() -> dict[str, str]:
    import sqlalchemy
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = next(
        line.split()[1]
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return {
        "nproc": str(os.cpu_count()),
        "ram_gib": f"{int(mem) / 2**20:.1f}",
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "load1": f"{os.getloadavg()[0]:.2f}",
        "loadavg_1_5_15": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }


@dataclass
class Stack:
    store: Any
    publisher: Any
    model: str
    workers: list[WorkerProcess]
    model_env: dict[str, str]
    database_url: str

    def submit(self, params: Mapping[str, Any], count: int = 1, prompt: str = "a red fox") -> list[str]:
        from worker.submission import submit_jobs

        specs = [
            {"kind": "t2i", "prompt": f"{prompt} {i}", "model_name": self.model, "params": dict(params)}
            for i in range(count)
        ]
        return [s.job.id for s in submit_jobs(self.store, self.publisher, specs)]

    def wait_done(self, job_ids: Sequence[str], timeout: float = 600, interval: float = 0.005) -> list[Any]:
        from schemas.enums import TERMINAL_STATUSES

        def done() -> bool:
            return all(j.status in TERMINAL_STATUSES for j in self.store.get_many(list(job_ids)))

        wait_until(done, timeout, f"{len(job_ids)} jobs", interval)
        return self.store.get_many(list(job_ids))


@contextmanager
def stack(workdir: Path, workers: int = 1, **worker_extra: str) -> Iterator[Stack]:
    """PostgreSQL + Redis + moto S3 + the tiny model + `workers` worker subprocesses, all ready."""
    from worker.db import make_engine, session_factory
    from worker.jobstore import JobStore
    from worker.publish import CeleryPublisher

    model = f"bench-{uuid.uuid4().hex[:6]}"
    model_env = tiny_model(workdir / "tiny")
    with pg_database() as db, redis_url() as broker, s3_bucket() as (endpoint, bucket):
        env = worker_env(db, broker, endpoint, bucket, model_env, workdir / "home", **worker_extra)
        engine = make_engine(db)
        store = JobStore(session_factory(engine))
        publisher = CeleryPublisher(broker)
        started = [start_worker(env, model, workdir / f"worker-{i}.log") for i in range(workers)]
        try:
            result = Stack(store, publisher, model, started, model_env, db)
            # Ready = each worker has loaded its model: one warm-up job per worker, run to the end.
            from worker.registry import WorkerRegistry

            registry = WorkerRegistry(session_factory(engine))
            wait_until(
                lambda: len(registry.list(model_name=model)) == workers, 120, "workers to register", 0.1
            )
            deadline = time.monotonic() + 300
            while not all(w.jobs_done > 0 for w in registry.list(model_name=model)):
                if time.monotonic() > deadline:
                    raise TimeoutError("a worker never took a warm-up job")
                warm = result.submit(
                    {"num_inference_steps": 1, "height": 64, "width": 64}, workers, "warm-up"
                )
                result.wait_done(warm, 300)
                time.sleep(0.2)  # the registry row is written just after the job ends
            yield result
        finally:
            for worker in started:
                worker.stop()
            publisher.close()
            store.close()  # its held publish confirmations, before the database is dropped
            engine.dispose()


def direct_engine(model_env: Mapping[str, str]) -> Any:
    """The same tiny model in this process, with the worker's thread count, for the baselines."""
    import torch

    from worker.deepgen.engine import DeepGenEngine

    torch.set_num_threads(1)
    return DeepGenEngine.from_env({**os.environ, **model_env})


def direct_request(params: Mapping[str, Any], seed: int = 1) -> Any:
    from worker.deepgen.types import GenerationRequest

    return GenerationRequest(
        kind="t2i", prompt="a red fox 0", negative_prompt="", guidance_scale=4.0, seed=seed, **dict(params)
    )
