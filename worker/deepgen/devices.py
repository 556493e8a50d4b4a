"""Device, dtype and attention-kernel selection: from settings when given, else detected."""

from __future__ import annotations

import importlib.util
import logging

import torch

logger = logging.getLogger(__name__)

ATTENTION_KERNELS = ("flash_attention_2", "sdpa", "eager")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def parse_device(text: str) -> torch.device:
    """`cpu`, `cuda`, `cuda:1`, ... -> torch.device; ValueError naming the bad text."""
    try:
        return torch.device(text)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"not a torch device: {text!r} (use e.g. cpu, cuda, cuda:1)") from error


def resolve_device(requested: str | None) -> torch.device:
    """The requested device, or the first CUDA GPU when one is present, else the CPU."""
    if requested is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = parse_device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but CUDA is not available on this machine")
    return device


def resolve_dtype(
    requested: str | None, device: torch.device, config_dtype: torch.dtype | None = None
) -> torch.dtype:
    """The requested dtype; else on an accelerator the config's (bfloat16 if none); on the CPU float32.

    CPU kernels for half precision are slow and not what production runs, so a config's bf16 only
    applies on CUDA unless the dtype is asked for explicitly.
    """
    if requested is not None:
        if requested not in DTYPES:
            raise ValueError(f"unknown dtype {requested!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[requested]
    if device.type == "cpu":
        if config_dtype in _HALF_DTYPES:
            logger.info(
                "config asks for %s; running in float32 on the CPU (set DG_DEEPGEN_DTYPE to force)",
                config_dtype,
            )
        return torch.float32
    return config_dtype if config_dtype is not None else torch.bfloat16


def flash_attention_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attention(requested: str, device: torch.device | None = None) -> str:
    """The attention kernel to use: `flash_attention_2` falls back to `sdpa` when flash-attn can't run."""
    if requested not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {requested!r}; use one of {', '.join(ATTENTION_KERNELS)}")
    if requested != "flash_attention_2":
        return requested
    if not flash_attention_available():
        logger.warning("flash_attention_2 requested but flash_attn is not installed; using sdpa instead")
        return "sdpa"
    if device is not None and device.type != "cuda":
        logger.warning("flash_attention_2 needs a CUDA device (running on %s); using sdpa instead", device)
        return "sdpa"
    return requested
