"""Preflight: a config that does not fit the checkpoint, a missing device or a tokenizer without the
image token stops `diffgentor worker` (exit 4, one short line) before it consumes, and embedded
submits before any job row is written; the right config passes (worker/preflight.py)."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from api_client.client import DiffgentorClient
from api_client.errors import ConfigurationError, ExitCode
from tests.support import DIFFGENTOR, REPO_ROOT
from worker.deepgen.configuration import CONFIG_DIR
from worker.deepgen.tiny import TinyModelPaths, tiny_env
from worker.preflight import (
    MAX_LINE,
    REPORT_FILE_NAME,
    PreflightError,
    check_in_subprocess,
    run_preflight,
)
from worker.testing import worker_environ

FAST = {"num_inference_steps": 2, "height": 64, "width": 64}


def environ(paths: TinyModelPaths, home: Path, **overrides: str) -> dict[str, str]:
    return {**tiny_env(paths, **overrides), "DG_HOME": str(home)}


def assert_one_short_line(message: str) -> None:
    assert "\n" not in message and len(message) <= MAX_LINE, (len(message), message)


# ------------------------------------------------------------------------------------------ in-process


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_right_config_passes(tiny_model_paths: TinyModelPaths, tmp_path: Path, kind: str) -> None:
    checkpoint = (
        tiny_model_paths.checkpoint_safetensors if kind == "safetensors" else tiny_model_paths.checkpoint_pt
    )
    result = run_preflight(environ(tiny_model_paths, tmp_path, CHECKPOINT=str(checkpoint)))
    assert (result.config, result.device, result.checkpoint) == ("deepgen_tiny", "cpu", checkpoint.name)
    assert result.matched_keys == len(load_file(str(tiny_model_paths.checkpoint_safetensors)))
    assert "preflight ok" in result.line() and not (tmp_path / REPORT_FILE_NAME).exists()


@pytest.mark.parametrize(
    ("config", "queries", "width"), [("deepgen", 128, 2048), ("deepgen_large", 256, 4096)]
)
def test_wrong_config_fails_with_one_line_naming_family_shapes_and_fix(
    tiny_model_paths: TinyModelPaths,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    config: str,
    queries: int,
    width: int,
) -> None:
    with caplog.at_level("INFO", logger="worker.preflight"), pytest.raises(PreflightError) as error:
        run_preflight(environ(tiny_model_paths, tmp_path, CONFIG=config))
    message = str(error.value)
    assert_one_short_line(message)
    assert message.startswith(f"config {config} does not fit checkpoint.safetensors: ")
    assert f"meta_queries: checkpoint [8, 64], config [{queries}, 64]" in message  # the first family
    assert "this checkpoint needs DG_DEEPGEN_CONFIG=deepgen_tiny" in message  # the known config that fits
    report = tmp_path / REPORT_FILE_NAME
    assert f"; key report: {report}" in message or message.endswith(
        "; key report in the log"
    )  # as space allows
    text = report.read_text()  # the full report: every family, every key
    assert f"mismatch   projector_1.weight: checkpoint [32, 384] vs model [{width}, 384]" in text
    assert "missing    connector.layers.5.mlp.fc2.bias" in text
    assert "preflight: meta_queries: checkpoint [8, 64]" in caplog.text  # and the log has it too


def test_no_known_config_fits_says_what_to_write(tiny_model_paths: TinyModelPaths, tmp_path: Path) -> None:
    state = load_file(str(tiny_model_paths.checkpoint_safetensors))
    state["meta_queries"] = torch.zeros(5, 64)
    path = tmp_path / "five_queries.safetensors"
    save_file(state, str(path))
    with pytest.raises(PreflightError) as error:
        run_preflight(environ(tiny_model_paths, tmp_path, CHECKPOINT=str(path)))
    message = str(error.value)
    assert_one_short_line(message)
    assert "meta_queries: checkpoint [5, 64], config [8, 64]" in message
    assert "no config in worker/deepgen/config fits it" in message


def test_lora_rank_is_checked(tiny_model_paths: TinyModelPaths, tmp_path: Path) -> None:
    state = load_file(str(tiny_model_paths.checkpoint_safetensors))
    module = "lmm.model.language_model.layers.0.self_attn.q_proj"
    state[f"{module}.lora_A.default.weight"] = torch.zeros(16, 64)
    state[f"{module}.lora_B.default.weight"] = torch.zeros(64, 16)
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path))
    with pytest.raises(PreflightError) as error:
        run_preflight(environ(tiny_model_paths, tmp_path, CHECKPOINT=str(path)))
    message = str(error.value)
    assert_one_short_line(message)
    assert f"{module}.lora_A.default.weight: checkpoint [16, 64], config [4, 64]" in message
    assert "set lora_rank=16 in the config" in message


def test_missing_device_fails_with_one_line(tiny_model_paths: TinyModelPaths, tmp_path: Path) -> None:
    device = f"cuda:{torch.cuda.device_count()}"  # never present: no CUDA here, or one index too far
    with pytest.raises(PreflightError) as error:
        run_preflight(environ(tiny_model_paths, tmp_path, DEVICE=device))
    message = str(error.value)
    assert_one_short_line(message)
    assert message.startswith(f"DG_DEEPGEN_DEVICE={device}: ") and "DG_DEEPGEN_DEVICE=cpu" in message


def test_image_token_must_be_in_the_tokenizer(tiny_model_paths: TinyModelPaths, tmp_path: Path) -> None:
    source = (CONFIG_DIR / "deepgen_tiny.py").read_text()
    assert 'IMG_CONTEXT_TOKEN="<|image_pad|>"' in source
    config = tmp_path / "odd_token.py"
    config.write_text(source.replace('IMG_CONTEXT_TOKEN="<|image_pad|>"', 'IMG_CONTEXT_TOKEN="<|img_ctx|>"'))
    with pytest.raises(PreflightError) as error:
        run_preflight(environ(tiny_model_paths, tmp_path, CONFIG=str(config)))
    message = str(error.value)
    assert_one_short_line(message)
    assert "has no token '<|img_ctx|>'" in message and "config odd_token" in message


@pytest.mark.integration  # a `python -m worker.preflight` subprocess loads the model's libraries (~10 s)
def test_the_child_process_reports_the_same_line(tiny_model_paths: TinyModelPaths, tmp_path: Path) -> None:
    """What `diffgentor worker` runs: `python -m worker.preflight`, exit 4 and the line on stdout."""
    env = {**os.environ, **environ(tiny_model_paths, tmp_path, DEVICE="cuda:99"), "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    with pytest.raises(PreflightError) as error:
        check_in_subprocess(env, loglevel="WARNING", timeout=300)
    message = str(error.value)
    assert_one_short_line(message)
    assert message.startswith("DG_DEEPGEN_DEVICE=cuda:99: ")
    assert time.monotonic() - started < 300


def test_embedded_client_runs_the_preflight_once(
    monkeypatch: pytest.MonkeyPatch, tiny_model_paths: TinyModelPaths, tmp_path: Path
) -> None:
    import worker.preflight

    for key in list(os.environ):
        if key.startswith("DG_"):
            monkeypatch.delenv(key)
    for key, value in environ(tiny_model_paths, tmp_path / "home").items():
        monkeypatch.setenv(key, value)
    calls: list[int] = []
    real = worker.preflight.run_preflight
    monkeypatch.setattr(worker.preflight, "run_preflight", lambda env=None: calls.append(1) or real(env))
    client = DiffgentorClient.from_env()
    assert client.embedded
    client._check_engine_env()
    client._check_engine_env()
    assert len(calls) == 1  # cached per client
    monkeypatch.setenv("DG_DEEPGEN_CONFIG", "deepgen")  # another model: checked again, and refused
    with pytest.raises(ConfigurationError, match="this checkpoint needs DG_DEEPGEN_CONFIG=deepgen_tiny"):
        client._check_engine_env()
    with pytest.raises(ConfigurationError):
        client._check_engine_env()  # a failure is not cached
    assert len(calls) == 3
    monkeypatch.setenv("DG_SKIP_PREFLIGHT", "1")
    client._check_engine_env()
    assert len(calls) == 3


# ------------------------------------------------------------------------------------------ commands


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.integration  # the `diffgentor t2i` console script end to end in a subprocess (~10 s)
def test_embedded_t2i_with_the_wrong_config_fails_once_before_any_job(
    tiny_model_paths: TinyModelPaths, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = {key: value for key, value in os.environ.items() if not key.startswith("DG_")}
    env.update(environ(tiny_model_paths, home, CONFIG="deepgen"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    done = subprocess.run(
        [
            str(DIFFGENTOR),
            "t2i",
            "--prompt",
            "a fox",
            "--output_dir",
            str(tmp_path / "out"),
            "--num_inference_steps",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert done.returncode == ExitCode.CONFIGURATION, done.stderr
    errors = _error_lines(done.stderr)
    assert len(errors) == 1 and len(errors[0]) <= 300, done.stderr
    assert "config deepgen does not fit" in errors[0] and "DG_DEEPGEN_CONFIG=deepgen_tiny" in errors[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with DiffgentorClient(home=home) as client:  # the embedded SQLite job table: no row was written
        assert client.list() == []


@pytest.fixture
def queued_job(migrated_pg_url: str, redis_url: str) -> Iterator[tuple[str, Any, str]]:
    """A model queue with one job published on it before any worker starts: (model, store, job id)."""
    from worker.db import make_engine, session_factory
    from worker.jobstore import JobStore
    from worker.publish import CeleryPublisher
    from worker.submission import submit_jobs

    model_name = f"deepgen-{uuid.uuid4().hex[:8]}"
    engine = make_engine(migrated_pg_url)
    store = JobStore(session_factory(engine))
    publisher = CeleryPublisher(redis_url)
    try:
        [submitted] = submit_jobs(
            store, publisher, [{"kind": "t2i", "prompt": "a fox", "model_name": model_name, "params": FAST}]
        )
        yield model_name, store, submitted.job.id
    finally:
        publisher.close()
        engine.dispose()


@pytest.mark.integration
def test_worker_with_the_wrong_config_exits_4_and_never_consumes(
    queued_job: tuple[str, Any, str],
    migrated_pg_url: str,
    redis_url: str,
    tiny_model_paths: TinyModelPaths,
    tmp_path: Path,
) -> None:
    import redis

    from worker.metrics import KOMBU_PRIORITY_SEPARATOR

    model_name, store, job_id = queued_job
    env = worker_environ(
        database_url=migrated_pg_url,
        broker_url=redis_url,
        storage_url=(tmp_path / "artifacts").as_uri(),
        home=tmp_path / "home",
        model_env=tiny_env(tiny_model_paths, CONFIG="deepgen"),
    )
    started = time.monotonic()
    done = subprocess.run(
        [str(DIFFGENTOR), "worker", "--model_name", model_name, "--loglevel", "INFO"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == ExitCode.CONFIGURATION, done.stderr[-3000:]
    errors = _error_lines(done.stderr)
    assert len(errors) == 1 and done.stderr.rstrip().endswith(errors[0]), done.stderr[-3000:]
    line = errors[0]
    assert len(line) <= 300
    assert "config deepgen does not fit checkpoint.safetensors: meta_queries" in line
    assert "DG_DEEPGEN_CONFIG=deepgen_tiny" in line
    assert (
        "preflight: meta_queries: checkpoint [8, 64] vs model [128, 64]" in done.stderr
    )  # the log has the report
    assert " ready." not in done.stderr and "Connected to" not in done.stderr  # Celery never started
    assert elapsed < 240

    job = store.get(job_id)
    assert job.status.value == "queued" and job.attempts == 0 and job.started_at is None
    client = redis.Redis.from_url(redis_url)
    try:
        waiting = sum(
            client.llen(name)
            for name in [model_name, *(f"{model_name}{KOMBU_PRIORITY_SEPARATOR}{p}" for p in range(1, 10))]
        )
    finally:
        client.close()
    assert waiting == 1  # the message is still in Redis for a worker that fits
