"""DG_DEEPGEN_* variables: defaults, every error names its variable; device/dtype/kernel selection."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from worker.deepgen import devices
from worker.deepgen.env import DeepGenEnvError, read_deepgen_env
from worker.deepgen.tiny import TinyModelPaths


def test_tiny_env_reads_with_defaults(tiny_env: dict[str, str], tiny_model: TinyModelPaths) -> None:
    env = read_deepgen_env(tiny_env)
    assert env.config_name == "deepgen_tiny"
    assert env.config.num_queries == 8
    assert env.ar_model_path == tiny_model.ar
    assert env.diffusion_model_path == tiny_model.diffusion
    assert env.checkpoint == tiny_model.checkpoint_safetensors
    assert env.max_length == 1024
    assert env.image_resize_mode == "fix_pixels"
    assert (env.device, env.dtype, env.offload, env.attention) == ("cpu", None, False, None)


def test_optional_values_are_read(tiny_env: dict[str, str], tiny_model: TinyModelPaths) -> None:
    tiny_env.update(
        DG_DEEPGEN_CHECKPOINT=str(tiny_model.checkpoint_pt),
        DG_DEEPGEN_MAX_LENGTH="77",
        DG_DEEPGEN_IMAGE_RESIZE_MODE="dynamic",
        DG_DEEPGEN_DTYPE="bfloat16",
        DG_DEEPGEN_OFFLOAD="yes",
        DG_DEEPGEN_ATTENTION="eager",
    )
    env = read_deepgen_env(tiny_env)
    assert env.checkpoint == tiny_model.checkpoint_pt
    assert (env.max_length, env.image_resize_mode) == (77, "dynamic")
    assert (env.dtype, env.offload, env.attention) == ("bfloat16", True, "eager")


def test_no_checkpoint_is_allowed(tiny_env: dict[str, str]) -> None:
    del tiny_env["DG_DEEPGEN_CHECKPOINT"]
    assert read_deepgen_env(tiny_env).checkpoint is None


def test_reads_os_environ_by_default(tiny_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in tiny_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DG_DEEPGEN_MAX_LENGTH", "12")
    assert read_deepgen_env().max_length == 12


@pytest.mark.parametrize(
    "variable", ["DG_DEEPGEN_CONFIG", "DG_DEEPGEN_DIFFUSION_MODEL_PATH", "DG_DEEPGEN_AR_MODEL_PATH"]
)
@pytest.mark.parametrize("how", ["unset", "blank"])
def test_each_required_variable_is_named(tiny_env: dict[str, str], variable: str, how: str) -> None:
    if how == "unset":
        del tiny_env[variable]
    else:
        tiny_env[variable] = "  "
    with pytest.raises(DeepGenEnvError, match="is required") as error:
        read_deepgen_env(tiny_env)
    assert error.value.variable == variable
    assert variable in str(error.value)


@pytest.mark.parametrize(
    ("variable", "value", "hint"),
    [
        ("DG_DEEPGEN_MAX_LENGTH", "abc", "positive integer"),
        ("DG_DEEPGEN_MAX_LENGTH", "0", "positive integer"),
        ("DG_DEEPGEN_MAX_LENGTH", "-5", "positive integer"),
        ("DG_DEEPGEN_MAX_LENGTH", "1.5", "positive integer"),
        ("DG_DEEPGEN_IMAGE_RESIZE_MODE", "stretch", "fix_pixels, dynamic, direct"),
        ("DG_DEEPGEN_CHECKPOINT", "/nonexistent/model.pt", "does not exist"),
        ("DG_DEEPGEN_CHECKPOINT", "/nonexistent/model.bin", ".safetensors or .pt"),
        ("DG_DEEPGEN_CONFIG", "no_such_config", "deepgen_tiny"),
        ("DG_DEEPGEN_AR_MODEL_PATH", "/nonexistent/qwen", "does not exist"),
        ("DG_DEEPGEN_DIFFUSION_MODEL_PATH", "/nonexistent/sd35", "does not exist"),
        ("DG_DEEPGEN_DTYPE", "float64", "bfloat16"),
        ("DG_DEEPGEN_ATTENTION", "xformers", "flash_attention_2, sdpa, eager"),
        ("DG_DEEPGEN_OFFLOAD", "maybe", "boolean"),
        ("DG_DEEPGEN_DEVICE", "gpu0", "not a torch device"),
    ],
)
def test_invalid_values_are_named(tiny_env: dict[str, str], variable: str, value: str, hint: str) -> None:
    tiny_env[variable] = value
    with pytest.raises(DeepGenEnvError) as error:
        read_deepgen_env(tiny_env)
    assert error.value.variable == variable
    assert hint in str(error.value)


def test_diffusion_folder_without_vae_is_named(
    tiny_env: dict[str, str], tiny_model: TinyModelPaths, tmp_path: Path
) -> None:
    incomplete = tmp_path / "sd35"
    shutil.copytree(tiny_model.diffusion, incomplete)
    shutil.rmtree(incomplete / "vae")
    tiny_env["DG_DEEPGEN_DIFFUSION_MODEL_PATH"] = str(incomplete)
    with pytest.raises(DeepGenEnvError, match=r"DG_DEEPGEN_DIFFUSION_MODEL_PATH: .* no vae/ folder"):
        read_deepgen_env(tiny_env)


def test_ar_folder_without_config_is_named(tiny_env: dict[str, str], tmp_path: Path) -> None:
    tiny_env["DG_DEEPGEN_AR_MODEL_PATH"] = str(tmp_path)
    with pytest.raises(DeepGenEnvError, match=r"DG_DEEPGEN_AR_MODEL_PATH: .* no config.json"):
        read_deepgen_env(tiny_env)


def test_dtype_defaults_follow_the_device() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert devices.resolve_dtype(None, cpu, torch.bfloat16) is torch.float32
    assert devices.resolve_dtype(None, cuda, None) is torch.bfloat16
    assert devices.resolve_dtype(None, cuda, torch.float16) is torch.float16
    assert devices.resolve_dtype("bfloat16", cpu, None) is torch.bfloat16
    with pytest.raises(ValueError, match="float64"):
        devices.resolve_dtype("float64", cpu, None)


def test_device_detection_and_unavailable_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device(None) == torch.device("cpu")
    assert devices.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        devices.resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.resolve_device(None) == torch.device("cuda")


def test_flash_attention_falls_back_to_sdpa_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(devices, "flash_attention_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="worker.deepgen.devices"):
        assert devices.resolve_attention("flash_attention_2") == "sdpa"
    assert "flash_attn is not installed" in caplog.text
    assert devices.resolve_attention("eager") == "eager"
    monkeypatch.setattr(devices, "flash_attention_available", lambda: True)
    assert devices.resolve_attention("flash_attention_2", torch.device("cuda")) == "flash_attention_2"
    assert devices.resolve_attention("flash_attention_2", torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention kernel"):
        devices.resolve_attention("xformers")
