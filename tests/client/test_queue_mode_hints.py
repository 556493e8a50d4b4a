"""Queue-mode misconfiguration is named: DG_BROKER_URL without DG_DATABASE_URL is refused, and a
wait whose jobs sit in a queue no live worker serves says so on its progress line."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from api_client import DiffgentorClient
from api_client.errors import ConfigurationError, ExitCode, WaitTimeout
from tests.support import base_env, run_cli


@pytest.mark.parametrize(
    "command",
    [
        ["list"],
        ["t2i", "--prompt", "x", "--output_dir", "o"],
        ["worker", "--model_name", "deepgen"],
        ["sweep"],
    ],
)
def test_broker_without_database_url_is_refused(command: list[str], tmp_path: Path) -> None:
    env = {**base_env(tmp_path / "home"), "DG_BROKER_URL": "redis://127.0.0.1:6379/15"}
    result = run_cli(command, env, cwd=tmp_path)
    assert result.code == ExitCode.CONFIGURATION, result.stderr
    assert "DG_BROKER_URL is set but DG_DATABASE_URL is not" in result.stderr
    assert "workers (and producers) on other hosts can never see" in result.stderr
    assert not (tmp_path / "home" / "jobs.sqlite3").exists()  # refused before anything was written


def test_client_refuses_a_broker_without_a_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("DG_BROKER_URL", "DG_DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigurationError, match="DG_BROKER_URL is set but DG_DATABASE_URL is not"):
        DiffgentorClient(broker_url="redis://127.0.0.1:6379/15", home=tmp_path)
    explicit = DiffgentorClient(
        broker_url="redis://127.0.0.1:6379/15", database_url=f"sqlite:///{tmp_path}/j.db", home=tmp_path
    )
    assert not explicit.embedded  # an explicit SQLite file is a deliberate single-host choice
    assert DiffgentorClient(broker_url="memory://", home=tmp_path).settings.database_url.startswith("sqlite")


def test_wait_says_when_no_live_worker_serves_the_queue(
    tmp_path: Path,
    sqlite_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from worker.db import session_factory, upgrade
    from worker.registry import WorkerRegistry

    for key in ("DG_BROKER_URL", "DG_DATABASE_URL", "DG_STORAGE_URL"):
        monkeypatch.delenv(key, raising=False)
    upgrade(sqlite_url)
    model = f"nobody-{uuid.uuid4().hex[:8]}"  # its own queue: no test worker consumes it
    with DiffgentorClient(
        database_url=sqlite_url,
        broker_url=redis_url,
        storage_url=(tmp_path / "art").as_uri(),
        home=tmp_path,
        poll_seconds=0.1,
    ) as client:
        client.no_worker_notice_seconds = 0.5
        job = client.submit_t2i("waits", model_name=model)
        with pytest.raises(WaitTimeout):
            client.wait(job, timeout=2, progress=True)
        err = capsys.readouterr().err
        assert f"no live worker for model '{model}'" in err
        assert f"start one with `diffgentor worker --model_name {model}`" in err

        # A live worker of that model (fresh heartbeat) silences the hint.
        WorkerRegistry(session_factory(client._engine)).register("w-live", model_name=model, queue=model)
        with pytest.raises(WaitTimeout):
            client.wait(job, timeout=2, progress=True)
        assert "no live worker" not in capsys.readouterr().err
        client.cancel(job)
