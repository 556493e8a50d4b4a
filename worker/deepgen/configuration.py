"""DeepGen config files (mmengine-style Python modules) -> a validated `DeepGenConfig`.

A config file defines module-level `tokenizer`, `prompt_template` and `model` dicts, as the DeepGen
backend docs show. Loading one executes the file (which imports the classes named by `type=`) but
builds no model. Every field either has an effect at inference, or is a known training-only field
that is accepted and reported once, or is rejected with an error naming it.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from worker.deepgen.connector import ConnectorConfig
from worker.deepgen.devices import DTYPES
from worker.deepgen.prompts import DEFAULT_PROMPT_TEMPLATE

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "config"

# Reference defaults: the released model's values (docs/engine.md, 'Config files').
DEFAULT_NUM_QUERIES = 128
DEFAULT_CONNECTOR: dict[str, Any] = dict(
    hidden_size=2048,
    intermediate_size=11946,
    num_hidden_layers=6,
    num_attention_heads=32,
    attn_implementation="flash_attention_2",
)
DEFAULT_LORA_RANK = 64
DEFAULT_LORA_ALPHA = 128

TRAINING_ONLY_TEMPLATE_KEYS = frozenset(
    {"SYSTEM", "SUFFIX", "SUFFIX_AS_EOS", "SEP", "STOP_WORDS", "CFG", "IMG_START_TOKEN_FOR_GENERATION"}
)
TEMPLATE_KEYS_WITH_INPUT = ("INSTRUCTION", "GENERATION")

# `model` entries of the reference's configs that only steer training (freezing, init, data).
TRAINING_ONLY_MODEL_FIELDS = frozenset(
    {
        "freeze_lmm",
        "freeze_transformer",
        "freeze_mq",
        "pretrained_pth",
        "use_activation_checkpointing",
        "unconditional_prob",
        "lora_modules",
        "vit_input_size",
        "max_length",
        "type",
    }
)
COMPONENT_FIELDS = ("tokenizer", "lmm", "transformer", "vae", "scheduler")
INFERENCE_MODEL_FIELDS = frozenset(
    {"num_queries", "connector", "lora_rank", "lora_alpha", "prompt_template", *COMPONENT_FIELDS}
)
# Keys each component dict may carry besides `type`; paths never come from config files.
COMPONENT_KEYS: dict[str, frozenset[str]] = {
    "tokenizer": frozenset({"trust_remote_code", "padding_side"}),
    "lmm": frozenset({"torch_dtype", "attn_implementation", "trust_remote_code"}),
    "transformer": frozenset({"subfolder", "torch_dtype"}),
    "vae": frozenset({"subfolder", "torch_dtype"}),
    "scheduler": frozenset({"subfolder"}),
}
CONNECTOR_KEYS = frozenset(
    {
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "hidden_act",
        "layer_norm_eps",
        "attention_dropout",
        "attn_implementation",
        "_attn_implementation",
    }
)

# Source files whose training-only fields were already logged (report once per file).
_reported_sources: set[Path] = set()


class ConfigError(ValueError):
    """A DeepGen config file is missing, fails to execute, or has a bad or unknown field."""


@dataclass
class DeepGenConfig:
    name: str
    source_path: Path
    num_queries: int
    connector: ConnectorConfig
    lora_rank: int
    lora_alpha: float
    prompt_template: dict[str, str]
    # Component entries as in the file (mmengine-style): `type` is the loader callable, the rest
    # are its keyword arguments; `torch_dtype` normalised to a torch.dtype.
    tokenizer_kwargs: dict[str, Any]
    lmm_kwargs: dict[str, Any]
    transformer_kwargs: dict[str, Any]
    vae_kwargs: dict[str, Any]
    scheduler_kwargs: dict[str, Any]
    training_only_fields: list[str] = field(default_factory=list)

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0


def available_configs() -> list[str]:
    """Names usable as `DG_DEEPGEN_CONFIG`: the `.py` files in `worker/deepgen/config/`."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.py") if path.stem != "__init__")


def resolve_config_path(name_or_path: str) -> Path:
    """A config name (file in `config/` without `.py`) or a path to any `.py` file -> its path."""
    if not name_or_path or not name_or_path.strip():
        raise ConfigError(f"empty config name; available configs: {', '.join(available_configs())}")
    if name_or_path.endswith(".py") or "/" in name_or_path or "\\" in name_or_path:
        path = Path(name_or_path).expanduser()
        if path.suffix != ".py":
            raise ConfigError(f"config path {name_or_path!r} is not a .py file")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return path.resolve()
    path = CONFIG_DIR / f"{name_or_path}.py"
    if name_or_path == "__init__" or not path.is_file():
        raise ConfigError(
            f"unknown DeepGen config {name_or_path!r}; available configs: {', '.join(available_configs())} "
            "(or give a path to a .py file)"
        )
    return path


def load_config(name_or_path: str) -> DeepGenConfig:
    """Execute a config file and validate it. Builds no model and loads no weights."""
    path = resolve_config_path(name_or_path)
    module = _execute(path)
    top_level = {key: _module_dict(module, key, path) for key in ("tokenizer", "prompt_template", "model")}
    model = top_level["model"]
    training_only: list[str] = []

    unknown = sorted(set(model) - INFERENCE_MODEL_FIELDS - TRAINING_ONLY_MODEL_FIELDS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown field(s) in `model`: {', '.join(unknown)}; known inference fields: "
            f"{', '.join(sorted(INFERENCE_MODEL_FIELDS))}; training-only fields: "
            f"{', '.join(sorted(TRAINING_ONLY_MODEL_FIELDS))}"
        )
    training_only += [f"model.{key}" for key in sorted(set(model) & TRAINING_ONLY_MODEL_FIELDS)]

    template_source = _merged_entry(top_level, "prompt_template", path)
    prompt_template, template_training_only = _prompt_template(template_source, path)
    training_only += template_training_only

    defaults = _reference_components()
    components: dict[str, dict[str, Any]] = {}
    for component in COMPONENT_FIELDS:
        given = (
            _merged_entry(top_level, component, path) if component == "tokenizer" else model.get(component)
        )
        components[component] = _component(component, given, defaults[component], path)

    config = DeepGenConfig(
        name=path.stem,
        source_path=path,
        num_queries=_positive_int(model.get("num_queries", DEFAULT_NUM_QUERIES), "model.num_queries", path),
        connector=_connector(model.get("connector", {}), path),
        lora_rank=_non_negative_int(model.get("lora_rank", DEFAULT_LORA_RANK), "model.lora_rank", path),
        lora_alpha=_positive_number(model.get("lora_alpha", DEFAULT_LORA_ALPHA), "model.lora_alpha", path),
        prompt_template=prompt_template,
        tokenizer_kwargs=components["tokenizer"],
        lmm_kwargs=components["lmm"],
        transformer_kwargs=components["transformer"],
        vae_kwargs=components["vae"],
        scheduler_kwargs=components["scheduler"],
        training_only_fields=training_only,
    )
    _report_training_only(config)
    return config


def _execute(path: Path) -> ModuleType:
    module_name = f"_deepgen_config_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import config file {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # any failure inside a user's config file
        raise ConfigError(f"config file {path} failed to execute: {type(error).__name__}: {error}") from error
    finally:
        sys.modules.pop(module_name, None)
    return module


def _module_dict(module: ModuleType, key: str, path: Path) -> dict[str, Any]:
    value = getattr(module, key, None)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: module-level `{key}` must be a dict, got {type(value).__name__}")
    return dict(value)


def _merged_entry(top_level: dict[str, dict[str, Any]], key: str, path: Path) -> dict[str, Any]:
    """`tokenizer` / `prompt_template` may be given at module level, in `model`, or both (identical)."""
    module_value = top_level[key]
    model_value = top_level["model"].get(key)
    if model_value is None:
        return module_value
    if not isinstance(model_value, Mapping):
        raise ConfigError(f"{path}: `model.{key}` must be a dict, got {type(model_value).__name__}")
    if module_value and dict(model_value) != module_value:
        raise ConfigError(f"{path}: module-level `{key}` and `model.{key}` differ; keep one of them")
    return dict(model_value)


def _prompt_template(given: dict[str, Any], path: Path) -> tuple[dict[str, str], list[str]]:
    unknown = sorted(set(given) - set(DEFAULT_PROMPT_TEMPLATE) - TRAINING_ONLY_TEMPLATE_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown prompt_template key(s): {', '.join(unknown)}; known: "
            f"{', '.join(sorted(set(DEFAULT_PROMPT_TEMPLATE) | TRAINING_ONLY_TEMPLATE_KEYS))}"
        )
    template = dict(DEFAULT_PROMPT_TEMPLATE)
    for key in DEFAULT_PROMPT_TEMPLATE:
        if key in given:
            value = given[key]
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{path}: prompt_template.{key} must be a non-empty string, got {value!r}")
            template[key] = value
    for key in TEMPLATE_KEYS_WITH_INPUT:
        if "{input}" not in template[key]:
            raise ConfigError(
                f"{path}: prompt_template.{key} must contain '{{input}}', got {template[key]!r}"
            )
    training_only = [f"prompt_template.{key}" for key in sorted(set(given) & TRAINING_ONLY_TEMPLATE_KEYS)]
    return template, training_only


def _reference_components() -> dict[str, dict[str, Any]]:
    """The reference's component entries, used for any the file leaves out (as in `deepgen_large`)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from diffusers.models.transformers import SD3Transformer2DModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    return {
        "tokenizer": dict(type=AutoTokenizer.from_pretrained, trust_remote_code=True, padding_side="right"),
        "lmm": dict(
            type=Qwen2_5_VLForConditionalGeneration.from_pretrained,
            torch_dtype=torch.bfloat16,
            attn_implementation="flash_attention_2",
        ),
        "transformer": dict(
            type=SD3Transformer2DModel.from_pretrained, subfolder="transformer", torch_dtype=torch.bfloat16
        ),
        "vae": dict(type=AutoencoderKL.from_pretrained, subfolder="vae", torch_dtype=torch.bfloat16),
        "scheduler": dict(type=FlowMatchEulerDiscreteScheduler.from_pretrained, subfolder="scheduler"),
    }


def _component(name: str, given: Any, default: dict[str, Any], path: Path) -> dict[str, Any]:
    if given is None:
        return dict(default)
    if not isinstance(given, Mapping):
        raise ConfigError(f"{path}: `model.{name}` must be a dict, got {type(given).__name__}")
    unknown = sorted(set(given) - COMPONENT_KEYS[name] - {"type"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) in `{name}`: {', '.join(unknown)}; allowed: "
            f"type, {', '.join(sorted(COMPONENT_KEYS[name]))} (model paths come from DG_DEEPGEN_* variables)"
        )
    # A given entry without torch_dtype means "the device's default dtype", not the reference's bf16.
    entry = {key: value for key, value in default.items() if key != "torch_dtype"}
    entry.update(given)
    if not callable(entry.get("type")):
        raise ConfigError(f"{path}: `{name}.type` must be a callable such as Class.from_pretrained")
    if "torch_dtype" in entry:
        entry["torch_dtype"] = _dtype(entry["torch_dtype"], f"{name}.torch_dtype", path)
    if "attn_implementation" in entry and not isinstance(entry["attn_implementation"], str):
        raise ConfigError(f"{path}: `{name}.attn_implementation` must be a string")
    if "subfolder" in entry and not isinstance(entry["subfolder"], str):
        raise ConfigError(f"{path}: `{name}.subfolder` must be a string")
    return entry


def _connector(given: Any, path: Path) -> ConnectorConfig:
    if not isinstance(given, Mapping):
        raise ConfigError(f"{path}: `model.connector` must be a dict, got {type(given).__name__}")
    unknown = sorted(set(given) - CONNECTOR_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) in `model.connector`: {', '.join(unknown)}; allowed: "
            f"{', '.join(sorted(CONNECTOR_KEYS))}"
        )
    if "_attn_implementation" in given and "attn_implementation" in given:
        raise ConfigError(f"{path}: give either connector._attn_implementation or attn_implementation")
    values = dict(DEFAULT_CONNECTOR)
    for key, value in given.items():
        values["attn_implementation" if key == "_attn_implementation" else key] = value
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        values[key] = _positive_int(values[key], f"model.connector.{key}", path)
    try:
        return ConnectorConfig(**values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{path}: invalid `model.connector`: {error}") from error


def _dtype(value: Any, field_name: str, path: Path) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return DTYPES[value.removeprefix("torch.")]
    raise ConfigError(f"{path}: `{field_name}` must be one of {', '.join(DTYPES)}, got {value!r}")


def _positive_int(value: Any, field_name: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{path}: `{field_name}` must be a positive integer, got {value!r}")
    return value


def _non_negative_int(value: Any, field_name: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{path}: `{field_name}` must be an integer >= 0, got {value!r}")
    return value


def _positive_number(value: Any, field_name: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{path}: `{field_name}` must be a positive number, got {value!r}")
    return float(value)


def _report_training_only(config: DeepGenConfig) -> None:
    if not config.training_only_fields or config.source_path in _reported_sources:
        return
    _reported_sources.add(config.source_path)
    logger.info(
        "DeepGen config %s: training-only field(s) accepted, no effect at inference: %s",
        config.name,
        ", ".join(config.training_only_fields),
    )
