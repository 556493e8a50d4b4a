"""Fixtures shared by the engine tests: one tiny random DeepGen model per session.

(The root conftest sets HF_HUB_OFFLINE=1: nothing here may reach a model hub.)
"""

from __future__ import annotations

import pytest

from worker.deepgen import tiny


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tiny.TinyModelPaths:
    """Tiny Qwen2.5-VL + SD3 folders and both checkpoint files, written once per session."""
    return tiny.write_tiny_model(tmp_path_factory.mktemp("tiny_deepgen"))


@pytest.fixture
def tiny_env(tiny_model: tiny.TinyModelPaths) -> dict[str, str]:
    """The DG_DEEPGEN_* variables for the tiny model (deepgen_tiny config, safetensors checkpoint, CPU)."""
    return tiny.tiny_env(tiny_model)
