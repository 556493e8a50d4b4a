"""Producer side of diffgentor: the typed Python client and the `diffgentor` CLI (no torch here)."""

from api_client.client import DiffgentorClient, SubmittedJob
from api_client.errors import IdempotencyConflict, JobCancelled, JobFailed, WaitTimeout
from api_client.handles import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    DoneAndNotDone,
    JobHandle,
    as_completed,
    wait,
)

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "DiffgentorClient",
    "DoneAndNotDone",
    "IdempotencyConflict",
    "JobCancelled",
    "JobFailed",
    "JobHandle",
    "SubmittedJob",
    "WaitTimeout",
    "as_completed",
    "wait",
]
