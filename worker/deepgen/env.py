"""The `DG_DEEPGEN_*` environment variables -> a validated `DeepGenEnv`, before any model loads.

Every bad or missing value raises `DeepGenEnvError` naming the variable; nothing silently defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from worker.deepgen.configuration import ConfigError, DeepGenConfig, load_config
from worker.deepgen.devices import ATTENTION_KERNELS, DTYPES, parse_device
from worker.deepgen.vision import RESIZE_MODES
from worker.settings import BOOLEAN_WORDS_HELP, parse_bool

PREFIX = "DG_DEEPGEN_"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt")
DEFAULT_MAX_LENGTH = 1024


class DeepGenEnvError(ValueError):
    """A `DG_DEEPGEN_*` variable is missing or invalid; the message names it."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


@dataclass(frozen=True)
class DeepGenEnv:
    config: DeepGenConfig
    config_name: str
    diffusion_model_path: Path
    ar_model_path: Path
    checkpoint: Path | None = None
    max_length: int = DEFAULT_MAX_LENGTH
    image_resize_mode: str = "fix_pixels"
    device: str | None = None  # None: detect (CUDA when present)
    dtype: str | None = None  # None: float32 on CPU, the config's (bfloat16) on CUDA
    offload: bool = False  # keep only the active stage on the accelerator
    attention: str | None = None  # overrides the config's LLM and connector kernels
    # Replay the DiT forward as a CUDA graph; None = on whenever the DiT runs on CUDA (byte-identical
    # to eager on an H100, ~1.8x faster per step at 512px: bench/results/engine_full_size.md).
    cuda_graphs: bool | None = None


def read_deepgen_env(environ: Mapping[str, str] | None = None) -> DeepGenEnv:
    """Read and validate every `DG_DEEPGEN_*` variable (default: `os.environ`)."""
    env = os.environ if environ is None else environ

    def optional(name: str) -> str | None:
        value = env.get(PREFIX + name)
        return value.strip() if value is not None and value.strip() else None

    def required(name: str) -> str:
        value = optional(name)
        if value is None:
            raise DeepGenEnvError(PREFIX + name, "is required but not set")
        return value

    config_name = required("CONFIG")
    try:
        config = load_config(config_name)
    except ConfigError as error:
        raise DeepGenEnvError(PREFIX + "CONFIG", str(error)) from error

    diffusion = _folder(required("DIFFUSION_MODEL_PATH"), "DIFFUSION_MODEL_PATH")
    for subfolder in _diffusion_subfolders(config):
        if not (diffusion / subfolder).is_dir():
            raise DeepGenEnvError(
                PREFIX + "DIFFUSION_MODEL_PATH",
                f"{str(diffusion)!r} has no {subfolder}/ folder (expected a diffusers SD3.5 folder)",
            )
    ar = _folder(required("AR_MODEL_PATH"), "AR_MODEL_PATH")
    if not (ar / "config.json").is_file():
        raise DeepGenEnvError(
            PREFIX + "AR_MODEL_PATH", f"{str(ar)!r} has no config.json (expected a Qwen2.5-VL folder)"
        )

    return DeepGenEnv(
        config=config,
        config_name=config_name,
        diffusion_model_path=diffusion,
        ar_model_path=ar,
        checkpoint=_checkpoint(optional("CHECKPOINT")),
        max_length=_max_length(optional("MAX_LENGTH")),
        image_resize_mode=_choice(optional("IMAGE_RESIZE_MODE"), "IMAGE_RESIZE_MODE", RESIZE_MODES)
        or "fix_pixels",
        device=_device(optional("DEVICE")),
        dtype=_choice(optional("DTYPE"), "DTYPE", tuple(DTYPES)),
        offload=_flag(optional("OFFLOAD"), "OFFLOAD"),
        attention=_choice(optional("ATTENTION"), "ATTENTION", ATTENTION_KERNELS),
        cuda_graphs=None
        if optional("CUDA_GRAPHS") is None
        else _flag(optional("CUDA_GRAPHS"), "CUDA_GRAPHS"),
    )


def _diffusion_subfolders(config: DeepGenConfig) -> list[str]:
    kwargs = (config.transformer_kwargs, config.vae_kwargs, config.scheduler_kwargs)
    return [entry["subfolder"] for entry in kwargs if entry.get("subfolder")]


def _folder(value: str, name: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DeepGenEnvError(PREFIX + name, f"folder {value!r} does not exist")
    return path


def _checkpoint(value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise DeepGenEnvError(
            PREFIX + "CHECKPOINT", f"{value!r} must end in {' or '.join(CHECKPOINT_SUFFIXES)}"
        )
    if not path.is_file():
        raise DeepGenEnvError(PREFIX + "CHECKPOINT", f"file {value!r} does not exist")
    return path


def _max_length(value: str | None) -> int:
    if value is None:
        return DEFAULT_MAX_LENGTH
    try:
        length = int(value)
    except ValueError:
        raise DeepGenEnvError(PREFIX + "MAX_LENGTH", f"must be a positive integer, got {value!r}") from None
    if length <= 0:
        raise DeepGenEnvError(PREFIX + "MAX_LENGTH", f"must be a positive integer, got {value!r}")
    return length


def _choice(value: str | None, name: str, choices: tuple[str, ...]) -> str | None:
    if value is not None and value not in choices:
        raise DeepGenEnvError(PREFIX + name, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def _device(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parse_device(value)
    except ValueError as error:
        raise DeepGenEnvError(PREFIX + "DEVICE", str(error)) from error
    return value


def _flag(value: str | None, name: str) -> bool:
    if value is None:
        return False
    try:
        return parse_bool(value)
    except ValueError:
        raise DeepGenEnvError(
            PREFIX + name, f"must be a boolean ({BOOLEAN_WORDS_HELP}), got {value!r}"
        ) from None
