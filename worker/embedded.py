"""Embedded mode, the worker side: no broker; a publish runs the job right away in this process.

The same `JobRunner` as a Celery worker does the work, against an SQLite job database and
`file://DG_HOME/artifacts` by default, so a single machine needs no services at all.
`publish()` returns when the jobs are finished. Used by the embedded `diffgentor sweep`
(`worker.sweeper.default_publisher`) and, on a background thread, by the client
(`api_client.embedded.EmbeddedRunner`, which holds every client-side part of embedded mode).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Sequence
from typing import Any

from worker.jobstore import JobStore, PublishTarget
from worker.runner import EngineProvider, JobRunner, ResidentEngine, load_deepgen_engine
from worker.settings import Settings


class InProcessPublisher:
    def __init__(self, runner: JobRunner, worker_id: str | None = None) -> None:
        self.runner = runner
        self.worker_id = worker_id or f"embedded:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        engine_provider: EngineProvider | None = None,
        *,
        store: JobStore | None = None,
        artifact_store: Any = None,
    ) -> InProcessPublisher:
        provider = engine_provider or ResidentEngine(load_deepgen_engine)
        return cls(JobRunner.from_settings(settings, provider, store=store, artifact_store=artifact_store))

    def publish(self, targets: Sequence[PublishTarget]) -> None:
        # Most urgent first, then submission order, as the queue would.
        for target in sorted(targets, key=lambda t: -t.priority):
            self.runner.run(target.job_id, self.worker_id)
