"""Checkpoint loading through `load_deepgen`: key report per family, errors, lmm hierarchies."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from worker.deepgen.checkpoint import CheckpointError, file_sha256, read_checkpoint
from worker.deepgen.env import read_deepgen_env
from worker.deepgen.loading import LoadedDeepGen, load_deepgen
from worker.deepgen.tiny import TinyModelPaths


def tiny_state(tiny_model: TinyModelPaths) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_model.checkpoint_safetensors))


def load_with(tiny_env: dict[str, str], checkpoint: Path) -> LoadedDeepGen:
    return load_deepgen(read_deepgen_env({**tiny_env, "DG_DEEPGEN_CHECKPOINT": str(checkpoint)}))


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_tiny_checkpoint_loads_every_family(
    tiny_env: dict[str, str], tiny_model: TinyModelPaths, kind: str
) -> None:
    path = tiny_model.checkpoint_safetensors if kind == "safetensors" else tiny_model.checkpoint_pt
    loaded = load_with(tiny_env, path)
    report = loaded.report
    assert report is not None
    assert report.unexpected == [] and report.missing == []
    families = report.families
    assert len(families["meta_queries"].matched) == 1
    assert len(families["projector_1"].matched) == 2
    assert len(families["connector"].matched) == 2 * 16  # 2 layers x 16 tensors
    assert "transformer.pos_embed.pos_embed" in families["transformer"].matched
    state = tiny_state(tiny_model)
    model_state = loaded.model.state_dict()
    for key in ("meta_queries", "connector.layers.1.mlp.fc2.weight", "transformer.proj_out.weight"):
        assert torch.equal(model_state[key], state[key]), key
    assert loaded.provenance["checkpoint"] == path.name
    assert loaded.provenance["checkpoint_sha256"] == file_sha256(path)
    assert loaded.provenance["config"] == "deepgen_tiny"
    assert loaded.provenance["dtype"] == "float32"
    assert not loaded.model.training
    assert all(not parameter.requires_grad for parameter in loaded.model.parameters())


def test_checkpoint_transformer_weights_replace_the_folders(tiny_env: dict[str, str]) -> None:
    without = load_deepgen(
        read_deepgen_env({k: v for k, v in tiny_env.items() if k != "DG_DEEPGEN_CHECKPOINT"})
    )
    with_checkpoint = load_deepgen(read_deepgen_env(tiny_env))
    assert without.report is None
    key = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(
        without.model.transformer.state_dict()[key], with_checkpoint.model.transformer.state_dict()[key]
    )


def test_wrong_shape_fails_naming_key_and_shapes(
    tiny_env: dict[str, str], tiny_model: TinyModelPaths, tmp_path: Path
) -> None:
    state = tiny_state(tiny_model)
    state["projector_2.weight"] = torch.zeros(7, 32)
    with pytest.raises(CheckpointError) as error:
        load_with(tiny_env, save(state, tmp_path / "bad.safetensors"))
    assert "projector_2.weight: checkpoint [7, 32] vs model [32, 32]" in str(error.value)


def test_missing_connector_keys_fail_naming_them(
    tiny_env: dict[str, str], tiny_model: TinyModelPaths, tmp_path: Path
) -> None:
    state = tiny_state(tiny_model)
    del state["connector.layers.1.mlp.fc1.weight"]
    del state["connector.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(CheckpointError, match="missing 2 required key") as error:
        load_with(tiny_env, save(state, tmp_path / "partial.safetensors"))
    assert "connector.layers.1.mlp.fc1.weight" in str(error.value)
    assert "connector.layers.0.self_attn.k_proj.bias" in str(error.value)


def test_unknown_keys_are_reported_and_logged(
    tiny_env: dict[str, str], tiny_model: TinyModelPaths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tiny_state(tiny_model)
    state["ema.meta_queries"] = torch.zeros(2)
    state["connector.layers.9.mlp.fc1.weight"] = torch.zeros(2)
    state["lmm.model.language_model.no_such_module.weight"] = torch.zeros(2)
    with caplog.at_level(logging.WARNING, logger="worker.deepgen.checkpoint"):
        loaded = load_with(tiny_env, save(state, tmp_path / "extra.safetensors"))
    assert loaded.report is not None
    assert loaded.report.families["other"].unexpected == ["ema.meta_queries"]
    assert loaded.report.families["connector"].unexpected == ["connector.layers.9.mlp.fc1.weight"]
    assert loaded.report.families["lmm"].unexpected == ["lmm.model.language_model.no_such_module.weight"]
    assert "3 unexpected key(s)" in caplog.text and "ema.meta_queries" in caplog.text


def test_missing_pos_embed_buffer_is_fine(
    tiny_env: dict[str, str], tiny_model: TinyModelPaths, tmp_path: Path
) -> None:
    state = tiny_state(tiny_model)
    del state["transformer.pos_embed.pos_embed"]
    loaded = load_with(tiny_env, save(state, tmp_path / "no_pos.safetensors"))
    assert loaded.report is not None and loaded.report.missing == []


@pytest.mark.parametrize(
    ("checkpoint_name", "model_name"),
    [
        # transformers >= 4.52 hierarchy
        (
            "lmm.model.language_model.layers.3.mlp.up_proj.weight",
            "model.language_model.layers.3.mlp.up_proj.weight",
        ),
        # transformers <= 4.51 hierarchy
        ("lmm.model.layers.3.mlp.up_proj.weight", "model.language_model.layers.3.mlp.up_proj.weight"),
        ("lmm.visual.blocks.1.mlp.down_proj.weight", "model.visual.blocks.1.mlp.down_proj.weight"),
        # saved with an adapter attached
        (
            "lmm.model.layers.3.self_attn.q_proj.base_layer.weight",
            "model.language_model.layers.3.self_attn.q_proj.weight",
        ),
    ],
)
def test_lmm_base_weights_load_under_either_hierarchy(
    tiny_env: dict[str, str],
    tiny_model: TinyModelPaths,
    tmp_path: Path,
    checkpoint_name: str,
    model_name: str,
) -> None:
    state = tiny_state(tiny_model)
    loaded = load_deepgen(read_deepgen_env(tiny_env))
    shape = loaded.model.lmm.state_dict()[model_name].shape
    value = torch.full(shape, 0.125)
    state[checkpoint_name] = value
    reloaded = load_with(tiny_env, save(state, tmp_path / "with_lmm.safetensors"))
    assert reloaded.report is not None
    assert reloaded.report.families["lmm"].matched == [checkpoint_name]
    assert torch.equal(reloaded.model.lmm.state_dict()[model_name], value)


class PickledObject:
    """An arbitrary object: `weights_only=True` must refuse to unpickle it."""


def test_pt_checkpoints_load_with_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"meta_queries": PickledObject()}, path)
    with pytest.raises(CheckpointError, match="not a plain tensor checkpoint"):
        read_checkpoint(path)
    torch.save({"state_dict": {"meta_queries": torch.ones(2)}}, tmp_path / "wrapped.pt")
    assert set(read_checkpoint(tmp_path / "wrapped.pt")) == {"meta_queries"}
    torch.save({"meta_queries": [1, 2]}, tmp_path / "lists.pt")
    with pytest.raises(CheckpointError, match="not tensors: meta_queries"):
        read_checkpoint(tmp_path / "lists.pt")


def test_config_and_env_fields_reach_the_loaders(tiny_env: dict[str, str], tmp_path: Path) -> None:
    source = (Path(__file__).parents[2] / "worker/deepgen/config/deepgen_tiny.py").read_text()
    # A custom `type=` callable (its shift 2.0 shows it was used) and another padding side.
    custom = "import functools\n" + source.replace('padding_side="right"', 'padding_side="left"').replace(
        "type=FlowMatchEulerDiscreteScheduler.from_pretrained,",
        "type=functools.partial(FlowMatchEulerDiscreteScheduler.from_pretrained, shift=2.0),",
    )
    path = tmp_path / "tiny_custom.py"
    path.write_text(custom)

    env = read_deepgen_env({**tiny_env, "DG_DEEPGEN_CONFIG": str(path), "DG_DEEPGEN_DTYPE": "bfloat16"})
    loaded = load_deepgen(env)
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.scheduler.config.shift == 2.0
    assert loaded.dtype is torch.bfloat16
    assert {parameter.dtype for parameter in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.vae.dtype is torch.bfloat16
    assert loaded.model.lmm.config._attn_implementation == "sdpa"

    eager = load_deepgen(read_deepgen_env({**tiny_env, "DG_DEEPGEN_ATTENTION": "eager"}))
    assert eager.model.lmm.config._attn_implementation == "eager"
    assert eager.model.connector.layers[0].self_attn.attn_implementation == "eager"
    assert eager.provenance["attention"] == "eager"
