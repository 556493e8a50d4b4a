"""Real worker subprocesses for the end-to-end tests (started like production: celery CLI)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """`python -m celery -A worker.celery_app worker -Q <model> --pool prefork -c 1`, in its own session."""

    def __init__(self, env: Mapping[str, str], model_name: str, log_path: Path, pool: str = "prefork") -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        argv = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", model_name,
                "--pool", pool, "-c", "1", "--prefetch-multiplier", "1", "--loglevel", "INFO",
                "-n", f"{model_name}-{os.getpid()}-{time.monotonic_ns()}@%h", "--without-gossip", "--without-mingle"]
        self.process = subprocess.Popen(argv, cwd=REPO_ROOT, env=dict(env), stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(lambda: " ready." in self.log_text(), timeout, f"worker not ready; log:\n{self.log_text()[-3000:]}")

    def kill_all(self) -> None:
        """kill -9 of the whole worker (parent and prefork child), as a machine crash would."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self._log.close()

    def warm_shutdown(self, timeout: float = 180) -> int:
        """SIGTERM to the main process only, as `docker stop` does; returns its exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # warm shutdown
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log.close()


def wait_for(condition: Callable[[], object], timeout: float, message: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(message() if callable(message) else message)
