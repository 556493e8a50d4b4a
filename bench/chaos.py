"""Fault benchmark: the whole fault set on real services, one census row per scenario.

    .venv/bin/python -m bench.chaos                      # every scenario, short lease/sweep settings
    .venv/bin/python -m bench.chaos --scenario db-refuse --scenario s3-hang
    .venv/bin/python -m bench.chaos --quick              # fewer jobs per scenario (same faults)
    .venv/bin/python -m bench.chaos --defaults           # production DG_* defaults (lease 60 s, sweep 30 s)

Each scenario gets its own services, on their own ports and databases, and removes them:

* its own ``redis-server`` (free port, ``--save "" --appendonly no``: a restart comes back empty),
* its own PostgreSQL database (``worker.testing.temporary_database``), which the workers and the
  sweeper reach THROUGH a :class:`worker.faults.FaultProxy` (the bench itself connects directly,
  as a producer on another network path would),
* a moto S3 server with a versioned bucket (every PUT is kept, so re-uploads are counted),
  reached by the workers THROUGH a second fault proxy,
* the tiny random-weight DeepGen model, 2 real Celery workers (prefork, one child, prefetch 1)
  and ``diffgentor sweep --loop``, all subprocesses kept running by a supervisor that restarts
  whatever exits (as the compose file's ``restart: unless-stopped`` does), and records why.

Jobs are tiny (64x64, 2 steps). Short settings by default (DG_LEASE_SECONDS=6,
DG_HEARTBEAT_SECONDS=1, DG_PUBLISH_GRACE_SECONDS=3, DG_SWEEP_INTERVAL_SECONDS=1); the
visibility timeout and ``DG_REPUBLISH_STALE_SECONDS`` keep their defaults on purpose.

Census per scenario, read from the job table and the bucket after the drain (workers stopped):
submitted, succeeded, failed, failed_infra (failed by an infrastructure fault: ``error_class``
'transient', or an error naming StorageError/unreachable/OperationalError/connection/timeout,
or AttemptsExhausted outside the poison scenario), cancelled, lost (not terminal at the drain
timeout), duplicated (more than one artifact row per (job, index), an object whose sha256 differs
from its artifact row, or more than one distinct object PUT for a job's artifact key), and the
time to drain (from the end of the fault or the last submit, whichever is later, until every
job is terminal). Targets: 0 lost, 0 duplicated, 0 failed_infra (plus the scenario's own
checks). Exits 1 if a target is missed, after printing the reasons.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from random import Random
from typing import Any

from worker.faults import FaultProxy
from worker.testing import (
    READY_MARKER,
    RedisServer,
    WorkerProcess,
    celery_worker_argv,
    free_port,
    temporary_database,
    wait_for,
    worker_environ,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("DG_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PARAMS: dict[str, Any] = {"num_inference_steps": 2, "height": 64, "width": 64}
SHORT_SETTINGS = {
    "DG_LEASE_SECONDS": "6",
    "DG_HEARTBEAT_SECONDS": "1",
    "DG_PUBLISH_GRACE_SECONDS": "3",
    "DG_SWEEP_INTERVAL_SECONDS": "1",
}
TERMINAL = ("succeeded", "failed", "cancelled")
STORAGE_PREFIX = "chaos"
FAULT_SECONDS = 10.0
# An infrastructure fault, by the words of the stored error (until rows carry error_class).
INFRA_ERROR = re.compile(
    r"StorageError|unreachable|OperationalError|DBAPIError|InterfaceError|connection|"
    r"timed? ?out|EndpointConnectionError|ReadTimeout|AttemptsExhausted",
    re.IGNORECASE,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- services


@contextlib.contextmanager
def moto_s3() -> Iterator[tuple[str, int]]:
    """An in-process moto S3 server: (endpoint, port)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.stop()


def s3_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
    )


# ----------------------------------------------------------------------------------- supervision


@dataclass
class Slot:
    """One supervised process (a worker or the sweeper) and its history."""

    name: str
    argv: list[str]
    kind: str  # "worker" | "sweeper"
    proc: WorkerProcess | None = None
    incarnation: int = 0
    started_at: float = 0.0
    expected_exit: bool = False  # the bench killed it
    exits: list[str] = field(default_factory=list)
    dead_groups: list[int] = field(default_factory=list)  # process groups of earlier incarnations
    log_paths: list[Path] = field(default_factory=list)

    def ready(self) -> bool:
        if self.proc is None or self.proc.process.poll() is not None:
            return False
        return self.kind != "worker" or READY_MARKER in self.proc.log_text()


class Supervisor:
    """Keeps the workers and the sweeper running: an exited process is started again (after >= 1 s)."""

    def __init__(self, env: Mapping[str, str], workdir: Path) -> None:
        self.env = dict(env)
        self.workdir = workdir
        self.slots: list[Slot] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, name: str, argv: Sequence[str], kind: str) -> Slot:
        slot = Slot(name, list(argv), kind)
        self.slots.append(slot)
        self._start(slot)
        return slot

    def _start(self, slot: Slot) -> None:
        slot.incarnation += 1
        path = self.workdir / f"{slot.name}.{slot.incarnation}.log"
        slot.log_paths.append(path)
        slot.proc = WorkerProcess(slot.argv, self.env, path, cwd=REPO_ROOT).start()
        slot.started_at = time.monotonic()
        slot.expected_exit = False

    def run(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            with self._lock:
                for slot in self.slots:
                    proc = slot.proc
                    if proc is None or proc.process.poll() is None:
                        continue
                    if not slot.dead_groups or slot.dead_groups[-1] != proc.pid:
                        rc = proc.process.returncode
                        why = "killed by the bench" if slot.expected_exit else "EXITED ON ITS OWN"
                        tail = "" if slot.expected_exit else f"; log tail: {_tail(proc.log_text())}"
                        slot.exits.append(
                            f"{slot.name} #{slot.incarnation} rc={rc} ({why}){_normalized(tail)}"
                        )
                        slot.dead_groups.append(proc.pid)
                        proc._close_log()
                        log(f"{slot.name} #{slot.incarnation} exited rc={rc} ({why}); restarting")
                    if time.monotonic() - slot.started_at >= 1.0:
                        self._start(slot)

    def kill(self, slot: Slot, what: str) -> int:
        """kill -9 the worker's 'child' (its pool process), 'parent' (main process only) or 'group' (both)."""
        with self._lock:
            proc = slot.proc
            if proc is None:
                raise RuntimeError(f"{slot.name} is not running")
            if what == "child":
                children = proc.child_pids()
                if not children:
                    raise RuntimeError(f"{slot.name} has no pool child right now")
                os.kill(children[0], signal.SIGKILL)
                return children[0]
            slot.expected_exit = True
            if what == "parent":
                os.kill(proc.pid, signal.SIGKILL)
            else:
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.pid

    def stop(self) -> list[str]:
        """Stop supervising, warm-stop everything, kill leftovers; returns notes about stragglers."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        notes: list[str] = []
        for slot in self.slots:
            if slot.proc is not None:
                if slot.kind == "worker" and slot.proc.process.poll() is None:
                    # As `docker stop`: SIGTERM to the main process only (a warm shutdown); the
                    # group-wide SIGTERM of WorkerProcess.stop() would also hit the pool child.
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        slot.proc.warm_shutdown(timeout=30)
                slot.proc.stop(timeout=10)
            for group in slot.dead_groups:
                if _group_alive(group):
                    notes.append(
                        f"{slot.name}: processes of the killed incarnation (group {group}) were still "
                        "alive at the end (orphaned pool child)"
                    )
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(group, signal.SIGKILL)
        return notes

    def exits(self) -> list[str]:
        return [e for slot in self.slots for e in slot.exits]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])[:600]


# ---------------------------------------------------------------------------------------- stack


@dataclass
class Stack:
    name: str
    workdir: Path
    model: str
    db_url: str  # direct (the bench's own view)
    engine: Any
    store: Any
    publisher: Any
    redis: RedisServer
    db_proxy: FaultProxy
    s3_proxy: FaultProxy
    s3: Any  # direct boto3 client
    bucket: str
    supervisor: Supervisor
    workers: list[Slot]
    warm_ids: set[str]
    submit_errors: list[str] = field(default_factory=list)
    straggler_notes: list[str] | None = None  # set once the processes are stopped

    def stop_processes(self) -> None:
        """Warm-stop the workers and the sweeper (once): nothing uploads while the census reads."""
        if self.straggler_notes is None:
            self.straggler_notes = self.supervisor.stop()

    def spec_t2i(self, i: int) -> dict[str, Any]:
        return {
            "kind": "t2i",
            "prompt": f"chaos {self.name} {i}",
            "model_name": self.model,
            "params": dict(PARAMS),
        }

    def submit(self, specs: Sequence[Mapping[str, Any]]) -> list[str]:
        """The producer path (insert+commit, publish, mark published); a publish error is kept as a note.

        The rows are committed before a publish failure, so the census (which reads the table by
        model name) still counts them; the sweeper is expected to deliver them.
        """
        from worker.submission import submit_jobs

        try:
            return [s.job.id for s in submit_jobs(self.store, self.publisher, [dict(s) for s in specs])]
        except Exception as exc:
            self.submit_errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            return []

    def running_job_of(self, pid: int) -> str | None:
        import sqlalchemy as sa

        with self.engine.connect() as conn:
            return conn.execute(
                sa.text(
                    "SELECT id FROM jobs WHERE model_name = :m AND status = 'running' "
                    "AND worker_id LIKE :w LIMIT 1"
                ),
                {"m": self.model, "w": f"%:{pid}:%"},
            ).scalar()

    def not_terminal(self) -> int:
        import sqlalchemy as sa

        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text(
                        "SELECT count(*) FROM jobs WHERE model_name = :m "
                        "AND status NOT IN ('succeeded', 'failed', 'cancelled')"
                    ),
                    {"m": self.model},
                ).scalar()
                or 0
            )

    def waiting_messages(self) -> int:
        """Messages in this model's Redis queue (kombu's priority sub-lists included)."""
        import redis

        client = redis.Redis(port=self.redis.port, socket_timeout=1)
        try:
            keys = [self.model] + [f"{self.model}\x06\x16{p}" for p in (3, 6, 9)]
            return sum(int(client.llen(k)) for k in keys)
        finally:
            client.close()


@contextlib.contextmanager
def stack(
    name: str,
    workdir: Path,
    model_env: Mapping[str, str],
    settings: Mapping[str, str],
    sweep_interval: float | None,
) -> Iterator[Stack]:
    import sqlalchemy as sa

    from worker.db import make_engine, session_factory, upgrade
    from worker.jobstore import JobStore
    from worker.publish import CeleryPublisher

    workdir.mkdir(parents=True, exist_ok=True)
    model = f"chaos-{name}-{uuid.uuid4().hex[:6]}"
    pg = sa.engine.make_url(PG_ADMIN_URL)
    with contextlib.ExitStack() as exit_stack:
        db_url = exit_stack.enter_context(temporary_database(PG_ADMIN_URL, prefix="dg_chaos_"))
        upgrade(db_url)
        redis_server = RedisServer(workdir).start()
        exit_stack.callback(redis_server.stop)
        endpoint, moto_port = exit_stack.enter_context(moto_s3())
        s3 = s3_client(endpoint)
        bucket = f"chaos-{uuid.uuid4().hex[:10]}"
        s3.create_bucket(Bucket=bucket)
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        db_proxy = exit_stack.enter_context(
            FaultProxy(pg.host or "127.0.0.1", pg.port or 5432, name="postgres")
        )
        s3_proxy = exit_stack.enter_context(FaultProxy("127.0.0.1", moto_port, name="s3"))
        proxied_db = sa.engine.make_url(db_url).set(host="127.0.0.1", port=db_proxy.port)
        env = worker_environ(
            database_url=proxied_db.render_as_string(hide_password=False),
            broker_url=redis_server.url,
            storage_url=f"s3://{bucket}/{STORAGE_PREFIX}",
            home=workdir / "home",
            s3_endpoint_url=f"http://127.0.0.1:{s3_proxy.port}",
            model_env=model_env,
            **settings,
        )
        engine = make_engine(db_url)
        exit_stack.callback(engine.dispose)
        publisher = CeleryPublisher(redis_server.url)
        exit_stack.callback(publisher.close)
        supervisor = Supervisor(env, workdir)
        exit_stack.callback(supervisor.stop)  # a second stop is harmless
        sweep_argv = [sys.executable, "-m", "api_client.cli", "sweep", "--loop"]
        if sweep_interval is not None:
            sweep_argv += ["--interval", f"{sweep_interval:g}"]
        workers = [supervisor.add(f"worker-{letter}", celery_worker_argv(model), "worker") for letter in "AB"]
        supervisor.add("sweeper", sweep_argv, "sweeper")
        result = Stack(
            name,
            workdir,
            model,
            db_url,
            engine,
            JobStore(session_factory(engine)),
            publisher,
            redis_server,
            db_proxy,
            s3_proxy,
            s3,
            bucket,
            supervisor,
            workers,
            set(),
        )
        supervisor.run()
        warm_up(result)
        yield result


def warm_up(s: Stack, timeout: float = 180) -> None:
    """Both workers consuming, each child with its model loaded (one finished job per child)."""
    deadline = time.monotonic() + timeout
    wait_for(
        lambda: all(w.ready() for w in s.workers),
        timeout,
        lambda: "workers not ready: " + "; ".join(_tail(w.proc.log_text()) for w in s.workers if w.proc),
    )
    seen: set[int] = set()
    while True:
        pids = {pid for w in s.workers if w.proc for pid in w.proc.child_pids()}
        if pids and pids <= seen:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"warm-up: children {sorted(pids)} never all ran a job (seen {sorted(seen)})")
        ids = s.submit([{**s.spec_t2i(i), "prompt": f"warm-up {i}"} for i in range(2)])
        s.warm_ids.update(ids)
        wait_for(
            lambda ids=ids: all(j.status.value in TERMINAL for j in s.store.get_many(ids)),
            120,
            "warm-up jobs",
        )
        for job in s.store.get_many(ids):
            if job.worker_id:
                seen.add(int(job.worker_id.split(":")[1]))


# --------------------------------------------------------------------------------------- feeding


class Feeder:
    """Submits specs `batch` at a time (one producer call each), evenly over `duration` seconds, on a thread."""

    def __init__(
        self,
        s: Stack,
        specs: Sequence[Mapping[str, Any]],
        duration: float,
        on_submit: Callable[[int, str], None] | None = None,
        batch: int = 1,
    ) -> None:
        self.s = s
        self.specs = list(specs)
        self.duration = duration
        self.on_submit = on_submit
        self.batch = batch
        self.ids: list[str] = []
        self.last_submit = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def start(self) -> Feeder:
        self._thread.start()
        return self

    def _run(self) -> None:
        started = time.monotonic()
        starts = range(0, len(self.specs), self.batch)
        step = self.duration / max(1, len(starts))
        for k, first in enumerate(starts):
            time.sleep(max(0.0, started + k * step - time.monotonic()))
            ids = self.s.submit(self.specs[first : first + self.batch])
            self.last_submit = time.monotonic()
            self.ids.extend(ids)
            if self.on_submit is not None:
                for offset, job_id in enumerate(ids):
                    self.on_submit(first + offset, job_id)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> float:
        self._thread.join()
        return self.last_submit


# ------------------------------------------------------------------------------------- scenarios


@dataclass
class Run:
    """What a scenario did, for the drain and the census."""

    reference: float  # monotonic time the drain is measured from (fault over and last submit)
    drain_timeout: float
    expected_failures: set[str] = field(default_factory=set)  # poison jobs
    cancel_requested: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    checks: Callable[[list[dict[str, Any]], dict[str, list[dict[str, Any]]]], list[str]] | None = None
    fault_window: tuple[datetime, datetime] | None = None  # UTC, for the count of jobs the fault met


@dataclass(frozen=True)
class Options:
    quick: bool
    defaults: bool
    drain_timeout: float
    seed: int

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def scenario_kill_storm(s: Stack, o: Options, rng: Random) -> Run:
    """kill -9 of pool children, a worker's main process and a whole worker, spread over a run of jobs."""
    n = o.n(100, 40)
    plan = ["child", "parent", "child", "group", "child"] if not o.quick else ["child", "parent", "group"]
    duration = o.n(30, 14)
    feeder = Feeder(s, [s.spec_t2i(i) for i in range(n)], duration).start()
    started, began = time.monotonic(), _utcnow()
    notes: list[str] = []
    for k, what in enumerate(plan):
        at = started + duration * (k + 0.5) / len(plan) + rng.uniform(-0.5, 0.5)
        time.sleep(max(0.0, at - time.monotonic()))
        wait_for(lambda: any(w.ready() for w in s.workers), 60, "no worker ready to be killed")
        slot = rng.choice([w for w in s.workers if w.ready()])
        # Aim at a job in flight: wait (up to 2 s) until this worker's child runs one.
        job = None
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            children = slot.proc.child_pids() if slot.proc else []
            job = s.running_job_of(children[0]) if children else None
            if job:
                break
            time.sleep(0.01)
        try:
            pid = s.supervisor.kill(slot, what)
        except RuntimeError as exc:
            notes.append(f"kill {k + 1} ({what} of {slot.name}) skipped: {exc}")
            continue
        notes.append(
            f"kill {k + 1}: {what} of {slot.name} (pid {pid}) "
            + (f"during job {job[:8]}" if job else "while idle")
        )
        log(notes[-1])
    last = feeder.join()
    return Run(reference=last, drain_timeout=o.drain_timeout, notes=notes, fault_window=(began, _utcnow()))


def scenario_redis_restart(s: Stack, o: Options, rng: Random) -> Run:
    """Redis dies (kill -9) with a queue of waiting messages and comes back EMPTY."""
    Feeder(s, [s.spec_t2i(i) for i in range(o.n(20, 10))], o.n(5, 3)).start().join()
    burst = o.n(40, 25)
    s.submit([s.spec_t2i(1000 + i) for i in range(burst)])  # one bulk submit, then the crash at once
    waiting = s.waiting_messages()
    began = _utcnow()
    s.redis.kill9()
    killed_at = time.monotonic()
    log(f"redis-server killed with {waiting} message(s) waiting")
    time.sleep(3)
    s.redis.start()
    restarted = time.monotonic()
    log(f"redis-server restarted empty after {restarted - killed_at:.1f} s")
    last = Feeder(s, [s.spec_t2i(2000 + i) for i in range(o.n(10, 6))], 3).start().join()
    notes = [
        f"{waiting} message(s) waiting in Redis at the kill (burst of {burst}); restarted empty "
        f"{restarted - killed_at:.1f} s later; {o.n(10, 6)} jobs submitted after the restart"
    ]
    return Run(
        reference=max(last, restarted),
        drain_timeout=min(o.drain_timeout, 90.0),
        notes=notes,
        fault_window=(began, _utcnow()),
    )


def _proxy_fault(s: Stack, o: Options, proxy: FaultProxy, mode: str) -> Run:
    n, duration = o.n(60, 30), o.n(24, 16)
    feeder = Feeder(s, [s.spec_t2i(i) for i in range(n)], duration).start()
    time.sleep(o.n(7, 3))
    started, began = time.monotonic(), _utcnow()
    with proxy.refusing(FAULT_SECONDS) if mode == "refuse" else proxy.hanging(FAULT_SECONDS):
        log(f"{proxy.name} {mode} for {FAULT_SECONDS:g} s")
    ended = time.monotonic()
    last = feeder.join()
    return Run(
        reference=max(last, ended),
        drain_timeout=o.drain_timeout,
        fault_window=(began, _utcnow()),
        notes=[f"{proxy.name} proxy in {mode} mode for {ended - started:.1f} s"],
    )


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def scenario_db_refuse(s: Stack, o: Options, rng: Random) -> Run:
    return _proxy_fault(s, o, s.db_proxy, "refuse")


def scenario_s3_refuse(s: Stack, o: Options, rng: Random) -> Run:
    return _proxy_fault(s, o, s.s3_proxy, "refuse")


def scenario_s3_hang(s: Stack, o: Options, rng: Random) -> Run:
    return _proxy_fault(s, o, s.s3_proxy, "hang")


def scenario_cancels(s: Stack, o: Options, rng: Random) -> Run:
    """Cancels at random moments: right after submit, while queued, while running, after the end."""
    n, cancels = o.n(50, 30), o.n(20, 12)
    chosen = set(rng.sample(range(n), cancels))
    due: list[tuple[float, str]] = []
    lock = threading.Lock()

    def on_submit(i: int, job_id: str) -> None:
        if i in chosen:  # at once (queued), within 0.15 s (queued or running), or later (often finished)
            delay = rng.choice([0.0, rng.uniform(0.0, 0.15), rng.uniform(0.15, 0.6)])
            with lock:
                heapq.heappush(due, (time.monotonic() + delay, job_id))

    # Bursts of 5: a short queue forms behind the two workers, so cancels meet every state.
    feeder = Feeder(s, [s.spec_t2i(i) for i in range(n)], o.n(12, 8), on_submit, batch=5).start()
    requested: set[str] = set()
    seen: Counter[str] = Counter()
    at_cancel: dict[str, str] = {}
    while len(requested) < cancels and (feeder.alive() or due):
        with lock:
            item = heapq.heappop(due) if due and due[0][0] <= time.monotonic() else None
        if item is None:
            time.sleep(0.005)
            continue
        view = s.store.cancel(item[1])
        requested.add(item[1])
        seen[view.status.value] += 1
        at_cancel[item[1]] = view.status.value
    last = feeder.join()
    summary = ", ".join(f"{status} {count}" for status, count in sorted(seen.items()))
    note = f"{len(requested)} cancels; status right after the cancel call: {summary}"

    def checks(jobs: list[dict[str, Any]], artifacts: dict[str, list[dict[str, Any]]]) -> list[str]:
        problems = [
            f"cancelled job {job['id'][:8]} has artifact rows"
            for job in jobs
            if job["status"] == "cancelled" and artifacts.get(job["id"])
        ]
        problems += [
            f"job {job['id'][:8]} was cancelled while queued but ended {job['status']}"
            for job in jobs
            if at_cancel.get(job["id"]) == "cancelled" and job["status"] != "cancelled"
        ]
        return problems

    return Run(
        reference=last, drain_timeout=o.drain_timeout, cancel_requested=requested, notes=[note], checks=checks
    )


def scenario_poison(s: Stack, o: Options, rng: Random) -> Run:
    """Edits whose input image is corrupt, among good jobs: they fail, readably, once; the rest succeed."""
    from PIL import Image

    good = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(good, format="PNG")
    real_png = good.getvalue()
    inputs = {
        "good.png": real_png,
        "garbage.png": b"this is not an image at all" * 10,
        "truncated.png": real_png[: len(real_png) // 2],
    }
    for key, data in inputs.items():
        s.s3.put_object(Bucket=s.bucket, Key=f"inputs/{key}", Body=data, ContentType="image/png")

    def edit(i: int, key: str) -> dict[str, Any]:
        return {
            "kind": "edit",
            "instruction": f"chaos poison {i}",
            "model_name": s.model,
            "params": dict(PARAMS),
            "images": [f"s3://{s.bucket}/inputs/{key}"],
        }

    n = o.n(20, 10)
    specs: list[dict[str, Any]] = [s.spec_t2i(i) for i in range(n)]
    specs.insert(n // 3, edit(1, "garbage.png"))
    specs.insert(2 * n // 3, edit(2, "truncated.png"))
    specs.append(edit(3, "good.png"))
    poison: set[str] = set()

    def on_submit(i: int, job_id: str) -> None:
        if specs[i]["kind"] == "edit" and specs[i]["images"][0].endswith(("garbage.png", "truncated.png")):
            poison.add(job_id)

    last = Feeder(s, specs, o.n(8, 5), on_submit).start().join()

    def checks(jobs: list[dict[str, Any]], artifacts: dict[str, list[dict[str, Any]]]) -> list[str]:
        problems = []
        for job in jobs:
            if job["id"] in poison:
                message = job["error_message"] or ""
                if job["status"] != "failed":
                    problems.append(f"poison job {job['id'][:8]} ended {job['status']}, not failed")
                elif "input image" not in message or _is_infra(job):
                    problems.append(
                        f"poison job {job['id'][:8]} failed without a readable input reason: "
                        f"{job['error_type']}: {message[:200]}"
                    )
                elif job["attempts"] != 1:
                    problems.append(f"poison job {job['id'][:8]} ran {job['attempts']} times")
        return problems

    return Run(
        reference=last,
        drain_timeout=o.drain_timeout,
        expected_failures=poison,
        checks=checks,
        notes=[f"{len(poison)} poison edits (garbage bytes, truncated PNG) and one good edit among {n} t2i"],
    )


SCENARIOS: dict[str, tuple[str, Callable[[Stack, Options, Random], Run]]] = {
    "kill-storm": ("kill -9 storm (children, a main process, a whole worker)", scenario_kill_storm),
    "redis-restart": ("Redis kill -9, restarted empty", scenario_redis_restart),
    "db-refuse": ("database refusing connections 10 s", scenario_db_refuse),
    "s3-refuse": ("object store refusing connections 10 s", scenario_s3_refuse),
    "s3-hang": ("object store hung 10 s", scenario_s3_hang),
    "cancels": ("cancels at random moments", scenario_cancels),
    "poison": ("poison edits (corrupt input images)", scenario_poison),
}


# ----------------------------------------------------------------------------------------- census


@dataclass
class Census:
    scenario: str
    submitted: int = 0
    succeeded: int = 0
    failed: int = 0
    failed_infra: int = 0
    cancelled: int = 0
    lost: int = 0
    duplicated: int = 0
    drain_s: float | None = None
    drain_timeout: float = 0.0
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # not a target, but worth a look (a process died)
    notes: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # "status error_type: message" -> count

    @property
    def met(self) -> bool:
        return not self.reasons

    def row(self) -> str:
        drain = f"{self.drain_s:.1f}" if self.drain_s is not None else f"> {self.drain_timeout:g} (timeout)"
        return (
            f"| {self.scenario} | {self.submitted} | {self.succeeded} | {self.failed} | {self.failed_infra} | "
            f"{self.cancelled} | {self.lost} | {self.duplicated} | {drain} | {'met' if self.met else 'MISSED'}"
            f"{f' ({len(self.warnings)} warnings)' if self.warnings else ''} |"
        )


HEADER = (
    "| scenario | submitted | succeeded | failed | failed_infra | cancelled | lost | duplicated | drain_s | "
    "targets |\n|---|---|---|---|---|---|---|---|---|---|"
)


def _is_infra(job: Mapping[str, Any]) -> bool:
    if job.get("error_class") == "transient":
        return True
    return bool(INFRA_ERROR.search(f"{job.get('error_type') or ''}: {job.get('error_message') or ''}"))


def drain(s: Stack, run: Run) -> float | None:
    """Seconds from run.reference until no job of the scenario is left unfinished; None at the timeout."""
    deadline = run.reference + run.drain_timeout
    while time.monotonic() < deadline:
        try:
            if s.not_terminal() == 0:
                return max(0.0, time.monotonic() - run.reference)
        except Exception as exc:  # the bench's own direct connection never goes through a proxy
            log(f"drain poll failed: {exc}")
        time.sleep(0.1)
    return None


@dataclass
class KeyInfo:
    """One object key as the versioned bucket remembers it: every PUT, and whether it still exists."""

    puts: int = 0
    etags: set[str] = field(default_factory=set)
    live: bool = False  # its latest version is an object, not a delete marker


def bucket_objects(s: Stack) -> dict[str, dict[str, KeyInfo]]:
    """job id -> key -> KeyInfo, for every key ever written under <prefix>/jobs/<job id>/."""
    found: dict[str, dict[str, KeyInfo]] = {}
    prefix = f"{STORAGE_PREFIX}/jobs/"
    for page in s.s3.get_paginator("list_object_versions").paginate(Bucket=s.bucket, Prefix=prefix):
        for version in page.get("Versions", []):
            if ".thumb." in version["Key"]:  # [issue 12] a PNG's thumbnail: made from it, cleaned up with it
                continue
            job_id = version["Key"][len(prefix) :].split("/", 1)[0]
            info = found.setdefault(job_id, {}).setdefault(version["Key"], KeyInfo())
            info.puts += 1
            info.etags.add(version["ETag"])
            info.live = info.live or bool(version.get("IsLatest"))
    return found


def take_census(s: Stack, name: str, run: Run, drain_s: float | None) -> Census:
    import sqlalchemy as sa

    with s.engine.connect() as conn:
        jobs = [
            dict(r)
            for r in conn.execute(
                sa.text("SELECT * FROM jobs WHERE model_name = :m"), {"m": s.model}
            ).mappings()
        ]
        rows = [
            dict(r)
            for r in conn.execute(
                sa.text(
                    'SELECT a.job_id, a."index", a.uri, a.sha256 FROM artifacts a JOIN jobs j ON j.id = a.job_id '
                    "WHERE j.model_name = :m"
                ),
                {"m": s.model},
            ).mappings()
        ]
    jobs = [j for j in jobs if j["id"] not in s.warm_ids]
    ids = {j["id"] for j in jobs}
    artifacts: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["job_id"] in ids:
            artifacts.setdefault(row["job_id"], []).append(row)

    objects = bucket_objects(s)

    c = Census(scenario=name, drain_timeout=run.drain_timeout, drain_s=drain_s, notes=list(run.notes))
    c.submitted = len(jobs)
    by_status = Counter(j["status"] for j in jobs)
    c.succeeded, c.failed, c.cancelled = by_status["succeeded"], by_status["failed"], by_status["cancelled"]
    lost = [j for j in jobs if j["status"] not in TERMINAL]
    c.lost = len(lost)
    infra = [
        j for j in jobs if j["status"] == "failed" and j["id"] not in run.expected_failures and _is_infra(j)
    ]
    other_failed = [
        j
        for j in jobs
        if j["status"] == "failed" and j["id"] not in run.expected_failures and not _is_infra(j)
    ]
    c.failed_infra = len(infra)
    for job in jobs:
        if job["status"] in ("failed", "cancelled") and (job["error_type"] or job["error_message"]):
            key = f"{job['status']} {job['error_type']}: {_normalized(str(job['error_message'] or ''))[:300]}"
            c.errors[key] = c.errors.get(key, 0) + 1

    duplicated: list[str] = []
    missing: list[str] = []
    extra_puts = leftovers = orphans = differing = 0
    for job in jobs:
        keys = objects.get(job["id"], {})  # every key ever PUT under <prefix>/jobs/<id>/, with its versions
        rows_of = artifacts.get(job["id"], [])
        named = {row["uri"].split(f"s3://{s.bucket}/", 1)[-1] for row in rows_of}
        why = []
        if any(count > 1 for count in Counter(r["index"] for r in rows_of).values()):
            why.append("more than one artifact row per index")
        for key, info in keys.items():
            if len(info.etags) > 1:
                why.append(
                    f"{len(info.etags)} distinct objects PUT for key {key.rsplit('/', 2)[-2]}/"
                    f"{key.rsplit('/', 1)[-1]}"
                )
            if info.live and key not in named:
                leftovers += 1
        extra_puts += max(0, sum(info.puts for info in keys.values()) - 1)
        if len({etag for info in keys.values() for etag in info.etags}) > 1:
            differing += 1
        if job["status"] == "succeeded":
            if not rows_of:
                missing.append(f"{job['id'][:8]} succeeded without an artifact row")
            for row in rows_of:
                object_key = row["uri"].split(f"s3://{s.bucket}/", 1)[-1]
                try:
                    data = s.s3.get_object(Bucket=s.bucket, Key=object_key)["Body"].read()
                except Exception as exc:
                    missing.append(f"{job['id'][:8]}: object {object_key} unreadable: {type(exc).__name__}")
                    continue
                if hashlib.sha256(data).hexdigest() != row["sha256"]:
                    why.append("its object does not match the artifact row's sha256")
        elif any(info.live for info in keys.values()):
            orphans += 1
        if why:
            duplicated.append(f"{job['id'][:8]}: {', '.join(why)}")
    c.duplicated = len(duplicated)

    if run.fault_window is not None:
        began, ended = run.fault_window
        met = [
            j
            for j in jobs
            if j["created_at"] < ended and (j["finished_at"] is None or j["finished_at"] > began)
        ]
        c.notes.append(f"jobs unfinished at some point of the fault window: {len(met)} of {len(jobs)}")
    reruns = sum(1 for j in jobs if (j["attempts"] or 0) > 1)
    c.notes.append(
        f"jobs that ran more than once: {reruns} (max attempts {max((j['attempts'] or 0) for j in jobs)})"
        if jobs
        else "no jobs"
    )
    if extra_puts:
        c.notes.append(
            f"PUTs beyond one per job (re-runs): {extra_puts}; jobs whose PUTs differ in bytes across "
            f"attempt keys: {differing}"
        )
    if leftovers:
        c.notes.append(
            f"live objects of succeeded jobs that no artifact row names (not cleaned up): {leftovers}"
        )
    if orphans:
        c.notes.append(f"jobs that did not succeed but left live objects in the bucket: {orphans}")
    if "requeues" in (jobs[0] if jobs else {}):
        requeued = sum(1 for j in jobs if (j.get("requeues") or 0) > 0)
        if requeued:
            c.notes.append(f"jobs requeued after an infrastructure fault (requeues > 0): {requeued}")

    if c.lost:
        states = Counter(
            f"{j['status']}{' published' if j['published_at'] else ' unpublished'}" for j in lost
        )
        c.reasons.append(
            f"{c.lost} job(s) lost (not terminal {run.drain_timeout:g} s after the fault/last submit): "
            + ", ".join(f"{k} {v}" for k, v in states.most_common())
        )
    if duplicated:
        c.reasons.append(f"{len(duplicated)} duplicated: " + "; ".join(duplicated[:5]))
    if missing:
        c.reasons.append(
            f"{len(missing)} succeeded job(s) without a readable artifact: " + "; ".join(missing[:5])
        )
    if infra:
        c.reasons.append(f"{len(infra)} job(s) failed by an infrastructure fault: " + _examples(infra))
    if other_failed:
        c.reasons.append(f"{len(other_failed)} job(s) failed unexpectedly: " + _examples(other_failed))
    cancelled_unasked = [
        j for j in jobs if j["status"] == "cancelled" and j["id"] not in run.cancel_requested
    ]
    if cancelled_unasked:
        c.reasons.append(f"{len(cancelled_unasked)} job(s) cancelled that nobody cancelled")
    if run.checks is not None:
        c.reasons.extend(run.checks(jobs, artifacts))
    return c


def _examples(jobs: Sequence[Mapping[str, Any]], limit: int = 3) -> str:
    counted = Counter(f"{j['error_type']}: {_normalized(str(j['error_message']))[:240]}" for j in jobs)
    return "; ".join(f"{n}x [{text}]" for text, n in counted.most_common(limit))


def _normalized(text: str) -> str:
    """Ports, job ids and bucket names replaced, so that equal errors group together."""
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<job>", text)
    text = re.sub(r"dg_chaos_[0-9a-f]+", "<db>", text)
    return re.sub(r"chaos-[0-9a-f]{10}", "<bucket>", text)


def worker_log_findings(s: Stack) -> list[str]:
    """ERROR/CRITICAL lines of the workers' and the sweeper's logs, distinct, for the report."""
    found: Counter[str] = Counter()
    for slot in s.supervisor.slots:
        for path in slot.log_paths:
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                if "ERROR/" in line or "CRITICAL/" in line or line.startswith(("error:", "Traceback")):
                    text = _normalized(re.sub(r"^\[[^\]]*\]\s*", "", line).strip())
                    found[f"{slot.kind}: {text[:200]}"] += 1
    return [f"{n}x {text}" for text, n in found.most_common(6)]


# ------------------------------------------------------------------------------------------- main


def run_scenario(name: str, options: Options, root: Path, model_env: Mapping[str, str]) -> Census:
    title, body = SCENARIOS[name]
    settings = {} if options.defaults else SHORT_SETTINGS
    sweep_interval = None if options.defaults else 1.0
    rng = Random(f"{options.seed}-{name}")
    started = time.monotonic()
    log(f"scenario {name}: {title}")
    with stack(name, root / name, model_env, settings, sweep_interval) as s:
        log(f"scenario {name}: services and 2 workers ready in {time.monotonic() - started:.1f} s")
        run = body(s, options, rng)
        drain_s = drain(s, run)
        log(
            f"scenario {name}: "
            + (
                f"drained in {drain_s:.1f} s"
                if drain_s is not None
                else f"NOT drained after {run.drain_timeout:g} s ({s.not_terminal()} left)"
            )
        )
        s.stop_processes()
        census = take_census(s, name, run, drain_s)
        census.notes.extend(s.straggler_notes or [])
        for proxy in (s.db_proxy, s.s3_proxy):
            st = proxy.stats()
            census.notes.append(
                f"{proxy.name} proxy: {st.accepted} connections accepted, {st.forwarded} forwarded, "
                f"{st.cut} cut, {st.bytes_up + st.bytes_down} bytes"
            )
        for exit_note in s.supervisor.exits():
            (census.notes if "killed by the bench" in exit_note else census.warnings).append(
                f"process exit: {exit_note}"
            )
        if s.submit_errors:
            census.notes.append(
                f"producer publish errors: {len(s.submit_errors)} (first: {s.submit_errors[0]})"
            )
        census.notes.extend(f"log: {line}" for line in worker_log_findings(s))
    census.notes.append(f"scenario wall time {time.monotonic() - started:.0f} s")
    return census


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer jobs per scenario (the faults are the same)"
    )
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="production DG_* defaults (lease 60 s, heartbeat 10 s, sweep every 30 s) instead of short ones",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=None,
        help="seconds to wait for every job to finish after the fault (default 120, 180 with "
        "--defaults; the Redis scenario waits at most 90)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs) even when every target is met"
    )
    args = parser.parse_args(argv)
    names = args.scenario or list(SCENARIOS)
    options = Options(
        quick=args.quick,
        defaults=args.defaults,
        seed=args.seed,
        drain_timeout=args.drain_timeout or (180.0 if args.defaults else 120.0),
    )
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    root = Path(tempfile.mkdtemp(prefix="dg-chaos-"))
    began = time.monotonic()
    from worker.deepgen.tiny import tiny_env, write_tiny_model

    model_env = tiny_env(write_tiny_model(root / "tiny"))
    print(
        f"settings: {'production defaults' if args.defaults else SHORT_SETTINGS}; jobs {PARAMS}; "
        f"scenarios: {', '.join(names)}{' (quick)' if args.quick else ''}",
        flush=True,
    )
    print(HEADER, flush=True)
    results: list[Census] = []
    for name in names:
        try:
            census = run_scenario(name, options, root, model_env)
        except Exception as exc:  # a bench failure: reported as a miss, the other scenarios still run
            census = Census(
                scenario=name,
                drain_timeout=options.drain_timeout,
                reasons=[f"BENCH ERROR: {type(exc).__name__}: {exc}"],
            )
            log(f"scenario {name} crashed: {type(exc).__name__}: {exc}")
        results.append(census)
        print(census.row(), flush=True)
    wall = time.monotonic() - began
    print()
    for census in results:
        print(f"### {census.scenario}: {'targets met' if census.met else 'MISSED'}")
        for reason in census.reasons:
            print(f"- MISS: {reason}")
        for warning in census.warnings:
            print(f"- WARN: {warning}")
        for text, count in sorted(census.errors.items(), key=lambda kv: -kv[1])[:5]:
            print(f"- row error ({count}x): {text}")
        for note in census.notes:
            print(f"- {note}")
        print(
            json.dumps(
                {
                    "bench": "chaos",
                    "scenario": census.scenario,
                    "submitted": census.submitted,
                    "succeeded": census.succeeded,
                    "failed": census.failed,
                    "failed_infra": census.failed_infra,
                    "cancelled": census.cancelled,
                    "lost": census.lost,
                    "duplicated": census.duplicated,
                    "drain_s": census.drain_s,
                    "met": census.met,
                    "warnings": len(census.warnings),
                }
            )
        )
        print()
    missed = [c.scenario for c in results if not c.met]
    print(
        f"wall time {wall:.0f} s; "
        + (f"targets MISSED in: {', '.join(missed)}" if missed else "every target met")
    )
    if missed or args.keep:
        print(f"logs kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
