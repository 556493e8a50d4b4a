"""Read models handed to clients: the public view of a job row and its artifacts."""

from __future__ import annotations

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
    artifacts: list[ArtifactView] = []

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES
