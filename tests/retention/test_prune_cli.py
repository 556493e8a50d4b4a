"""`diffgentor prune`: bad input is one `error:` line with its documented exit code; a prune prints
what it deleted (or, with --dry-run, what it would delete); `diffgentor sweep` prunes with
DG_RETENTION_DAYS. Embedded mode (SQLite and a file store under DG_HOME), in this process."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from api_client.cli import main
from schemas.tables import Job, utcnow
from tests.support import base_env, complete_job, run_cli
from worker.batches import NewBatch
from worker.db import make_engine, session_factory, upgrade
from worker.jobstore import JobStore
from worker.storage import FileArtifactStore

SPEC = {"kind": "t2i", "prompt": "a fox", "params": {"width": 64, "height": 64, "num_inference_steps": 2}}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """DG_HOME of an embedded set-up, with no other DG_* variable of this process in the way."""
    for name in list(os.environ):
        if name.startswith("DG_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("DG_HOME", str(tmp_path))
    return tmp_path


def old_jobs(home: Path, count: int, *, days: float = 40, batch: str | None = None) -> list[str]:
    """Succeeded jobs with one image each, finished ``days`` ago, in DG_HOME's database and store."""
    url = f"sqlite:///{home / 'jobs.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    store = JobStore(session_factory(engine))
    artifacts = FileArtifactStore((home / "artifacts").as_uri())
    submitted = store.submit([SPEC] * count, batch=NewBatch(batch) if batch else None)
    ids = [s.job.id for s in submitted]
    finished = utcnow() - timedelta(days=days)
    for job_id in ids:
        complete_job(store, artifacts, job_id)
    with engine.begin() as conn:
        conn.execute(sa.update(Job).where(Job.id.in_(ids)).values(created_at=finished, finished_at=finished))
    engine.dispose()
    return ids


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], 2, "prune needs --older-than DAYS"),
        (["--older-than", "-1"], 2, "--older-than must be from 0 to 36500 days, got '-1'"),
        (["--older-than", "abc"], 2, "--older-than 'abc' is not a number of days"),
        (["--older-than", "nan"], 2, "--older-than must be from 0 to"),
        (["--older-than", "30", "--status", "running"], 2, "queued and running jobs are never pruned"),
        (["--older-than", "30", "--status", "queued"], 2, "queued and running jobs are never pruned"),
        (["--older-than", "30", "--status", "done"], 2, "'done' is not a job status"),
        (["--older-than", "30", "--batch", "0000abcd"], 6, "no batch with id 0000abcd"),
        (["--older-than", "30", "--batch", "00"], 2, "is too short"),
    ],
)
def test_bad_input_is_one_line_with_its_exit_code(
    home: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int, message: str
) -> None:
    assert main(["prune", *args]) == code
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_prune_prints_what_it_deletes(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = old_jobs(home, 2, batch="run")
    young = old_jobs(home, 1, days=1)

    assert main(["prune", "--older-than", "30", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dry run: would prune 2 job(s) (succeeded, failed, cancelled) finished before ")
    assert "2 artifact row(s), 2 object(s)" in out and "nothing was deleted" in out
    assert all((home / "artifacts" / "jobs" / job_id).is_dir() for job_id in ids)

    assert main(["prune", "--older_than", "30d", "--status", "succeeded", "--batch", "ffffffff"]) == 6
    capsys.readouterr()  # an unknown batch: nothing deleted
    assert all((home / "artifacts" / "jobs" / job_id).is_dir() for job_id in ids)

    assert main(["prune", "--older-than", "30"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pruned 2 job(s) (succeeded, failed, cancelled) finished before ")
    assert "2 artifact row(s), 2 object(s)" in out and "1 emptied batch record(s)" in out
    assert not any((home / "artifacts" / "jobs" / job_id).exists() for job_id in ids)
    assert (home / "artifacts" / "jobs" / young[0]).is_dir()

    assert main(["status", ids[0]]) == 6  # gone for every reader
    assert "no job with id" in capsys.readouterr().err
    assert main(["prune", "--older-than", "0.5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["jobs"], report["objects"], report["dry_run"]) == (1, 1, False)


def test_prune_of_one_batch_by_prefix(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kept = old_jobs(home, 1, batch="keep")
    ids = old_jobs(home, 2, batch="drop")
    engine = make_engine(f"sqlite:///{home / 'jobs.sqlite3'}")
    with engine.connect() as conn:
        batch_id = conn.scalar(sa.select(Job.batch_id).where(Job.id == ids[0]))
    engine.dispose()
    assert batch_id
    assert main(["prune", "--older-than", "0", "--batch", batch_id[:8]]) == 0
    assert f"of batch {batch_id}" in capsys.readouterr().out
    assert main(["status", kept[0]]) == 0
    assert main(["status", ids[1]]) == 6


def test_sweep_prunes_with_retention_days(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = old_jobs(home, 1, days=3)
    monkeypatch.setenv("DG_RETENTION_DAYS", "2")
    assert main(["sweep"]) == 0
    assert "retention pruned 1 job(s) (DG_RETENTION_DAYS)" in capsys.readouterr().out
    assert not (home / "artifacts" / "jobs" / ids[0]).exists()


@pytest.mark.integration  # the console script in a subprocess
def test_the_console_script(tmp_path: Path) -> None:
    ids = old_jobs(tmp_path, 1)
    done = run_cli(["prune", "--older_than", "30", "--dry_run"], base_env(tmp_path), timeout=60)
    assert done.code == 0 and "would prune 1 job(s)" in done.stdout, done.stderr
    done = run_cli(["prune", "--older-than", "x"], base_env(tmp_path), timeout=60)
    assert done.code == 2 and done.stderr.strip().splitlines() == [
        "error: --older-than 'x' is not a number of days (e.g. 30, 0.5) or an age (12h, 90m, 30d)"
    ]
    done = run_cli(["prune", "--older-than", "30"], base_env(tmp_path), timeout=60)
    assert done.code == 0 and "pruned 1 job(s)" in done.stdout, done.stderr
    assert not (tmp_path / "artifacts" / "jobs" / ids[0]).exists()
