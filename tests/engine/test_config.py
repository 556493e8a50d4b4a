"""Config files: reference defaults, the docs' example, paths, errors, training-only reporting."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from worker.deepgen.configuration import (
    DEFAULT_PROMPT_TEMPLATE,
    ConfigError,
    available_configs,
    load_config,
)

MINIMAL_CONFIG = """
model = dict(
    num_queries=4,
    connector=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
    lora_rank=2,
    lora_alpha=4,
)
"""


def write_config(tmp_path: Path, text: str, name: str = "custom.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_available_configs_lists_the_shipped_files() -> None:
    assert {"deepgen", "deepgen_large", "deepgen_tiny"} <= set(available_configs())
    assert "__init__" not in available_configs()


def test_reference_config_carries_the_released_model_defaults() -> None:
    config = load_config("deepgen")
    assert config.name == "deepgen"
    assert config.num_queries == 128
    connector = config.connector
    assert (connector.hidden_size, connector.intermediate_size) == (2048, 11946)
    assert (connector.num_hidden_layers, connector.num_attention_heads) == (6, 32)
    assert connector.attn_implementation == "flash_attention_2"
    assert connector.hidden_act == "gelu_pytorch_tanh"
    assert (config.lora_rank, config.lora_alpha, config.lora_scale) == (64, 128.0, 2.0)
    assert config.prompt_template["INSTRUCTION"] == (
        "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert config.prompt_template["GENERATION"] == "Generate an image: {input}"
    assert config.lmm_kwargs["torch_dtype"] is torch.bfloat16
    assert config.lmm_kwargs["attn_implementation"] == "flash_attention_2"
    assert config.transformer_kwargs["subfolder"] == "transformer"
    assert config.vae_kwargs["subfolder"] == "vae"
    assert config.scheduler_kwargs["subfolder"] == "scheduler"
    assert config.tokenizer_kwargs["padding_side"] == "right"
    assert {
        "model.freeze_lmm",
        "model.pretrained_pth",
        "prompt_template.SYSTEM",
        "prompt_template.CFG",
    } <= set(config.training_only_fields)
    # Training-only template entries never reach the prompt builder.
    assert "SYSTEM" not in config.prompt_template


def test_docs_deepgen_large_example_loads_with_reference_defaults_for_the_rest() -> None:
    config = load_config("deepgen_large")
    assert config.num_queries == 256
    assert (config.connector.hidden_size, config.connector.intermediate_size) == (4096, 16384)
    assert (config.connector.num_hidden_layers, config.connector.num_attention_heads) == (8, 64)
    assert (config.lora_rank, config.lora_alpha) == (128, 256.0)
    assert config.prompt_template == DEFAULT_PROMPT_TEMPLATE
    assert config.lmm_kwargs["attn_implementation"] == "flash_attention_2"
    assert callable(config.vae_kwargs["type"])


def test_a_path_to_any_py_file_works(tmp_path: Path) -> None:
    path = write_config(tmp_path, MINIMAL_CONFIG)
    config = load_config(str(path))
    assert config.name == "custom"
    assert config.source_path == path.resolve()
    assert config.num_queries == 4
    assert config.connector.hidden_size == 16
    assert config.connector.attn_implementation == "flash_attention_2"  # reference default
    assert config.training_only_fields == []


def test_unknown_name_lists_the_available_configs() -> None:
    with pytest.raises(ConfigError) as error:
        load_config("deepgen_huge")
    message = str(error.value)
    assert "deepgen_huge" in message
    for name in available_configs():
        assert name in message


def test_missing_py_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(str(tmp_path / "nope.py"))


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("model = dict(num_queries=4, shiny_new_field=1)", "shiny_new_field"),
        ("model = dict(connector=dict(hidden_size=16, heads=2))", "heads"),
        ("prompt_template = dict(GREETING='hi {input}')", "GREETING"),
        ("model = dict(lmm=dict(pretrained_model_name_or_path='/x'))", "pretrained_model_name_or_path"),
        ("model = dict(vae=dict(type='AutoencoderKL'))", "vae.type"),
        ("model = dict(vae=dict(torch_dtype='float64'))", "vae.torch_dtype"),
        ("model = dict(num_queries=0)", "model.num_queries"),
        ("model = dict(lora_alpha=-1)", "model.lora_alpha"),
        ("prompt_template = dict(GENERATION='no placeholder')", "GENERATION"),
        ("model = dict(connector=dict(hidden_size=10, num_attention_heads=3))", "divisible"),
        ("model = [1, 2]", "`model` must be a dict"),
        ("raise RuntimeError('boom')", "boom"),
    ],
)
def test_bad_fields_are_rejected_by_name(tmp_path: Path, text: str, named: str) -> None:
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as error:
        load_config(str(path))
    assert named in str(error.value)
    assert str(path) in str(error.value) or "custom" in str(error.value)


def test_module_level_and_model_entries_must_agree(tmp_path: Path) -> None:
    text = "tokenizer = dict(padding_side='right')\nmodel = dict(tokenizer=dict(padding_side='left'))\n"
    with pytest.raises(ConfigError, match="differ"):
        load_config(str(write_config(tmp_path, text)))


def test_connector_attention_accepts_both_spellings(tmp_path: Path) -> None:
    text = "model = dict(connector=dict(hidden_size=16, num_attention_heads=2, attn_implementation='eager'))"
    assert load_config(str(write_config(tmp_path, text))).connector.attn_implementation == "eager"
    text = "model = dict(connector=dict(hidden_size=16, num_attention_heads=2, _attn_implementation='sdpa'))"
    assert load_config(str(write_config(tmp_path, text, "b.py"))).connector.attn_implementation == "sdpa"


def test_custom_prompt_template_replaces_the_default(tmp_path: Path) -> None:
    text = "prompt_template = dict(GENERATION='Draw: {input}', SEP='\\n')"
    config = load_config(str(write_config(tmp_path, text)))
    assert config.prompt_template["GENERATION"] == "Draw: {input}"
    assert config.prompt_template["INSTRUCTION"] == DEFAULT_PROMPT_TEMPLATE["INSTRUCTION"]
    assert config.training_only_fields == ["prompt_template.SEP"]


def test_training_only_fields_are_reported_once_per_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_config(tmp_path, "model = dict(freeze_lmm=True, pretrained_pth=None)")
    with caplog.at_level(logging.INFO, logger="worker.deepgen.configuration"):
        load_config(str(path))
        load_config(str(path))
    reports = [record for record in caplog.records if "no effect at inference" in record.getMessage()]
    assert len(reports) == 1
    assert "model.freeze_lmm" in reports[0].getMessage()
    assert "model.pretrained_pth" in reports[0].getMessage()


def test_loading_a_config_builds_no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a module was constructed while loading a config")

    monkeypatch.setattr(nn.Module, "__init__", refuse)
    for name in available_configs():
        config = load_config(name)
        assert callable(config.lmm_kwargs["type"])
