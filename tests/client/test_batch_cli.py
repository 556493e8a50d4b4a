"""`diffgentor batches` and `diffgentor batch ...` in queue mode (Redis, a SQLite job table, a file
artifact folder), the jobs finished by hand through the store: the output, the files written and
every error's exit code. One end-to-end run of the console script; the rest calls `main()`."""

from __future__ import annotations

import csv
import json
import subprocess
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from api_client.cli import main
from api_client.errors import ExitCode
from schemas.tables import Batch, utcnow
from tests.support import DIFFGENTOR, base_env, complete_job, fail_job, run_cli
from worker.batches import NewBatch
from worker.db import make_engine, session_factory, upgrade
from worker.jobstore import JobStore
from worker.storage import FileArtifactStore


@dataclass
class Setup:
    store: JobStore
    artifacts: FileArtifactStore
    batch_id: str
    job_ids: list[str]
    env: dict[str, str]


@pytest.fixture
def setup(clean_env: Path, tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Setup:
    """A batch of 4 rows (indexes 0, 1, 2, 5): one image, three images, failed, queued."""
    database_url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    upgrade(database_url)
    artifacts = FileArtifactStore((tmp_path / "artifacts").as_uri())
    env = {
        "DG_BROKER_URL": redis_url,
        "DG_DATABASE_URL": database_url,
        "DG_STORAGE_URL": artifacts.url,
        "DG_USER": "alice",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    store = JobStore(session_factory(make_engine(database_url)))
    model = f"deepgen-{uuid.uuid4().hex[:8]}"  # its own queue: no other test's worker takes these ids
    specs = [
        {"kind": "t2i", "prompt": f"prompt {i}", "model_name": model, "params": {"height": 32, "width": 32}}
        for i in range(4)
    ]
    jobs = [item.job for item in store.submit(specs, batch=NewBatch("cli run"), batch_indexes=[0, 1, 2, 5])]
    complete_job(store, artifacts, jobs[0].id)
    complete_job(store, artifacts, jobs[1].id, images=3)
    fail_job(store, jobs[2].id, message="input image missing")
    assert jobs[0].batch_id is not None
    with make_engine(database_url).begin() as connection:  # older than the throughput window
        connection.execute(
            sa.update(Batch)
            .where(Batch.id == jobs[0].batch_id)
            .values(created_at=utcnow() - timedelta(hours=1))
        )
    return Setup(store, artifacts, jobs[0].batch_id, [job.id for job in jobs], {**base_env(clean_env), **env})


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "internal error" not in err
    return code, out, err


def test_batch_commands(setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = setup.batch_id[:8]
    code, out, _ = run(["batches"], capsys)
    assert code == 0
    [line] = out.splitlines()
    assert line.startswith(f"{setup.batch_id}  cli run  alice  ")
    assert "[###############-----]  75% 3/4 finished" in line
    assert "queued=1 running=0 succeeded=2 failed=1 cancelled=0" in line
    assert line.endswith("0.3/min (last 10m00s)  eta 3m20s")  # 3 done in the window, 1 to go

    code, out, _ = run(["batches", "--json", "--owner", "alice"], capsys)
    record = json.loads(out)
    assert record["counts"]["failed"] == 1 and record["job_count"] == 4 and record["finished_in_window"] == 3
    assert run(["batches", "--owner", "bob"], capsys)[2].strip() == "no batches of owner 'bob'"

    code, out, _ = run(["batch", "show", prefix], capsys)
    assert code == 0
    assert f"  index 2  job {setup.job_ids[2]}  failed  ValueError: input image missing" in out.splitlines()

    code, out, err = run(["batch", "fetch", prefix, "-o", str(tmp_path / "images")], capsys)
    assert code == 0 and "2 row(s) have no images yet (1 failed, 0 cancelled, 1 unfinished)" in err
    names = ["000000.png", "000001_00.png", "000001_01.png", "000001_02.png"]
    assert [Path(line).name for line in out.splitlines()] == names
    assert sorted(path.name for path in (tmp_path / "images").iterdir()) == names

    code, out, _ = run(["batch", "export", prefix, "-o", str(tmp_path / "rows.csv")], capsys)
    assert code == 0 and out.startswith("wrote 4 row(s)")
    with open(tmp_path / "rows.csv", newline="") as handle:
        assert [row["index"] for row in csv.DictReader(handle)] == ["0", "1", "2", "5"]
    run(["batch", "export", prefix, "-o", str(tmp_path / "rows.out"), "--format", "jsonl"], capsys)
    assert [json.loads(line)["status"] for line in (tmp_path / "rows.out").read_text().splitlines()] == [
        "succeeded",
        "succeeded",
        "failed",
        "queued",
    ]

    code, _, err = run(["batch", "wait", prefix, "--timeout", "0.3", "--no-progress"], capsys)
    assert code == ExitCode.TIMEOUT and f"reattach with: diffgentor batch wait {setup.batch_id}" in err

    code, out, _ = run(["batch", "retry-failed", prefix], capsys)
    assert code == 0 and "1 row(s) retried as new jobs" in out
    code, out, _ = run(["batch", "cancel", prefix], capsys)
    assert code == 0 and "2 job(s) cancelled, 0 running job(s)" in out  # the queued row and the retry
    code, out, err = run(["batch", "wait", prefix], capsys)
    assert code == ExitCode.JOBS_FAILED and "2 row(s) failed or were cancelled" in err
    assert "queued=0 running=0 succeeded=2 failed=0 cancelled=2" in out
    assert "batch cli run: 4/4 finished" in err  # the plain progress line (stderr is not a terminal)


def test_batch_errors_have_their_exit_codes(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = make_engine(setup.env["DG_DATABASE_URL"])
    with engine.begin() as conn:
        for suffix in ("0000", "1111"):
            conn.execute(
                sa.insert(Batch).values(
                    id=f"abcd{suffix}-0000-4000-8000-000000000000",
                    name="x",
                    owner="x",
                    model_name="deepgen",
                    created_at=utcnow(),
                    job_count=0,
                )
            )
    engine.dispose()
    prefix = setup.batch_id[:8]
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    cases = [
        (["batch", "show", "ffff0000"], ExitCode.NOT_FOUND, "no batch with id ffff0000"),
        (["batch", "wait", "abcd"], ExitCode.USAGE, "batch id prefix abcd is ambiguous"),
        (["batch", "show", "abc"], ExitCode.USAGE, "too short"),
        (
            ["batch", "export", prefix, "-o", str(tmp_path / "rows.txt")],
            ExitCode.USAGE,
            "name it .csv or .jsonl",
        ),
        (["batch", "export", prefix, "-o", str(a_file / "rows.csv")], ExitCode.INPUT_FILE, str(a_file)),
        (["batch", "export", prefix, "-o", str(tmp_path)], ExitCode.INPUT_FILE, "it is a folder"),
        (["batch", "fetch", prefix, "-o", str(a_file)], ExitCode.INPUT_FILE, str(a_file)),
        (["batches", "--limit", "0"], ExitCode.USAGE, "limit must be between 1 and 1000"),
    ]
    for args, expected, says in cases:
        code, _, err = run(args, capsys)
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert (code, len(errors)) == (expected, 1), (args, err)
        assert says in errors[0], (args, err)
    assert run(["batch"], capsys)[0] == ExitCode.USAGE  # no subcommand: its help, exit 2


def test_batches_end_to_end_and_into_a_closed_pipe(setup: Setup) -> None:
    """The console script itself; `diffgentor batches | head -1` ends quietly as `list` does."""
    done = run_cli(["batches"], setup.env, timeout=120)
    assert done.code == 0, done.stderr
    assert done.stdout.startswith(setup.batch_id) and "3/4 finished" in done.stdout
    for number in range(30):  # more lines than a pipe reader takes
        setup.store.submit([{"kind": "t2i", "prompt": "p"}], batch=NewBatch(f"more {number}"))
    piped = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"'{DIFFGENTOR}' batches --limit 1000 | head -1"],
        env=setup.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert piped.returncode in (0, 141), piped.stderr
    assert piped.stderr == "" and len(piped.stdout.splitlines()) == 1
