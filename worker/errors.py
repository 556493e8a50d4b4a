"""Turn any exception from a job into the (type, message) stored on the failed row."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)

MAX_ERROR_MESSAGE_CHARS = 4000


def is_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")  # never import torch just to classify an error
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_accelerator_memory() -> None:
    """Release cached CUDA blocks after a failure, so the next job starts with free memory."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:
        log.warning("could not empty the CUDA cache", exc_info=True)


def is_soft_time_limit(exc: BaseException) -> bool:
    """Celery's SoftTimeLimitExceeded, by name: this module must not import Celery (embedded mode)."""
    return type(exc).__name__ == "SoftTimeLimitExceeded"


def describe_error(exc: BaseException, *, soft_time_limit_seconds: float | None = None) -> tuple[str, str]:
    name = type(exc).__name__
    message = str(exc).strip() or repr(exc)
    if is_soft_time_limit(exc):
        limit = f" of {soft_time_limit_seconds:g} s" if soft_time_limit_seconds else ""
        return (
            "TimeLimitExceeded",
            f"the job ran past the soft time limit{limit} (DG_SOFT_TIME_LIMIT_SECONDS)",
        )
    if is_out_of_memory(exc):
        return "OutOfMemoryError", (
            f"the accelerator ran out of memory: {message[:500]} "
            "(try a smaller height/width or fewer input images)"
        )
    return name, message[:MAX_ERROR_MESSAGE_CHARS]


def hard_time_limit_message(timeout: float | None) -> str:
    limit = f" of {timeout:g} s" if timeout else ""
    return (
        f"the job ran past the hard time limit{limit} (DG_HARD_TIME_LIMIT_SECONDS) and did not stop at the "
        "soft limit; its worker process was killed and replaced"
    )
