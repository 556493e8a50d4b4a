"""This job-running process: its settings and its worker id.

Kept apart from `worker.tasks` so that the Celery hooks (`worker.hooks`) and the tasks both
read them without importing each other.
"""

from __future__ import annotations

import os
import socket
import uuid

from worker.settings import Settings, load_settings

_settings: Settings | None = None
_worker_id: str | None = None


def configure(settings: Settings) -> None:
    """Settings for the jobs of this worker (set in the parent, inherited by prefork children)."""
    global _settings
    _settings = settings


def settings() -> Settings:
    return _settings or load_settings()


def worker_id() -> str:
    """Unique per process (a prefork child replaced after a crash gets a new identity)."""
    global _worker_id
    if _worker_id is None or not _worker_id.startswith(f"{socket.gethostname()}:{os.getpid()}:"):
        _worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return _worker_id
