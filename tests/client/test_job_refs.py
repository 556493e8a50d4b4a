"""Job commands take unique id prefixes (as git does), and `cancel` refuses a finished job."""

from __future__ import annotations

from pathlib import Path

import pytest

from api_client.cli import main
from api_client.client import DiffgentorClient
from api_client.errors import ExitCode, JobNotFound, JobStateError, UsageError

IDS = [
    "abcd1234-0000-4000-8000-000000000001",
    "abcd1234-0000-4000-8000-000000000002",
    "f00dcafe-0000-4000-8000-000000000003",
]


@pytest.fixture
def jobs(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> DiffgentorClient:
    """Three queued jobs with chosen ids in a SQLite job table, in queue mode on Celery's in-memory
    broker: nothing runs them, so each command shows what it does with a queued job."""
    import worker.jobstore
    from worker.db import upgrade

    database_url = f"sqlite:///{clean_env / 'jobs.sqlite3'}"
    upgrade(database_url)
    monkeypatch.setenv("DG_DATABASE_URL", database_url)
    monkeypatch.setenv("DG_BROKER_URL", "memory://")
    with monkeypatch.context() as patch:  # the ids and seeds of new rows come from one function
        patch.setattr(worker.jobstore, "_ids_and_seeds", lambda count: (IDS[:count], [7] * count))
        client = DiffgentorClient.from_env()
        client.store.submit([client.t2i_spec(f"prompt {n}") for n in range(3)])
    return client


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def test_client_resolves_unique_prefixes(jobs: DiffgentorClient) -> None:
    assert jobs.resolve_job_id("f00d") == IDS[2]
    assert jobs.resolve_job_id("F00DCAFE-00") == IDS[2]  # ids are lowercase; the prefix is taken either way
    assert jobs.resolve_job_id(IDS[1]) == IDS[1]  # a full id needs no lookup
    assert [job.id for job in jobs.get_many(["f00dcafe", IDS[0]])] == [IDS[2], IDS[0]]
    with pytest.raises(UsageError, match=f"job id prefix abcd is ambiguous: it matches {IDS[0]}, {IDS[1]}"):
        jobs.get("abcd")
    with pytest.raises(UsageError, match="at least 4 characters"):
        jobs.get("f00")
    with pytest.raises(JobNotFound, match="no job with id beef"):
        jobs.get("beef")
    with pytest.raises(JobNotFound):
        jobs.get("ab%d")  # a LIKE wildcard is no prefix


@pytest.mark.parametrize("command", ["status", "wait", "fetch", "cancel", "retry"])
def test_every_job_command_takes_a_prefix(
    command: str, jobs: DiffgentorClient, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = {"wait": ["--timeout", "0"], "fetch": ["-o", "out"]}.get(command, [])
    code, out, err = run([command, "abcd", *extra], capsys)
    assert (
        code == ExitCode.USAGE and f"it matches {IDS[0]}, {IDS[1]}" in err
    )  # ambiguous, with the candidates
    code, out, err = run([command, "f00dcafe", *extra], capsys)
    # Resolved: each command then does its own thing with that one (queued) job, naming its full id.
    expected = {
        "status": ExitCode.OK,
        "wait": ExitCode.TIMEOUT,
        "fetch": ExitCode.STATE,
        "cancel": ExitCode.OK,
        "retry": ExitCode.STATE,
    }[command]
    assert code == expected, err
    assert IDS[2] in out + err
    code, _, err = run([command, "beef", *extra], capsys)
    assert code == ExitCode.NOT_FOUND and "no job with id beef" in err


def test_cancel_of_a_finished_job_exits_8(jobs: DiffgentorClient, capsys: pytest.CaptureFixture[str]) -> None:
    store = jobs.store
    assert store.claim(IDS[0], "w1", 60) is not None
    assert store.finish_failed(IDS[0], "w1", error_type="RuntimeError", error_message="boom")
    code, _, err = run(["cancel", IDS[0][:8] + "-0000-4000-8000-000000000001"], capsys)
    assert code == ExitCode.STATE
    assert f"job {IDS[0]} already failed: there is nothing to cancel; `diffgentor retry` runs it again" in err
    with pytest.raises(JobStateError):
        jobs.cancel(IDS[0])

    assert run(["cancel", "f00dcafe"], capsys)[0] == ExitCode.OK
    assert jobs.get(IDS[2]).status.value == "cancelled"
    assert run(["cancel", "f00dcafe"], capsys)[0] == ExitCode.OK  # again: a no-op, not an error
