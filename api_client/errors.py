"""Errors the client and CLI report to users, each carrying its documented exit code.

The CLI prints ``error: <message>`` (no traceback) and exits with ``exit_code``; docs/cli.md lists the
codes. Every message says what to fix, so it must name the file, row, variable or URL at fault.
"""

from __future__ import annotations

import errno
import os
from enum import IntEnum
from pathlib import Path
from typing import Any

from worker.settings import DEFAULT_HOME


class ExitCode(IntEnum):
    OK = 0
    JOBS_FAILED = 1  # every job finished, but at least one ended failed or cancelled
    USAGE = 2  # bad command line (argparse uses 2 as well)
    INPUT_FILE = (
        3  # prompts file / edit CSV / input image problems; unusable user paths (output folder, DG_HOME)
    )
    CONFIGURATION = 4  # DG_* settings, DG_DEEPGEN_* variables, unknown config, bad job parameters
    UNREACHABLE = 5  # Redis, the job database or the S3 endpoint cannot be reached
    NOT_FOUND = 6  # a job or batch id that does not exist
    TIMEOUT = 7  # `wait --timeout` ran out before the jobs finished
    STATE = 8  # the job is in a state that does not allow the operation (e.g. retry a running job)
    INTERNAL = 70  # a bug: an unexpected exception (DG_DEBUG=1 prints the traceback)
    INTERRUPTED = 130  # Ctrl-C; jobs stay queued
    BROKEN_PIPE = 141  # stdout was closed early (`diffgentor list | head -1`): quiet, as 128 + SIGPIPE


class DiffgentorError(Exception):
    """Base class: a user-facing error with a message that names what to fix."""

    exit_code: ExitCode = ExitCode.CONFIGURATION

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(DiffgentorError):
    exit_code = ExitCode.USAGE


class InputFileError(DiffgentorError):
    exit_code = ExitCode.INPUT_FILE


class ConfigurationError(DiffgentorError):
    exit_code = ExitCode.CONFIGURATION


class ServiceUnreachable(DiffgentorError):
    """Redis, the database or S3 did not answer; ``url`` is already redacted."""

    exit_code = ExitCode.UNREACHABLE

    def __init__(self, service: str, url: str, reason: str, *, transient: bool = True) -> None:
        reason = reason.strip().rstrip(".")
        if "DG_" in reason:  # the reason already says which setting to fix
            message = f"{service} at {url} is not usable: {reason}"
        else:
            setting = _SETTING_FOR_SERVICE.get(service, "its URL")
            message = f"cannot reach {service} at {url}: {reason}; check that it is running and that {setting} is right"
        super().__init__(message)
        self.service = service
        self.url = url
        self.transient = transient  # False: it answered, but is misconfigured (e.g. no such bucket)


_SETTING_FOR_SERVICE = {
    "Redis": "DG_BROKER_URL",
    "the job database": "DG_DATABASE_URL",
    "S3": "DG_S3_ENDPOINT_URL / DG_STORAGE_URL",
}


class JobNotFound(DiffgentorError):
    exit_code = ExitCode.NOT_FOUND

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id}; `diffgentor list` shows the known jobs")
        self.job_id = job_id


class BatchNotFound(DiffgentorError):
    exit_code = ExitCode.NOT_FOUND

    def __init__(self, batch_id: str) -> None:
        super().__init__(f"no batch with id {batch_id}; `diffgentor batches` shows the known batches")
        self.batch_id = batch_id


class JobStateError(DiffgentorError):
    exit_code = ExitCode.STATE


class IdempotencyConflict(JobStateError):
    """An idempotency key already names a job with a different spec (the message names the key)."""


class WaitTimeout(DiffgentorError):
    exit_code = ExitCode.TIMEOUT

    def __init__(self, pending_ids: list[str], timeout_s: float) -> None:
        shown = " ".join(pending_ids)
        super().__init__(
            f"{len(pending_ids)} job(s) still unfinished after {timeout_s:g}s; "
            f"reattach with: diffgentor wait {shown}"
        )
        self.pending_ids = pending_ids


class JobFailed(DiffgentorError):
    """`JobHandle.result()` of a job that ended failed; ``job`` is its final view."""

    exit_code = ExitCode.JOBS_FAILED

    def __init__(self, job: Any) -> None:
        reason = f"{job.error_type}: {job.error_message}" if job.error_type else "no reason recorded"
        super().__init__(f"job {job.id} failed: {reason}")
        self.job = job


class JobCancelled(DiffgentorError):
    """`JobHandle.result()` of a job that was cancelled; ``job`` is its final view."""

    exit_code = ExitCode.JOBS_FAILED

    def __init__(self, job: Any) -> None:
        super().__init__(f"job {job.id} was cancelled")
        self.job = job


# A module of an optional extra that is not installed -> (extra, what it is needed for, by context).
_EXTRA_OF_MODULE = {
    "torch": "deepgen",
    "transformers": "deepgen",
    "diffusers": "deepgen",
    "peft": "deepgen",
    "safetensors": "deepgen",
    "accelerate": "deepgen",
    "einops": "deepgen",
    "numpy": "deepgen",
    "psycopg": "postgres",
    "psycopg2": "postgres",
    "psycopg_binary": "postgres",
    "prometheus_client": "metrics",
}
MODEL_EXTRA_MODULES = ("torch", "transformers", "diffusers")

_MODEL_CONTEXT = {
    "worker": "`diffgentor worker` runs the model",
    "demo": "`diffgentor demo` runs the model in this process",
    "tiny-model": "`diffgentor tiny-model` writes model weights with torch",
}


def missing_extra_message(module: str | None, command: str | None = None) -> str | None:
    """One line naming the extra to install for a missing module, or None when it is no extra's."""
    root = (module or "").split(".")[0]
    extra = _EXTRA_OF_MODULE.get(root)
    if extra is None:
        return None
    install = f"install `diffgentor[{extra}]`"
    if extra == "deepgen":
        if command in _MODEL_CONTEXT:
            return (
                f"{_MODEL_CONTEXT[command]}, but {root} is not installed: {install} "
                "(on a GPU host, the CUDA build of torch first)"
            )
        return (
            f"embedded mode runs the model in this process, but {root} is not installed: {install}, "
            "or set DG_BROKER_URL (and DG_DATABASE_URL) to submit to workers"
        )
    if extra == "postgres":
        return f"DG_DATABASE_URL is a PostgreSQL URL, but the psycopg driver is not installed: {install}"
    return f"{root} is not installed: {install}"


class MissingExtra(ConfigurationError):
    """A module of an optional extra is missing; the message names the extra to install."""

    def __init__(self, module: str | None, command: str | None = None) -> None:
        super().__init__(missing_extra_message(module, command) or f"module {module} is not installed")
        self.module = module


_PATH_HINTS = {
    errno.EEXIST: "a file is in the way of a folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder, not a file",
    errno.EACCES: "no permission",
    errno.EROFS: "read-only file system",
}


def path_problem(exc: OSError, what: str = "") -> str:
    """One line for an OS error on a user path: the path, why, and DG_HOME when the path is in it."""
    path = exc.filename
    reason = exc.strerror or type(exc).__name__
    hint = _PATH_HINTS.get(exc.errno or 0)
    message = f"cannot use {what + ' ' if what else ''}{path}: {reason}{f' ({hint})' if hint else ''}"
    home = Path(os.environ.get("DG_HOME", "").strip() or DEFAULT_HOME).expanduser()
    try:
        where = Path(os.fspath(path)).expanduser().absolute()
    except (TypeError, ValueError):
        return message
    if where == home.absolute():
        message += "; that is DG_HOME: set DG_HOME to a folder you can write"
    elif where.is_relative_to(home.absolute()):
        message += f"; it is under DG_HOME={home}: set DG_HOME to a folder you can write"
    return message
