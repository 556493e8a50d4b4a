"""Fixtures for the client/CLI tests: a clean DG_* environment and the tiny model's variables
(helpers such as `run_cli` and `base_env`: tests/support.py; the model: `tiny_paths` in tests/conftest.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import base_env


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """For in-process `main()` calls: no DG_* variables, DG_HOME in tmp_path. Returns DG_HOME."""
    for key in list(os.environ):
        if key.startswith("DG_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    monkeypatch.setenv("DG_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_environ(tiny_paths) -> dict[str, str]:
    from worker.deepgen.tiny import tiny_env

    return tiny_env(tiny_paths)


@pytest.fixture
def embedded_env(tmp_path: Path, tiny_environ: dict[str, str]) -> Iterator[dict[str, str]]:
    """Subprocess environment for the embedded default with the tiny model (fast, short leases)."""
    env = base_env(tmp_path / "home")
    env.update(tiny_environ)
    env.update(DG_LEASE_SECONDS="3", DG_HEARTBEAT_SECONDS="0.5", DG_PROGRESS_INTERVAL_SECONDS="0")
    yield env
