"""Fixtures for the client/CLI tests: a clean DG_* environment, the tiny model, CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DIFFGENTOR = Path(sys.executable).parent / "diffgentor"  # the console script declared in pyproject


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def base_env(home: Path) -> dict[str, str]:
    """This process's environment without any DG_* setting, with its own DG_HOME."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DG_")}
    env.update(DG_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def run_cli(args: list[str], env: Mapping[str, str], timeout: float = 240, cwd: Path | None = None) -> CliResult:
    """Run the real `diffgentor` console script in a subprocess."""
    done = subprocess.run(
        [str(DIFFGENTOR), *args], env=dict(env), capture_output=True, text=True, timeout=timeout,
        cwd=cwd or REPO_ROOT,
    )
    return CliResult(done.returncode, done.stdout, done.stderr)


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
def tiny_paths(tmp_path_factory: pytest.TempPathFactory):  # -> worker.deepgen.tiny.TinyModelPaths
    from worker.deepgen.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("client_tiny_deepgen"))


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


def write_png(path: Path, size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path
