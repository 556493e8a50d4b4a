"""DeepGen checkpoint files: read, group keys by family, check shapes and load, with a key report.

The released `model.pt` is a flat `{name: tensor}` dict whose names are the model's attribute
paths (docs/engine.md, 'Checkpoint key names'). Missing query/projector/connector keys and any shape
mismatch are errors; unexpected keys are reported and logged, never dropped silently. `lmm.*` base
weights load into the LLM under either transformers hierarchy (docs/engine.md, 'Checkpoint key names' and
'Reference defects we fix'); LoRA keys are left to `lora.py`.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

REQUIRED_FAMILIES = ("meta_queries", "projector_1", "projector_2", "projector_3", "connector")
FAMILIES = (*REQUIRED_FAMILIES, "transformer", "lmm", "lora", "other")
LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B")
# Buffers recomputed from the config on construction: absent from a checkpoint is fine.
DERIVED_BUFFERS = frozenset({"transformer.pos_embed.pos_embed"})


class CheckpointError(ValueError):
    """The checkpoint cannot be used with this model; the message names the keys and shapes."""


@dataclass
class FamilyReport:
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


@dataclass
class CheckpointReport:
    path: Path
    sha256: str
    families: dict[str, FamilyReport] = field(
        default_factory=lambda: {name: FamilyReport() for name in FAMILIES}
    )

    @property
    def unexpected(self) -> list[str]:
        return [key for report in self.families.values() for key in report.unexpected]

    @property
    def missing(self) -> list[str]:
        return [key for report in self.families.values() for key in report.missing]

    def summary(self) -> str:
        parts = []
        for name, report in self.families.items():
            counts = (len(report.matched), len(report.missing), len(report.unexpected))
            if any(counts):
                parts.append(f"{name}: {counts[0]} matched, {counts[1]} missing, {counts[2]} unexpected")
        return f"{self.path.name}: " + ("; ".join(parts) if parts else "no keys")


def read_checkpoint(path: Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A flat `{name: tensor}` dict from `.safetensors` or `.pt` (`weights_only=True`, on the CPU).

    `mmap=True` maps a `.pt` instead of reading it (zip format only: torch raises RuntimeError otherwise).
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: object = load_file(str(path), device="cpu")
    elif path.suffix == ".pt":
        try:
            state = torch.load(path, weights_only=True, map_location="cpu", mmap=mmap)
        except pickle.UnpicklingError as error:  # weights_only refuses arbitrary pickled objects
            raise CheckpointError(f"{path}: not a plain tensor checkpoint ({error})") from error
    else:
        raise CheckpointError(f"{path}: unsupported checkpoint format; use .safetensors or .pt")
    # Some training tools wrap the flat dict once; accept that, nothing deeper.
    if isinstance(state, Mapping) and set(state) == {"state_dict"}:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a flat {{name: tensor}} dict, got {type(state).__name__}")
    not_tensors = sorted(str(key) for key, value in state.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(not_tensors[:10])}")
    return {str(key): value for key, value in state.items()}


def read_checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """`{name: shape}` of a checkpoint without reading its tensors (safetensors header, mapped `.pt`)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
            return {str(key): tuple(handle.get_slice(key).get_shape()) for key in keys}
    try:
        state = read_checkpoint(path, mmap=True)
    except RuntimeError:  # a legacy (non-zip) .pt cannot be mapped: read it
        state = read_checkpoint(path)
    return {key: tuple(tensor.shape) for key, tensor in state.items()}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_lora_key(key: str) -> bool:
    return any(marker in key for marker in LORA_MARKERS)


def family_of(key: str) -> str:
    if is_lora_key(key):
        return "lora"
    head = key.split(".", 1)[0]
    return head if head in FAMILIES else "other"


def lmm_name_candidates(name: str) -> list[str]:
    """`name` (a `lmm.`-relative path) in both Qwen2.5-VL hierarchies, the given one first.

    transformers >= 4.52: `model.language_model.*`, `model.visual.*`; older: `model.*`, `visual.*`.
    """
    candidates = [name]
    if name.startswith("model.language_model."):
        candidates.append("model." + name.removeprefix("model.language_model."))
    elif name.startswith("model.visual."):
        candidates.append(name.removeprefix("model."))
    elif name.startswith("visual."):
        candidates.append("model." + name)
    elif name.startswith("model."):
        candidates.append("model.language_model." + name.removeprefix("model."))
    return candidates


def resolve_lmm_name(name: str, available: Iterable[str] | Mapping[str, object]) -> str | None:
    """The name under which this model knows an `lmm.`-relative path, or None."""
    known = available if isinstance(available, Mapping | set | frozenset) else set(available)
    return next((candidate for candidate in lmm_name_candidates(name) if candidate in known), None)


@dataclass(frozen=True)
class ShapeMismatch:
    """A checkpoint key whose shape differs from the model's."""

    key: str
    checkpoint: tuple[int, ...]
    model: tuple[int, ...]

    @property
    def family(self) -> str:
        return family_of(self.key)

    def __str__(self) -> str:
        return f"{self.key}: checkpoint {list(self.checkpoint)} vs model {list(self.model)}"


def match_keys(
    own: Mapping[str, Sequence[int]], given: Mapping[str, Sequence[int]], report: CheckpointReport
) -> tuple[dict[str, str], list[ShapeMismatch]]:
    """Compare the checkpoint's `{key: shape}` with the model's, filling `report`'s matched and
    unexpected keys. Returns `{checkpoint key: model key}` of the matches and the shape mismatches;
    LoRA keys are skipped (applied by lora.apply_lora once the base weights are in)."""
    lmm_own = {key.removeprefix("lmm.") for key in own if key.startswith("lmm.")}
    targets: dict[str, str] = {}
    mismatched: list[ShapeMismatch] = []
    for key, shape in given.items():
        family = family_of(key)
        if family == "lora":
            continue
        target = key
        if family == "lmm":
            # Checkpoints saved with an adapter attached name base weights `<module>.base_layer.<param>`.
            relative = key.removeprefix("lmm.").replace(".base_layer.", ".")
            resolved = resolve_lmm_name(relative, lmm_own)
            target = f"lmm.{resolved}" if resolved is not None else key
        if target not in own:
            report.families[family].unexpected.append(key)
            continue
        if tuple(shape) != tuple(own[target]):
            mismatched.append(ShapeMismatch(key, tuple(shape), tuple(own[target])))
            continue
        report.families[family].matched.append(key)
        targets[key] = target
    return targets, mismatched


def report_missing(own: Iterable[str], given: Collection[str], report: CheckpointReport) -> None:
    """Record the model keys the checkpoint lacks (query/projector/connector and DiT families)."""
    for key in own:
        family = family_of(key)
        checked = family in REQUIRED_FAMILIES or (family == "transformer" and key not in DERIVED_BUFFERS)
        if checked and key not in given:
            report.families[family].missing.append(key)


def load_checkpoint(model: nn.Module, state: Mapping[str, torch.Tensor], report: CheckpointReport) -> None:
    """Load every non-LoRA family of `state` into `model`, filling `report`; raise on bad keys/shapes."""
    own = model.state_dict()
    own_shapes = {key: tuple(tensor.shape) for key, tensor in own.items()}
    targets, mismatched = match_keys(own_shapes, {key: tuple(t.shape) for key, t in state.items()}, report)
    if mismatched:
        raise CheckpointError(
            f"{report.path.name}: shape mismatch for {len(mismatched)} key(s): "
            + "; ".join(str(mismatch) for mismatch in mismatched[:5])
            + (
                " ... (does DG_DEEPGEN_CONFIG fit this checkpoint? `diffgentor worker` checks it at start)"
                if len(mismatched) > 5
                else ""
            )
        )

    report_missing(own, state, report)
    missing_required = [key for name in REQUIRED_FAMILIES for key in report.families[name].missing]
    if missing_required:
        raise CheckpointError(
            f"{report.path.name}: missing {len(missing_required)} required key(s) "
            f"(queries/projectors/connector must all be in the checkpoint): {', '.join(missing_required[:20])}"
            + (" ..." if len(missing_required) > 20 else "")
        )
    if report.families["transformer"].missing:
        logger.warning(
            "%s: %d transformer key(s) absent, the diffusion folder's weights stay for them: %s",
            report.path.name,
            len(report.families["transformer"].missing),
            ", ".join(report.families["transformer"].missing[:10]),
        )

    model.load_state_dict({target: state[key] for key, target in targets.items()}, strict=False)


def log_report(report: CheckpointReport) -> None:
    """Log the per-family summary, and every unexpected key as a warning (they were not loaded)."""
    logger.info("checkpoint %s", report.summary())
    if report.unexpected:
        logger.warning(
            "%s: %d unexpected key(s) not loaded: %s",
            report.path.name,
            len(report.unexpected),
            ", ".join(report.unexpected[:20]) + (" ..." if len(report.unexpected) > 20 else ""),
        )
