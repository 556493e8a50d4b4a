"""The README's Python-client snippet runs as written on the embedded default, and a script that
ends without `close()` exits cleanly: no abort from a thread left inside torch, no job left running."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import REPO_ROOT, write_png

pytestmark = pytest.mark.integration  # Python subprocesses run the tiny model end to end (~40 s)


def readme_python_snippet() -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Python client") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README has no ```python block under '### Python client'"
    return match.group(1)


def run_script(
    code: str, env: dict[str, str], cwd: Path, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    env = {**env, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def statuses(home: Path) -> dict[str, str]:
    with sqlite3.connect(home / "jobs.sqlite3") as connection:
        return dict(connection.execute("SELECT id, status FROM jobs").fetchall())


def snippet_env(embedded_env: dict[str, str]) -> dict[str, str]:
    # `dynamic` keeps the small local edit inputs at their own size (64x64): a fast edit job.
    return {**embedded_env, "DG_DEEPGEN_IMAGE_RESIZE_MODE": "dynamic"}


def test_readme_snippet_runs_as_written_and_exits_cleanly(
    embedded_env: dict[str, str], tmp_path: Path
) -> None:
    snippet = readme_python_snippet()
    assert "http://" not in snippet and "https://" not in snippet, "the snippet must run offline"
    workdir = tmp_path / "work"
    for name in re.findall(r"""["']([\w.-]+\.(?:png|jpe?g))["']""", snippet):
        write_png(workdir / name)  # the local files the snippet names (PIL reads a .jpg name as PNG data too)
    workdir.mkdir(exist_ok=True)

    done = run_script(snippet, snippet_env(embedded_env), workdir)

    assert "terminate called" not in done.stderr
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    jobs = statuses(Path(embedded_env["DG_HOME"]))
    assert "running" not in jobs.values(), jobs
    assert len(list((workdir / "out").glob("*-0.png"))) == 1  # client.download(job, "out/")
    assert "succeeded" in jobs.values() and "cancelled" in jobs.values()  # `later` was cancelled
    exported = (workdir / "pets.jsonl").read_text().splitlines()  # pets.export(...)
    assert len(exported) == 2 and all(len(json.loads(line)["artifact_uris"]) == 2 for line in exported)
    assert done.stdout.count("{") >= 1  # pets.counts() printed


def test_exit_without_close_cancels_the_running_job_and_leaves_the_rest_queued(
    embedded_env: dict[str, str], tmp_path: Path
) -> None:
    script = textwrap.dedent("""
        import time
        from api_client import DiffgentorClient

        client = DiffgentorClient.from_env()
        slow = {"num_inference_steps": 200, "height": 256, "width": 256}
        first = client.submit_t2i("a long one", **slow)
        second = client.submit_t2i("never started", **slow)
        while client.get(first).progress_step < 1:
            time.sleep(0.05)
        print(first.id, second.id)
    """)  # ... and the script ends with the first job mid-run, without close()
    done = run_script(script, embedded_env, tmp_path, timeout=300)

    assert "terminate called" not in done.stderr
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = done.stdout.split()
    jobs = statuses(Path(embedded_env["DG_HOME"]))
    assert jobs == {first: "cancelled", second: "queued"}
    assert f"cancelling job {first} at its next step" in done.stderr
    assert "1 job(s) not started stay queued" in done.stderr
