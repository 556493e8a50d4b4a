"""Read models handed to clients: the public view of a job row and its artifacts, and of a batch."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from schemas.enums import TERMINAL_STATUSES, JobKind, JobStatus


class ArtifactView(BaseModel):
    model_config = ConfigDict(from_attributes=True, frozen=True)

    index: int
    uri: str
    width: int
    height: int
    bytes: int
    sha256: str
    # [issue 12] <index>.thumb.webp beside the PNG; None: stored before thumbnails existed.
    thumbnail_uri: str | None = None


class JobView(BaseModel):
    model_config = ConfigDict(from_attributes=True, frozen=True)

    id: str
    kind: JobKind
    model_name: str
    status: JobStatus
    spec: dict[str, Any]
    seed: int | None
    priority: int
    idempotency_key: str | None
    attempts: int
    max_attempts: int
    worker_id: str | None
    progress_step: int
    progress_total: int
    cancel_requested: bool
    error_type: str | None
    error_message: str | None
    error_class: str | None = None
    requeues: int = 0
    available_at: datetime | None = None
    created_at: datetime
    published_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    retry_of: str | None
    provenance: dict[str, Any] | None
    width: int | None
    height: int | None
    # The job's batch and row in it (None: submitted alone); superseded: a newer retry of the
    # same row exists, so the batch's counts and listings show that one instead.
    batch_id: str | None = None
    batch_index: int | None = None
    superseded: bool = False
    artifacts: list[ArtifactView] = []

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class BatchView(BaseModel):
    """A batch record: jobs submitted together, created in the same transaction as they were."""

    model_config = ConfigDict(from_attributes=True, frozen=True)

    id: str
    name: str
    owner: str
    model_name: str
    created_at: datetime
    job_count: int  # rows (batch indexes) it was created with


class BatchCounts(BaseModel):
    """The latest job of each row of a batch, counted per status (a retry replaces its row's job)."""

    model_config = ConfigDict(frozen=True)

    queued: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0

    @classmethod
    def from_mapping(cls, counts: Mapping[str, int]) -> BatchCounts:
        return cls(**{JobStatus(status).value: int(n) for status, n in counts.items()})

    def as_dict(self) -> dict[str, int]:
        """status -> count, every status present, in lifecycle order."""
        return {status.value: getattr(self, status.value) for status in JobStatus}

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())

    @property
    def unfinished(self) -> int:
        return self.queued + self.running

    @property
    def finished(self) -> int:
        return self.total - self.unfinished

    @property
    def unsuccessful(self) -> int:
        return self.failed + self.cancelled


class BatchProgress(BaseModel):
    """A batch with its counts, how many of its jobs finished in the last `window_seconds`, and the
    ETA that rate gives for the unfinished rows (None while nothing finished in the window)."""

    model_config = ConfigDict(frozen=True)

    batch: BatchView
    counts: BatchCounts
    window_seconds: float
    finished_in_window: int

    @property
    def per_minute(self) -> float:
        return self.finished_in_window * 60.0 / self.window_seconds if self.window_seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        if self.counts.unfinished == 0:
            return 0.0
        if self.finished_in_window == 0 or self.window_seconds <= 0:
            return None
        return self.counts.unfinished * self.window_seconds / self.finished_in_window
