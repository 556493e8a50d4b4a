"""Errors the client and CLI report to users, each carrying its documented exit code.

The CLI prints ``error: <message>`` (no traceback) and exits with ``exit_code``; docs/cli.md lists the
codes. Every message says what to fix, so it must name the file, row, variable or URL at fault.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    JOBS_FAILED = 1  # every job finished, but at least one ended failed or cancelled
    USAGE = 2  # bad command line (argparse uses 2 as well)
    INPUT_FILE = 3  # prompts file / edit CSV / input image problems
    CONFIGURATION = 4  # DG_* settings, DG_DEEPGEN_* variables, unknown config, bad job parameters
    UNREACHABLE = 5  # Redis, the job database or the S3 endpoint cannot be reached
    NOT_FOUND = 6  # a job id that does not exist
    TIMEOUT = 7  # `wait --timeout` ran out before the jobs finished
    STATE = 8  # the job is in a state that does not allow the operation (e.g. retry a running job)
    INTERNAL = 70  # a bug: an unexpected exception (DG_DEBUG=1 prints the traceback)
    INTERRUPTED = 130  # Ctrl-C; jobs stay queued


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


class JobStateError(DiffgentorError):
    exit_code = ExitCode.STATE


class WaitTimeout(DiffgentorError):
    exit_code = ExitCode.TIMEOUT

    def __init__(self, pending_ids: list[str], timeout_s: float) -> None:
        shown = " ".join(pending_ids)
        super().__init__(
            f"{len(pending_ids)} job(s) still unfinished after {timeout_s:g}s; "
            f"reattach with: diffgentor wait {shown}"
        )
        self.pending_ids = pending_ids
