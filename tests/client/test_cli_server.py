"""The same CLI and client on Redis + PostgreSQL + a moto S3 server + a real `diffgentor worker`
subprocess running the tiny DeepGen (nothing changed but the environment)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from api_client import DiffgentorClient
from api_client.errors import JobStateError
from tests.support import DIFFGENTOR, REPO_ROOT, base_env, run_cli, write_png
from worker.testing import WorkerProcess

pytestmark = pytest.mark.integration
FAST = ["--num_inference_steps", "2", "--height", "64", "--width", "64"]


@pytest.fixture
def server_env(
    tmp_path: Path,
    pg_url: str,
    redis_url: str,
    s3_endpoint: str,
    s3_bucket: str,
    tiny_environ: dict[str, str],
) -> dict[str, str]:
    env = base_env(tmp_path / "home")
    env.update(tiny_environ)
    env.update(
        DG_BROKER_URL=redis_url,
        DG_DATABASE_URL=pg_url,
        DG_STORAGE_URL=f"s3://{s3_bucket}/runs",
        DG_S3_ENDPOINT_URL=s3_endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        DG_LEASE_SECONDS="5",
        DG_HEARTBEAT_SECONDS="1",
        DG_PROGRESS_INTERVAL_SECONDS="0",
    )
    return env


@pytest.fixture
def model_name() -> str:
    return f"deepgen-{uuid.uuid4().hex[:8]}"  # its own queue: other sessions' jobs never mix in


@pytest.fixture
def worker_factory(server_env: dict[str, str], model_name: str, tmp_path: Path) -> Iterator:
    started: list[WorkerProcess] = []

    def start() -> WorkerProcess:
        # The user's command, not the Celery CLI: what `diffgentor worker` adds is under test too.
        worker = WorkerProcess(
            [str(DIFFGENTOR), "worker", "--model_name", model_name, "--loglevel", "INFO"],
            server_env,
            tmp_path / f"worker-{len(started)}.log",
            cwd=REPO_ROOT,
            append_log=False,
        )
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    from worker.db import alembic_config

    return str(ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head())


def test_server_mode_end_to_end(
    server_env: dict[str, str], model_name: str, worker_factory, tmp_path: Path
) -> None:
    upgraded = run_cli(["db", "upgrade"], server_env)
    assert upgraded.code == 0, upgraded.stderr
    assert f"is at revision {head_revision()}" in upgraded.stdout

    client = DiffgentorClient.from_env(server_env)
    params = {"num_inference_steps": 2, "height": 64, "width": 64}

    # No worker yet: jobs wait in Redis, so cancel and retry are deterministic.
    queued = client.submit_t2i("a lighthouse", model_name=model_name, **params)
    assert client.get(queued).status.value == "queued" and client.get(queued).published_at is not None
    cancelled = client.cancel(queued)
    assert cancelled.status.value == "cancelled"
    retried = client.retry(cancelled)
    assert retried.retry_of == queued.id and retried.status.value == "queued" and retried.id != queued.id
    assert retried.seed == queued.seed  # same request, same seed
    with pytest.raises(JobStateError, match="only failed or cancelled jobs can be retried"):
        client.retry(retried)

    # Idempotency: the same key twice is one job, also inside one batch.
    first = client.submit_t2i("a boat", model_name=model_name, idempotency_key=f"key-{model_name}", **params)
    again = client.submit_many(
        [
            client.t2i_spec("a boat", model_name=model_name, idempotency_key=f"key-{model_name}", **params),
            client.t2i_spec("a car", model_name=model_name, **params),
        ]
    )
    assert again[0].job.id == first.id and not again[0].created and again[1].created

    worker = worker_factory()
    worker.wait_ready(timeout=90)
    done = client.wait([retried, first, again[1].job], timeout=120)
    assert [job.status.value for job in done] == ["succeeded"] * 3, [job.error_message for job in done]
    uri = client.artifact_uris(done[0])[0]
    assert uri == f"{server_env['DG_STORAGE_URL']}/jobs/{retried.id}/1/0.png"
    assert client.presigned_urls(done[0])[0].startswith(server_env["DG_S3_ENDPOINT_URL"])
    assert [image.size for image in client.open_images(done[0])] == [(64, 64)]
    assert client.download(done[0], tmp_path / "dl")[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Edit from the Python client: PIL image, bytes and a local path are uploaded content-addressed.
    local = write_png(tmp_path / "in.png", (64, 64), (10, 200, 10))
    pil = Image.new("RGB", (64, 64), (5, 5, 250))
    edit = client.submit_edit(
        "make it red", [local, local.read_bytes(), pil], model_name=model_name, **params
    )
    refs = edit.spec["images"]
    assert refs[0] == refs[1] and refs[0].startswith(f"{server_env['DG_STORAGE_URL']}/inputs/")
    assert refs[2] != refs[0]
    assert client.wait(edit, timeout=120, progress=True).status.value == "succeeded"

    # The CLI, unchanged, on the same services.
    out = tmp_path / "out"
    t2i = run_cli(
        ["t2i", "--model_name", model_name, "--prompt", "a red fox", "--output_dir", str(out), *FAST],
        server_env,
    )
    assert t2i.code == 0, t2i.stderr
    assert Image.open(out / "000000.png").size == (64, 64)

    data = tmp_path / "data"
    write_png(data / "a.png")
    (data / "edits.csv").write_text("input_images,instruction\na.png,make it blue\n")
    edited = run_cli(
        [
            "edit",
            "--model_name",
            model_name,
            "--input",
            str(data / "edits.csv"),
            "--output_dir",
            str(tmp_path / "edit-out"),
            *FAST,
        ],
        server_env,
    )
    assert edited.code == 0, edited.stderr
    assert (tmp_path / "edit-out" / "000000.png").is_file()
    results = (tmp_path / "edit-out" / "results.csv").read_text()
    assert "succeeded" in results

    listed = run_cli(["list", "--model_name", model_name, "--status", "succeeded", "--json"], server_env)
    jobs = [json.loads(line) for line in listed.stdout.splitlines()]
    assert len(jobs) == 6 and all(job["model_name"] == model_name for job in jobs)
    cli_edit_job = next(
        job for job in jobs if job["kind"] == "edit" and job["spec"]["instruction"] == "make it blue"
    )
    assert cli_edit_job["spec"]["images"][0].startswith(f"{server_env['DG_STORAGE_URL']}/inputs/")

    fetched = run_cli(["fetch", cli_edit_job["id"], "-o", str(tmp_path / "fetched")], server_env)
    assert fetched.code == 0 and Path(fetched.stdout.strip()).is_file()
    urls = run_cli(["fetch", cli_edit_job["id"], "--urls"], server_env)
    assert urls.stdout.startswith(server_env["DG_S3_ENDPOINT_URL"]) and "X-Amz-Signature" in urls.stdout

    status = run_cli(["status", cli_edit_job["id"]], server_env)
    assert status.code == 0 and "succeeded" in status.stdout

    # Ctrl-C while waiting: jobs stay with the worker; `diffgentor wait` reattaches.
    slow = [
        "t2i",
        "--model_name",
        model_name,
        "--prompt",
        "a slow one",
        "--output_dir",
        str(tmp_path / "slow"),
        "--num_inference_steps",
        "150",
        "--height",
        "256",
        "--width",
        "256",
    ]
    log = tmp_path / "slow.txt"
    with log.open("w") as err:
        process = subprocess.Popen(
            [str(DIFFGENTOR), *slow],
            env=server_env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    deadline = time.monotonic() + 60
    while "submitted" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    process.wait(30)
    assert process.returncode == 130, log.read_text()
    hint = next(line for line in log.read_text().splitlines() if "Reattach with: diffgentor wait" in line)
    job_ids = hint.split("diffgentor wait ", 1)[1].split()
    waited = run_cli(["wait", *job_ids, "--timeout", "120", "-o", str(tmp_path / "slow-wait")], server_env)
    assert waited.code == 0, waited.stderr
    assert len(list((tmp_path / "slow-wait").glob("*.png"))) == 1
    collected = run_cli(slow, server_env)  # rerun: reattaches to the finished job and writes the PNG
    assert collected.code == 0 and "1 reattached" in collected.stderr
    assert (tmp_path / "slow" / "000000.png").is_file()

    swept = run_cli(["sweep"], server_env)
    assert swept.code == 0 and "re-published 0 job(s)" in swept.stdout, swept.stderr
    client.close()
