"""Job kinds and job states shared by the producer, the worker and the job table."""

from __future__ import annotations

from enum import Enum


class JobKind(str, Enum):
    T2I = "t2i"
    EDIT = "edit"


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# A job in one of these states never changes again (retry creates a new job).
TERMINAL_STATUSES: frozenset[JobStatus] = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}
)


class ErrorClass(str, Enum):
    """Why a job failed: the user's input or configuration, or the infrastructure."""

    PERMANENT = "permanent"  # bad input, prompt too long, config that does not fit: retrying cannot help
    TRANSIENT = "transient"  # object store, database or broker down for longer than every retry and requeue
