"""Helpers for integration tests against real services: a worker subprocess, throw-away databases.

Used by this project's tests and benchmarks, and usable in your own tests::

    env = worker_environ(database_url=url, broker_url=broker, storage_url="file:///tmp/out", home=tmp_path)
    with WorkerProcess.celery(env, "deepgen", tmp_path / "worker.log") as worker:
        worker.wait_ready()
        ...  # submit jobs; the worker is stopped (warm, then kill) on exit

Nothing here is imported by the worker or the client at run time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import IO, cast

__all__ = [
    "RedisServer",
    "WorkerNotReady",
    "WorkerProcess",
    "celery_worker_argv",
    "free_port",
    "temporary_database",
    "wait_for",
    "worker_environ",
]

READY_MARKER = " ready."  # Celery logs "celery@host ready." once it consumes (INFO level)


class WorkerNotReady(RuntimeError):
    """The worker exited, or did not log that it is ready in time."""


def celery_worker_argv(
    queue: str, *, pool: str = "prefork", loglevel: str = "INFO", node_name: str | None = None
) -> list[str]:
    """`python -m celery -A worker.celery_app` + the production worker arguments (`worker.main.worker_argv`:
    the model queue ``queue``, concurrency 1, prefetch 1), without `diffgentor worker`'s preflight."""
    from worker.main import Pool, worker_argv

    node = node_name or f"{queue}-{uuid.uuid4().hex[:8]}@%h"  # unique: several workers may share a host
    arguments = worker_argv(queue, pool=cast(Pool, pool), loglevel=loglevel, node_name=node)
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", *arguments]


def worker_environ(
    *,
    database_url: str,
    broker_url: str,
    storage_url: str,
    home: Path,
    s3_endpoint_url: str | None = None,
    model_env: Mapping[str, str] | None = None,
    base: Mapping[str, str] | None = None,
    **settings: str,
) -> dict[str, str]:
    """A worker environment: `base` (default os.environ) without DG_*/PYTEST* variables, plus these.

    With `s3_endpoint_url` the AWS credentials default to moto's "testing" ones; `settings` (any
    variable, e.g. DG_LEASE_SECONDS="3") are applied last and override everything.
    """
    source = os.environ if base is None else base
    # Stray DG_* settings of the caller must not leak in; PYTEST_* would confuse a nested pytest run.
    env = {k: v for k, v in source.items() if not k.startswith(("DG_", "PYTEST"))}
    env.update(model_env or {})
    env.update(
        {
            "DG_HOME": str(home),
            "DG_DATABASE_URL": database_url,
            "DG_BROKER_URL": broker_url,
            "DG_STORAGE_URL": storage_url,
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
        }
    )  # one thread per worker: several share the test machine's cores
    if s3_endpoint_url is not None:
        env.update(
            {
                "DG_S3_ENDPOINT_URL": s3_endpoint_url,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
    env.update(settings)
    return env


class WorkerProcess:
    """A worker subprocess in its own session (process group), its output appended to `log_path`.

    `WorkerProcess.celery(...)` runs the Celery CLI as production does; any other command (for
    example `diffgentor worker --model_name M`) can be given as `argv`.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
        *,
        cwd: Path | None = None,
        append_log: bool = True,
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.append_log = append_log
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @classmethod
    def celery(
        cls,
        env: Mapping[str, str],
        queue: str,
        log_path: Path,
        *,
        pool: str = "prefork",
        loglevel: str = "INFO",
        node_name: str | None = None,
        cwd: Path | None = None,
    ) -> WorkerProcess:
        """A worker on ``queue`` started as `celery_worker_argv` says (not started yet)."""
        return cls(
            celery_worker_argv(queue, pool=pool, loglevel=loglevel, node_name=node_name),
            env,
            log_path,
            cwd=cwd,
        )

    @property
    def process(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise RuntimeError("the worker was not started")
        return self._process

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> WorkerProcess:
        if self._process is not None:
            raise RuntimeError("the worker was already started")
        self._log = open(self.log_path, "ab" if self.append_log else "wb")  # noqa: SIM115 - closed in _close_log()
        # Own session: kill()/stop() reach the prefork children too, and Ctrl-C of the caller does not.
        self._process = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 60, interval: float = 0.1) -> None:
        """Until the worker logs that it consumes (needs loglevel INFO); raises WorkerNotReady."""
        deadline = time.monotonic() + timeout
        while READY_MARKER not in self.log_text():
            if self.process.poll() is not None:
                raise WorkerNotReady(
                    f"worker exited with {self.process.returncode}; log:\n{self.log_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise WorkerNotReady(f"worker not ready after {timeout:g}s; log:\n{self.log_text()[-3000:]}")
            time.sleep(interval)

    def child_pids(self) -> list[int]:
        """The direct children (the prefork pool processes)."""
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def warm_shutdown(self, timeout: float = 180) -> int:
        """SIGTERM to the main process only, as `docker stop` does: the running job finishes first.

        Returns the exit code (raises subprocess.TimeoutExpired if it takes longer than `timeout`).
        """
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL to the whole process group (main process and pool children), as a machine crash would."""
        with suppress(ProcessLookupError):  # the group outlives a dead main process while a child lives
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait(10)
        self._close_log()

    def stop(self, timeout: float = 30) -> None:
        """Clean-up: warm shutdown of the whole group, SIGKILL after `timeout`. Safe to call twice."""
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> WorkerProcess:
        return self.start() if self._process is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def wait_for(
    condition: Callable[[], object], timeout: float, message: str | Callable[[], str], interval: float = 0.1
) -> None:
    """Poll `condition` until it is truthy; TimeoutError with `message` (or its result) otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise TimeoutError(message() if callable(message) else message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a server started next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def temporary_database(admin_url: str, prefix: str = "dg_test_") -> Iterator[str]:
    """A new empty PostgreSQL database next to `admin_url`'s, dropped (connections forced) afterwards.

    Yields its SQLAlchemy URL; it is not migrated (call `worker.db.upgrade(url)` for that).
    """
    import sqlalchemy as sa

    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(
        admin_url, isolation_level="AUTOCOMMIT"
    )  # CREATE DATABASE cannot run in a transaction
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield admin_url.rsplit("/", 1)[0] + f"/{name}"
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


class RedisServer:
    """A private `redis-server` on a free loopback port, without persistence (never the shared one):
    `kill9()` then `start()` is a broker that lost every key; `stop()` is a clean shutdown."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        import redis

        self.starts += 1
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.directory)]  # fmt: skip
        with open(self.directory / f"redis.{self.starts}.log", "wb") as log_file:  # the child keeps its copy
            self.process = subprocess.Popen(
                argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        client = redis.Redis(port=self.port, socket_connect_timeout=1)

        def pings() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_for(pings, 10, f"redis-server on port {self.port} did not start")
        finally:
            client.close()
        return self

    def kill9(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()
