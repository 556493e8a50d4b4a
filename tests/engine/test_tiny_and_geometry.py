"""Tiny model layout and determinism; the full-size DeepGen built on the meta device has exactly
the released checkpoint's key families and shapes (docs/engine.md, 'Model structure' and
'Checkpoint key names')."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from worker.deepgen.checkpoint import family_of
from worker.deepgen.configuration import load_config
from worker.deepgen.geometry import QWEN25_VL_3B_TEXT, QWEN25_VL_3B_VISION, SD35_MEDIUM_TRANSFORMER
from worker.deepgen.model import DeepGenModel
from worker.deepgen.tiny import QWEN_SPECIAL_TOKENS, TinyModelPaths, write_tiny_model
from worker.deepgen.transformer import DeepGenSD3Transformer


def build_full_size_on_meta() -> DeepGenModel:
    config = load_config("deepgen")
    with torch.device("meta"):
        lmm = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(
                text_config=QWEN25_VL_3B_TEXT, vision_config=QWEN25_VL_3B_VISION, tie_word_embeddings=True
            )
        )
        transformer = DeepGenSD3Transformer(**SD35_MEDIUM_TRANSFORMER)
        return DeepGenModel(
            lmm=lmm, transformer=transformer, connector=config.connector, num_queries=config.num_queries
        )


def test_full_size_meta_build_matches_the_released_checkpoint_keys() -> None:
    model = build_full_size_on_meta()
    state = model.state_dict()
    assert all(tensor.is_meta for tensor in state.values()), "no weights may be allocated"
    shapes = {key: list(tensor.shape) for key, tensor in state.items() if not key.startswith("lmm.")}
    assert {family_of(key) for key in shapes} == {
        "meta_queries",
        "projector_1",
        "projector_2",
        "projector_3",
        "connector",
        "transformer",
    }
    assert shapes["meta_queries"] == [128, 2048]
    assert (shapes["projector_1.weight"], shapes["projector_1.bias"]) == ([2048, 12288], [2048])
    assert (shapes["projector_2.weight"], shapes["projector_2.bias"]) == ([2048, 2048], [2048])
    assert (shapes["projector_3.weight"], shapes["projector_3.bias"]) == ([4096, 2048], [4096])

    connector = {key: shape for key, shape in shapes.items() if key.startswith("connector.")}
    expected_connector: dict[str, list[int]] = {}
    for layer in range(6):
        prefix = f"connector.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            expected_connector[f"{prefix}.self_attn.{proj}.weight"] = [2048, 2048]
            expected_connector[f"{prefix}.self_attn.{proj}.bias"] = [2048]
        for norm in ("layer_norm1", "layer_norm2"):
            expected_connector[f"{prefix}.{norm}.weight"] = [2048]
            expected_connector[f"{prefix}.{norm}.bias"] = [2048]
        expected_connector[f"{prefix}.mlp.fc1.weight"] = [11946, 2048]
        expected_connector[f"{prefix}.mlp.fc1.bias"] = [11946]
        expected_connector[f"{prefix}.mlp.fc2.weight"] = [2048, 11946]
        expected_connector[f"{prefix}.mlp.fc2.bias"] = [2048]
    assert connector == expected_connector

    dit = {
        key.removeprefix("transformer."): shape
        for key, shape in shapes.items()
        if key.startswith("transformer.")
    }
    assert dit["pos_embed.pos_embed"] == [1, 147456, 1536]
    assert dit["pos_embed.proj.weight"] == [1536, 16, 2, 2]
    assert dit["context_embedder.weight"] == [1536, 4096]
    assert dit["time_text_embed.text_embedder.linear_1.weight"] == [1536, 2048]
    assert dit["time_text_embed.timestep_embedder.linear_1.weight"] == [1536, 256]
    assert dit["proj_out.weight"] == [64, 1536]
    assert dit["norm_out.linear.weight"] == [3072, 1536]
    blocks = {int(key.split(".")[1]) for key in dit if key.startswith("transformer_blocks.")}
    assert blocks == set(range(24))
    with_attn2 = {int(key.split(".")[1]) for key in dit if ".attn2." in key}
    assert with_attn2 == set(range(13))
    for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj"):
        assert dit[f"transformer_blocks.0.attn.{name}.weight"] == [1536, 1536]
    assert dit["transformer_blocks.0.attn.norm_q.weight"] == [64]
    assert dit["transformer_blocks.0.attn.norm_added_k.weight"] == [64]
    assert dit["transformer_blocks.0.ff.net.0.proj.weight"] == [6144, 1536]
    assert dit["transformer_blocks.0.norm1.linear.weight"] == [9 * 1536, 1536]  # SD3.5 norm with attn2
    # The last block is context-pre-only: no context output projection or context MLP.
    last = {key for key in dit if key.startswith("transformer_blocks.23.")}
    assert not any(".to_add_out." in key or ".ff_context." in key for key in last)
    assert "transformer_blocks.22.attn.to_add_out.weight" in dit
    assert dit["transformer_blocks.23.norm1_context.linear.weight"] == [2 * 1536, 1536]

    # The LLM side: the Qwen2.5-VL-3B geometry and the six-layer pick of the released model.
    lmm_shapes = {key: list(tensor.shape) for key, tensor in state.items() if key.startswith("lmm.")}
    assert lmm_shapes["lmm.model.language_model.embed_tokens.weight"] == [151936, 2048]
    assert "lmm.model.language_model.layers.35.mlp.up_proj.weight" in lmm_shapes
    assert "lmm.model.language_model.layers.36.mlp.up_proj.weight" not in lmm_shapes
    assert lmm_shapes["lmm.model.visual.merger.mlp.2.weight"] == [2048, 5120]
    assert model.layer_indices == [35, 29, 23, 17, 11, 5]


def test_tiny_model_has_the_real_layouts(tiny_model: TinyModelPaths) -> None:
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_model.ar / name).is_file(), name
    assert {path.name for path in tiny_model.diffusion.iterdir()} == {
        "transformer",
        "vae",
        "scheduler",
        "model_index.json",
    }
    ar_config = json.loads((tiny_model.ar / "config.json").read_text())
    assert ar_config["text_config"]["num_hidden_layers"] == 32
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model.ar))
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(QWEN_SPECIAL_TOKENS)
    assert max(ids.values()) < ar_config["text_config"]["vocab_size"]
    assert ar_config["image_token_id"] == ids["<|image_pad|>"]
    assert ar_config["vision_start_token_id"] == ids["<|vision_start|>"]
    assert tokenizer.pad_token == "<|endoftext|>"
    # Special tokens stay whole in a prompt.
    encoded = tokenizer("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>").input_ids
    assert encoded[0] == ids["<|im_start|>"] and encoded[-3:] == [
        ids["<|vision_start|>"],
        ids["<|image_pad|>"],
        ids["<|vision_end|>"],
    ]
    vae_config = json.loads((tiny_model.diffusion / "vae" / "config.json").read_text())
    assert (vae_config["scaling_factor"], vae_config["shift_factor"], vae_config["latent_channels"]) == (
        1.5305,
        0.0609,
        16,
    )


def test_tiny_checkpoints_carry_the_reference_families(tiny_model: TinyModelPaths) -> None:
    safetensors_state = load_file(str(tiny_model.checkpoint_safetensors))
    pt_state = torch.load(tiny_model.checkpoint_pt, weights_only=True, map_location="cpu")
    assert safetensors_state.keys() == pt_state.keys()
    assert all(torch.equal(safetensors_state[key], pt_state[key]) for key in pt_state)
    assert {family_of(key) for key in pt_state} == {
        "meta_queries",
        "projector_1",
        "projector_2",
        "projector_3",
        "connector",
        "transformer",
    }
    assert list(pt_state["meta_queries"].shape) == [8, 64]
    assert list(pt_state["projector_1.weight"].shape) == [32, 6 * 64]
    assert pt_state["projector_3.weight"].abs().sum() > 0  # random, not trivially zero


def test_tiny_model_is_deterministic(tiny_model: TinyModelPaths, tmp_path: Path) -> None:
    again = write_tiny_model(tmp_path / "again")
    first, second = (
        load_file(str(tiny_model.checkpoint_safetensors)),
        load_file(str(again.checkpoint_safetensors)),
    )
    assert all(torch.equal(first[key], second[key]) for key in first)
    first_ar = load_file(str(tiny_model.ar / "model.safetensors"))
    second_ar = load_file(str(again.ar / "model.safetensors"))
    assert first_ar.keys() == second_ar.keys()
    assert all(torch.equal(first_ar[key], second_ar[key]) for key in first_ar)
    assert (tiny_model.ar / "tokenizer.json").read_text() == (again.ar / "tokenizer.json").read_text()
