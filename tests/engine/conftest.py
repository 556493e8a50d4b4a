"""Fixtures for the engine tests (the tiny model itself: `tiny_model` in tests/conftest.py).

(The root conftest sets HF_HUB_OFFLINE=1: nothing here may reach a model hub.)
"""

from __future__ import annotations

import pytest

from worker.deepgen import tiny


@pytest.fixture
def tiny_env(tiny_model: tiny.TinyModelPaths) -> dict[str, str]:
    """The DG_DEEPGEN_* variables for the tiny model (deepgen_tiny config, safetensors checkpoint, CPU)."""
    return tiny.tiny_env(tiny_model)
