"""LoRA weights for the LLM: detect them in a checkpoint (both transformers namings), apply with
peft using the config's rank and alpha, and merge them into the base weights for inference.

docs/engine.md, 'LoRA': LoRA sits only on the VLM (`lmm`), on Linear and Embedding modules, with scale
alpha/r. Keys look like `lmm.<module>.lora_A.default.weight` (or without the adapter name) and
`lmm.<module>.lora_embedding_A.default`, with `<module>` in either Qwen2.5-VL hierarchy.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from worker.deepgen.checkpoint import CheckpointError, is_lora_key, resolve_lmm_name

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
_LORA_KEY = re.compile(
    r"^lmm\.(?P<module>.+?)\.(?P<kind>lora_embedding_A|lora_embedding_B|lora_A|lora_B)"
    r"(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$"
)
# The LM head is never computed (hidden states only) and shares its weight with the embeddings, so
# merging its LoRA would corrupt the embeddings: its keys are reported as having no effect instead.
UNUSED_AT_INFERENCE = ("lm_head",)


@dataclass
class LoraResult:
    applied: list[str] = field(default_factory=list)  # checkpoint keys merged into the LLM
    unexpected: list[str] = field(default_factory=list)  # keys naming no Linear/Embedding of the LLM
    no_effect: list[str] = field(default_factory=list)  # keys for modules not computed at inference


@dataclass
class _LoraPair:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # kind -> tensor
    keys: list[str] = field(default_factory=list)


def lora_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: tensor for key, tensor in state.items() if is_lora_key(key)}


def apply_lora(lmm: nn.Module, state: Mapping[str, torch.Tensor], *, rank: int, alpha: float) -> LoraResult:
    """Merge the LoRA tensors of `state` into `lmm` (scale alpha/rank). No LoRA keys: `lmm` untouched."""
    result = LoraResult()
    pairs = _group_by_module(lora_keys(state), lmm, result)
    if not pairs:
        return result
    if rank <= 0:
        raise CheckpointError(f"the checkpoint carries LoRA weights but the config's lora_rank is {rank}")
    for module_name, pair in pairs.items():
        _check_pair(module_name, pair, lmm.get_submodule(module_name), rank)

    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int but only computes alpha / r
        target_modules=sorted(pairs),
        lora_dropout=0.0,
        init_lora_weights=False,
        bias="none",
    )
    with warnings.catch_warnings():
        # peft warns about the tied embeddings/LM head; the LM head is never computed at inference,
        # so an embedding delta reaching it through the shared weight changes nothing we use.
        warnings.filterwarnings("ignore", message=r".*tie_word_embeddings.*", category=UserWarning)
        warnings.filterwarnings("ignore", message=r".*tied_target_modules.*", category=UserWarning)
        tuned = LoraModel(lmm, config, ADAPTER_NAME)
        with torch.no_grad():
            for module_name, pair in pairs.items():
                layer = lmm.get_submodule(module_name)
                for kind, tensor in pair.tensors.items():
                    parameter = _lora_parameter(layer, kind)
                    parameter.copy_(tensor.to(dtype=parameter.dtype, device=parameter.device))
        merged = tuned.merge_and_unload()
    if merged is not lmm:  # peft returns the same model with its modules swapped back
        raise RuntimeError("peft returned a different model object after merging LoRA")
    result.applied = sorted(key for pair in pairs.values() for key in pair.keys)
    logger.info(
        "LoRA: merged %d module(s) from %d key(s) (rank %d, alpha %g, scale %g)",
        len(pairs),
        len(result.applied),
        rank,
        alpha,
        alpha / rank,
    )
    return result


def _group_by_module(
    tensors: Mapping[str, torch.Tensor], lmm: nn.Module, result: LoraResult
) -> dict[str, _LoraPair]:
    modules = dict(lmm.named_modules())
    adapters: set[str] = set()
    pairs: dict[str, _LoraPair] = {}
    for key, tensor in sorted(tensors.items()):
        match = _LORA_KEY.match(key)
        if match is None:  # e.g. LoRA on the DiT, which DeepGen never trains
            result.unexpected.append(key)
            continue
        adapter = match["adapter"]
        if adapter is not None and adapter != "weight":
            adapters.add(adapter)
        module_name = resolve_lmm_name(match["module"], modules)
        if module_name is not None and module_name.split(".")[-1] in UNUSED_AT_INFERENCE:
            result.no_effect.append(key)
            continue
        if module_name is None or not isinstance(modules[module_name], nn.Linear | nn.Embedding):
            result.unexpected.append(key)
            continue
        pair = pairs.setdefault(module_name, _LoraPair())
        pair.tensors[match["kind"]] = tensor
        pair.keys.append(key)
    if len(adapters) > 1:
        raise CheckpointError(f"the checkpoint carries several LoRA adapters ({', '.join(sorted(adapters))})")
    if result.no_effect:
        logger.info(
            "LoRA: %d key(s) for the LM head accepted, no effect (it is not computed at inference)",
            len(result.no_effect),
        )
    return pairs


def _check_pair(module_name: str, pair: _LoraPair, module: nn.Module, rank: int) -> None:
    if isinstance(module, nn.Embedding):
        expected = {
            "lora_embedding_A": (rank, module.num_embeddings),
            "lora_embedding_B": (module.embedding_dim, rank),
        }
    else:
        assert isinstance(module, nn.Linear)
        expected = {"lora_A": (rank, module.in_features), "lora_B": (module.out_features, rank)}
    if set(pair.tensors) != set(expected):
        raise CheckpointError(
            f"LoRA for lmm.{module_name}: expected {' and '.join(sorted(expected))}, "
            f"found {', '.join(sorted(pair.tensors))} (keys: {', '.join(pair.keys)})"
        )
    for kind, shape in expected.items():
        actual = tuple(pair.tensors[kind].shape)
        if actual != shape:
            raise CheckpointError(
                f"LoRA {kind} for lmm.{module_name} has shape {list(actual)}, expected {list(shape)} "
                f"(config lora_rank {rank}; a rank mismatch means the config does not match the checkpoint)"
            )


def _lora_parameter(layer: nn.Module, kind: str) -> torch.Tensor:
    container = getattr(layer, kind)[ADAPTER_NAME]
    # Linear LoRA factors are nn.Linear modules; embedding factors are bare parameters.
    return container.weight if isinstance(container, nn.Linear) else container
