"""LoRA keys in a checkpoint: both namings merge into the LLM (scale alpha/r); none leaves it untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration

from worker.deepgen.checkpoint import CheckpointError
from worker.deepgen.env import read_deepgen_env
from worker.deepgen.loading import LoadedDeepGen, load_deepgen
from worker.deepgen.tiny import TinyModelPaths

RANK, SCALE = 4, 2.0  # deepgen_tiny: lora_rank 4, lora_alpha 8

# (module in transformers >= 4.52 naming, the same module in <= 4.51 naming, model path)
TARGETS = {
    "q_proj": (
        "model.language_model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.q_proj",
    ),
    "qkv": ("model.visual.blocks.0.attn.qkv", "visual.blocks.0.attn.qkv"),
    "embed": ("model.language_model.embed_tokens", "model.embed_tokens"),
}


def lora_tensors(
    base: nn.Module, naming: str, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], dict]:
    """Checkpoint entries for the three TARGETS and the expected merged weights."""
    entries: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    for current, old in TARGETS.values():
        name = current if naming == "new" else old
        module = base.get_submodule(current)
        suffix = ".default" if naming == "new" else ""
        if isinstance(module, nn.Embedding):
            a = torch.randn(RANK, module.num_embeddings, generator=generator)
            b = torch.randn(module.embedding_dim, RANK, generator=generator)
            entries[f"lmm.{name}.lora_embedding_A{suffix}"] = a
            entries[f"lmm.{name}.lora_embedding_B{suffix}"] = b
            expected[current] = module.weight.detach() + SCALE * (b @ a).T
        else:
            a = torch.randn(RANK, module.in_features, generator=generator)
            b = torch.randn(module.out_features, RANK, generator=generator)
            entries[f"lmm.{name}.lora_A{suffix}.weight"] = a
            entries[f"lmm.{name}.lora_B{suffix}.weight"] = b
            expected[current] = module.weight.detach() + SCALE * (b @ a)
    return entries, expected


@pytest.fixture(scope="module")
def base_lmm(tiny_model: TinyModelPaths) -> nn.Module:
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_model.ar), dtype=torch.float32).eval()


def last_hidden(lmm: nn.Module) -> torch.Tensor:
    ids = torch.tensor([[5, 17, 42, 99, 7, 300]])
    with torch.no_grad():
        return lmm(input_ids=ids, output_hidden_states=True).hidden_states[-1]


def load_with_extra(
    tiny_env: dict[str, str], tiny_model: TinyModelPaths, tmp_path: Path, extra: dict[str, torch.Tensor]
) -> LoadedDeepGen:
    state = load_file(str(tiny_model.checkpoint_safetensors)) | extra
    path = tmp_path / "with_lora.safetensors"
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return load_deepgen(read_deepgen_env({**tiny_env, "DG_DEEPGEN_CHECKPOINT": str(path)}))


@pytest.mark.parametrize("naming", ["new", "old"])
def test_lora_keys_merge_into_the_llm(
    tiny_env: dict[str, str], tiny_model: TinyModelPaths, tmp_path: Path, base_lmm: nn.Module, naming: str
) -> None:
    entries, expected = lora_tensors(base_lmm, naming, torch.Generator().manual_seed(3))
    loaded = load_with_extra(tiny_env, tiny_model, tmp_path, entries)
    lmm = loaded.model.lmm
    for module_name, weight in expected.items():
        module = lmm.get_submodule(module_name)
        assert type(module) in (nn.Linear, nn.Embedding), "peft wrappers must be gone after merging"
        torch.testing.assert_close(module.weight, weight, rtol=1e-5, atol=1e-5)
    assert loaded.report is not None
    assert sorted(loaded.report.families["lora"].matched) == sorted(entries)
    assert loaded.report.families["lora"].unexpected == []
    # An untargeted module keeps its base weight; the output changes.
    untouched = "model.language_model.layers.0.self_attn.k_proj"
    assert torch.equal(lmm.get_submodule(untouched).weight, base_lmm.get_submodule(untouched).weight)
    assert not torch.allclose(last_hidden(lmm), last_hidden(base_lmm))


def test_no_lora_keys_leave_the_llm_untouched(tiny_env: dict[str, str], base_lmm: nn.Module) -> None:
    loaded = load_deepgen(read_deepgen_env(tiny_env))
    assert loaded.report is not None and loaded.report.families["lora"].matched == []
    base_state = base_lmm.state_dict()
    loaded_state = loaded.model.lmm.state_dict()
    assert loaded_state.keys() == base_state.keys()
    assert all(torch.equal(loaded_state[key], base_state[key]) for key in base_state)
    assert torch.equal(last_hidden(loaded.model.lmm), last_hidden(base_lmm))


def test_rank_mismatch_names_the_config_rank(
    tiny_env: dict[str, str], tiny_model: TinyModelPaths, tmp_path: Path
) -> None:
    name = "lmm.model.language_model.layers.0.self_attn.q_proj"
    extra = {
        f"{name}.lora_A.default.weight": torch.ones(8, 64),
        f"{name}.lora_B.default.weight": torch.ones(64, 8),
    }
    with pytest.raises(CheckpointError, match=r"shape \[8, 64\], expected \[4, 64\] \(config lora_rank 4"):
        load_with_extra(tiny_env, tiny_model, tmp_path, extra)


def test_half_a_lora_pair_is_an_error(
    tiny_env: dict[str, str], tiny_model: TinyModelPaths, tmp_path: Path
) -> None:
    extra = {"lmm.model.layers.1.mlp.up_proj.lora_A.weight": torch.ones(RANK, 64)}
    with pytest.raises(CheckpointError, match="expected lora_A and lora_B, found lora_A"):
        load_with_extra(tiny_env, tiny_model, tmp_path, extra)


def test_lora_keys_outside_the_llm_are_reported(
    tiny_env: dict[str, str], tiny_model: TinyModelPaths, tmp_path: Path, base_lmm: nn.Module
) -> None:
    extra = {
        "transformer.proj_out.lora_A.default.weight": torch.ones(RANK, 16),
        "lmm.model.language_model.layers.0.no_such.lora_A.weight": torch.ones(RANK, 64),
        "lmm.lm_head.lora_A.default.weight": torch.ones(RANK, 64),
        "lmm.lm_head.lora_B.default.weight": torch.ones(448, RANK),
    }
    loaded = load_with_extra(tiny_env, tiny_model, tmp_path, extra)
    assert loaded.report is not None
    assert sorted(loaded.report.families["lora"].unexpected) == sorted(list(extra)[:2])
    # The LM head is never computed and shares the embeddings: its LoRA is accepted without effect.
    assert sorted(loaded.report.families["lora"].matched) == sorted(list(extra)[2:])
    embed = "model.language_model.embed_tokens"
    assert torch.equal(loaded.model.lmm.get_submodule(embed).weight, base_lmm.get_submodule(embed).weight)
