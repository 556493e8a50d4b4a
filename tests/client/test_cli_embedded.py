"""The CLI end to end on the embedded default: real `diffgentor` subprocesses, SQLite, file storage,
the tiny DeepGen model running in-process through the worker's task code."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from api_client.outputs import default_file_mode
from tests.support import DIFFGENTOR, REPO_ROOT, base_env, run_cli, write_png
from worker.testing import free_port

pytestmark = pytest.mark.integration  # `diffgentor` subprocesses run the tiny model end to end (minutes)

FAST = ["--num_inference_steps", "2", "--height", "64", "--width", "64"]


def listed_jobs(env: dict[str, str]) -> list[dict]:
    result = run_cli(["list", "--json", "--limit", "1000"], env)
    assert result.code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_t2i_prompts_file_resume_and_reattach(embedded_env: dict[str, str], tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red fox", "index": 7}\n"a blue bird"\n{"prompt": "a green tree"}\n')
    out = tmp_path / "out"
    args = [
        "t2i",
        "--backend",
        "deepgen",
        "--model_name",
        "deepgen",
        "--prompts_file",
        str(prompts),
        "--output_dir",
        str(out),
        *FAST,
    ]

    first = run_cli(args, embedded_env)
    assert first.code == 0, first.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["000001.png", "000002.png", "000007.png"]
    assert Image.open(out / "000007.png").size == (64, 64)
    jobs = listed_jobs(embedded_env)
    assert len(jobs) == 3 and {job["status"] for job in jobs} == {"succeeded"}
    assert len({job["seed"] for job in jobs}) == 3  # a random seed drawn and recorded per job
    assert {job["spec"]["prompt"] for job in jobs} == {"a red fox", "a blue bird", "a green tree"}

    again = run_cli(args, embedded_env)
    assert again.code == 0 and "nothing to do" in again.stdout
    assert len(listed_jobs(embedded_env)) == 3

    (out / "000002.png").unlink()
    resumed = run_cli(args, embedded_env)
    assert resumed.code == 0, resumed.stderr
    assert "skipping 2 row(s)" in resumed.stderr and "1 reattached" in resumed.stderr
    assert (out / "000002.png").is_file()
    assert len(listed_jobs(embedded_env)) == 3  # the same job, found by its idempotency key


def test_t2i_csv_prompts_file_with_a_fixed_seed(embedded_env: dict[str, str], tmp_path: Path) -> None:
    # (Every prompts-file format is parsed in test_inputs.py; this runs one more through the CLI.)
    (tmp_path / "p.csv").write_text('index,prompt\n4,"a cat, sitting"\n9,a dog\n')
    out = tmp_path / "out"
    result = run_cli(
        [
            "t2i",
            "--prompts_file",
            str(tmp_path / "p.csv"),
            "--output_dir",
            str(out),
            *FAST,
            "--seed",
            "11",
            "--negative_prompt",
            "blurry",
        ],
        embedded_env,
    )
    assert result.code == 0, result.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["000004.png", "000009.png"]
    jobs = listed_jobs(embedded_env)
    assert {job["seed"] for job in jobs} == {11}
    assert {job["spec"]["prompt"] for job in jobs} == {"a cat, sitting", "a dog"}
    assert {job["spec"]["params"]["negative_prompt"] for job in jobs} == {"blurry"}


def test_edit_csv_forms_and_results_csv(embedded_env: dict[str, str], tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_png(data / "imgs" / "a.png", (64, 64))  # the tiny model takes inputs up to 512 px once resized
    write_png(data / "imgs" / "b.png", (64, 64), (0, 0, 255))
    absolute = write_png(tmp_path / "elsewhere" / "c.png", (64, 64), (0, 255, 0))
    csv_path = data / "edits.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["input_images", "edit_prompt", "index", "note"])
        writer.writerow([json.dumps(["imgs/a.png", "imgs/b.png"]), "make it red", "3", "json list"])
        writer.writerow(["imgs/b.png, imgs/a.png", "make it blue", "", "comma list"])
        writer.writerow([str(absolute), "make it green", "", "absolute path"])
        writer.writerow([f"http://127.0.0.1:{free_port()}/gone.png", "make it gold", "4", "dead url"])
    out = tmp_path / "out"
    args = [
        "edit",
        "--input",
        str(csv_path),
        "--instruction_key",
        "edit_prompt",
        "--output_dir",
        str(out),
        *FAST,
    ]
    result = run_cli(args, embedded_env)
    assert result.code == 1, result.stderr  # one row's job failed
    assert sorted(p.name for p in out.glob("*.png")) == ["000001.png", "000002.png", "000003.png"]
    assert Image.open(out / "000003.png").size == (64, 64)
    # The files get the umask's mode (the subprocess inherits ours), not a temporary file's 0600.
    assert {(out / name).stat().st_mode & 0o777 for name in ("000003.png", "results.csv")} == {
        default_file_mode()
    }
    assert "index 4 job" in result.stderr and "failed" in result.stderr
    # Reported once by the CLI's summary; the in-process worker's own log line is not repeated.
    assert result.stderr.count(" failed: ") == 1 and "Traceback" not in result.stderr

    with (out / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["index"] for row in rows] == ["1", "2", "3", "4"]
    assert {row["note"] for row in rows} == {"json list", "comma list", "absolute path", "dead url"}
    assert all(row["status"] == "succeeded" and row["job_id"] and row["seed"] for row in rows[:3])
    assert rows[2]["output_image"] == "000003.png" and rows[2]["error"] == ""
    assert rows[3]["status"] == "failed" and rows[3]["output_image"] == "" and rows[3]["error"]

    # Rerun: the three finished rows are skipped, the failed one is retried as a new linked job.
    rerun = run_cli(args, embedded_env)
    assert rerun.code == 1 and "skipping 3 row(s)" in rerun.stderr
    with (out / "results.csv").open(newline="") as handle:
        rerun_rows = list(csv.DictReader(handle))
    assert rerun_rows[:3] == rows[:3]
    retry_job = next(job for job in listed_jobs(embedded_env) if job["id"] == rerun_rows[3]["job_id"])
    assert retry_job["retry_of"] == rows[3]["job_id"]
    jobs = {job["id"]: job for job in listed_jobs(embedded_env)}
    first_row_job = jobs[rows[2]["job_id"]]
    assert first_row_job["spec"]["instruction"] == "make it red"
    assert [Path(ref).name for ref in first_row_job["spec"]["images"]] == ["a.png", "b.png"]
    assert str(first_row_job["seed"]) == rows[2]["seed"]


def test_ctrl_c_leaves_jobs_and_a_rerun_collects_them(embedded_env: dict[str, str], tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n")
    out = tmp_path / "out"
    args = [
        "t2i",
        "--prompts_file",
        str(prompts),
        "--output_dir",
        str(out),
        "--num_inference_steps",
        "80",
        "--height",
        "256",
        "--width",
        "256",
    ]
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        process = subprocess.Popen(
            [str(DIFFGENTOR), *args],
            env=embedded_env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    deadline = time.monotonic() + 120
    while (
        " 1 running (" not in log.read_text() and time.monotonic() < deadline
    ):  # stderr is a file: plain lines
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    process.wait(60)
    stderr = log.read_text()
    assert process.returncode == 130, stderr
    assert "Reattach with: diffgentor wait " in stderr and "Traceback" not in stderr
    jobs = listed_jobs(embedded_env)
    assert len(jobs) == 3 and any(job["status"] in ("queued", "running") for job in jobs)

    hint = next(line for line in stderr.splitlines() if "Reattach with: diffgentor wait" in line)
    job_ids = hint.split("diffgentor wait ", 1)[1].split()
    # Embedded `wait` runs the left-over jobs itself (the running one once its 3 s lease expires).
    waited = run_cli(["wait", *job_ids, "--timeout", "180"], embedded_env)
    assert waited.code == 0, waited.stderr
    rerun = run_cli(args, embedded_env)  # reattaches to the three finished jobs and writes the PNGs
    assert rerun.code == 0 and "3 reattached" in rerun.stderr, rerun.stderr
    assert sorted(p.name for p in out.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    final = listed_jobs(embedded_env)
    assert len(final) == 3 and {job["status"] for job in final} == {"succeeded"}


def test_tiny_model_command_prints_the_variables(tmp_path: Path) -> None:
    result = run_cli(["tiny-model", str(tmp_path / "tiny")], base_env(tmp_path / "home"))
    assert result.code == 0, result.stderr
    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in result.stdout.splitlines()
        if line.startswith("export ")
    )
    assert exports["DG_DEEPGEN_CONFIG"] == "deepgen_tiny"
    assert Path(exports["DG_DEEPGEN_AR_MODEL_PATH"], "config.json").is_file()
    assert Path(exports["DG_DEEPGEN_CHECKPOINT"]).is_file()


def test_demo_builds_the_tiny_model_and_says_the_images_are_noise(tmp_path: Path) -> None:
    env = base_env(tmp_path / "home")
    result = run_cli(["demo", "--num_inference_steps", "2"], env)
    assert result.code == 0, result.stderr
    assert "images are noise" in result.stderr and "these images are noise" in result.stdout
    assert "export DG_DEEPGEN_CHECKPOINT=" in result.stdout  # how to use real weights
    assert (tmp_path / "home" / "tiny-model" / "checkpoint.safetensors").is_file()
    printed = [
        line.split(":", 1)[1].split("(")[0].strip()
        for line in result.stdout.splitlines()
        if line.startswith(("t2i image:", "edit image:"))
    ]
    assert len(printed) == 2 and all(Path(path).is_file() for path in printed)
    assert os.path.commonpath(printed).startswith(str(tmp_path / "home" / "demo"))
    # stderr is a pipe here: library bars are off and our progress is plain lines, not \r redraws.
    assert "Loading weights" not in result.stderr and "Writing model shards" not in result.stderr
    assert "\r" not in result.stderr
    assert "jobs: 1/1 finished, 0 running, 0 waiting" in result.stderr
