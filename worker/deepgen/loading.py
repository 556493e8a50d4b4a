"""`load_deepgen(env)`: build the resident DeepGen model from the folders and checkpoint.

Order: tokenizer and Qwen2.5-VL from the AR folder; `transformer/`, `vae/`, `scheduler/` from the
diffusion folder (its text encoders are never touched); `DeepGenModel` around them; then the
checkpoint (base families, `lmm.*` base weights, LoRA merged). Each component is loaded with the
`type=` callable and keyword arguments of the config file.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from worker.deepgen.checkpoint import (
    CheckpointReport,
    file_sha256,
    load_checkpoint,
    log_report,
    read_checkpoint,
)
from worker.deepgen.configuration import DeepGenConfig
from worker.deepgen.connector import ConnectorConfig
from worker.deepgen.devices import resolve_attention, resolve_device, resolve_dtype
from worker.deepgen.env import DeepGenEnv
from worker.deepgen.lora import apply_lora
from worker.deepgen.model import DeepGenModel
from worker.deepgen.transformer import DeepGenSD3Transformer

logger = logging.getLogger(__name__)

PROVENANCE_PACKAGES = ("torch", "transformers", "diffusers", "peft", "safetensors")


class LoadError(RuntimeError):
    """A component could not be loaded from its folder; the message names the folder and field."""


@dataclass
class LoadedDeepGen:
    model: DeepGenModel
    vae: Any  # diffusers AutoencoderKL
    scheduler: Any  # diffusers FlowMatchEulerDiscreteScheduler
    tokenizer: Any  # transformers tokenizer (Qwen2)
    env: DeepGenEnv
    report: CheckpointReport | None
    device: torch.device
    dtype: torch.dtype
    provenance: dict[str, str] = field(default_factory=dict)


def load_deepgen(env: DeepGenEnv) -> LoadedDeepGen:
    config = env.config
    device = resolve_device(env.device)
    dtype = resolve_dtype(env.dtype, device, _config_dtype(config))
    llm_attention = resolve_attention(
        env.attention or config.lmm_kwargs.get("attn_implementation", "sdpa"), device
    )
    connector_attention = resolve_attention(env.attention or config.connector.attn_implementation, device)
    logger.info(
        "loading DeepGen (config %s) on %s in %s, LLM attention %s, connector attention %s",
        config.name,
        device,
        dtype,
        llm_attention,
        connector_attention,
    )

    tokenizer = load_tokenizer(config, env.ar_model_path)
    lmm = _call(
        config.lmm_kwargs,
        "lmm",
        env.ar_model_path,
        **{_dtype_keyword(): dtype},
        attn_implementation=llm_attention,
    )
    transformer = _load_transformer(config, env.diffusion_model_path, dtype)
    vae = _call(config.vae_kwargs, "vae", env.diffusion_model_path, torch_dtype=dtype)
    scheduler = _call(config.scheduler_kwargs, "scheduler", env.diffusion_model_path)

    connector = _replace_attention(config, connector_attention)
    model = DeepGenModel(
        lmm=lmm, transformer=transformer, connector=connector, num_queries=config.num_queries
    )
    model.to(dtype=dtype)

    report = _apply_checkpoint(model, env.checkpoint, config) if env.checkpoint is not None else None
    if report is None:
        logger.warning(
            "no DG_DEEPGEN_CHECKPOINT: queries, projectors and connector keep random initial weights"
        )

    model.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    if not env.offload:  # with offload the engine moves each stage to the device when it runs
        model.to(device)
        vae.to(device)
    return LoadedDeepGen(
        model=model,
        vae=vae,
        scheduler=scheduler,
        tokenizer=tokenizer,
        env=env,
        report=report,
        device=device,
        dtype=dtype,
        provenance=_provenance(env, report, device, dtype, llm_attention),
    )


def load_tokenizer(config: DeepGenConfig, folder: Path) -> Any:
    """The tokenizer of the AR folder, loaded with the config's `tokenizer` entry (LoadError on failure)."""
    return _call(config.tokenizer_kwargs, "tokenizer", folder)


def _config_dtype(config: DeepGenConfig) -> torch.dtype | None:
    """The one dtype the config asks for; components disagreeing is an error (one dtype runs all)."""
    asked = {
        name: kwargs["torch_dtype"]
        for name, kwargs in (
            ("lmm", config.lmm_kwargs),
            ("transformer", config.transformer_kwargs),
            ("vae", config.vae_kwargs),
        )
        if "torch_dtype" in kwargs
    }
    if len(set(asked.values())) > 1:
        details = ", ".join(f"{name}={dtype}" for name, dtype in asked.items())
        raise LoadError(f"config {config.name}: components ask for different torch_dtype values ({details})")
    return next(iter(asked.values()), None)


def _dtype_keyword() -> str:
    """transformers >= 4.56 names the load dtype `dtype`; older versions `torch_dtype`."""
    major, minor = (int(part) for part in metadata.version("transformers").split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _call(entry: dict[str, Any], name: str, folder: Path, **overrides: Any) -> Any:
    """Call a config entry's `type=` loader with the folder, its keyword arguments and `overrides`."""
    kwargs = {key: value for key, value in entry.items() if key not in {"type", "torch_dtype"}}
    kwargs.update(overrides)
    try:
        return entry["type"](str(folder), **kwargs)
    except (OSError, ValueError) as error:
        where = folder / entry["subfolder"] if "subfolder" in entry else folder
        raise LoadError(f"cannot load `{name}` from {where}: {error}") from error


def _load_transformer(config: DeepGenConfig, folder: Path, dtype: torch.dtype) -> DeepGenSD3Transformer:
    """The DiT through DeepGen's subclass: `type=SD3Transformer2DModel.from_pretrained` loads it."""
    entry = dict(config.transformer_kwargs)
    loader_class = getattr(entry["type"], "__self__", None)
    if isinstance(loader_class, type) and issubclass(DeepGenSD3Transformer, loader_class):
        entry["type"] = DeepGenSD3Transformer.from_pretrained
    transformer = _call(entry, "transformer", folder, torch_dtype=dtype)
    if not isinstance(transformer, DeepGenSD3Transformer):
        raise LoadError(
            f"config {config.name}: transformer.type must load an SD3Transformer2DModel "
            f"(got {type(transformer).__name__})"
        )
    return transformer


def _replace_attention(config: DeepGenConfig, kernel: str) -> ConnectorConfig:
    return replace(config.connector, attn_implementation=kernel)


def _apply_checkpoint(model: DeepGenModel, path: Path, config: DeepGenConfig) -> CheckpointReport:
    state = read_checkpoint(path)
    report = CheckpointReport(path=path, sha256=file_sha256(path))
    load_checkpoint(model, state, report)
    lora = apply_lora(model.lmm, state, rank=config.lora_rank, alpha=config.lora_alpha)
    report.families["lora"].matched += lora.applied + lora.no_effect
    report.families["lora"].unexpected += lora.unexpected
    log_report(report)
    return report


def _provenance(
    env: DeepGenEnv, report: CheckpointReport | None, device: torch.device, dtype: torch.dtype, attention: str
) -> dict[str, str]:
    provenance = {
        "config": env.config.name,
        "checkpoint": report.path.name if report else "",
        "checkpoint_sha256": report.sha256 if report else "",
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "attention": attention,
        "python": platform.python_version(),
    }
    for package in PROVENANCE_PACKAGES:
        try:
            provenance[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            provenance[package] = "not installed"
    return provenance
