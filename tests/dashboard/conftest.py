"""Fixtures for the dashboard tests: a job world on the embedded default (SQLite and a file store)
with jobs run by `JobRunner` on `tests.support.FakeEngine`, dashboards over it, and a real
browser (Debian's chromium driven by playwright) for the browser tests.

The browser: `/usr/bin/chromium` is installed with apt-get when it is missing (as root, once per
session); playwright comes from the `dev` extra. The tests are skipped, with the reason, only when
neither can be had (no apt, no network, not root, playwright not installed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from tests.support import T2I, FakeEngine, write_png

CHROMIUM = Path("/usr/bin/chromium")
APT_TIMEOUT_SECONDS = 600


@dataclass
class World:
    """Jobs made for the page tests, by name, plus the stores they live in."""

    settings: Any
    store: Any
    artifacts: Any
    runner: Any
    batch_id: str  # "pets"
    again_id: str  # "again": two failed rows, for the queue-mode retries
    jobs: dict[str, str]  # name -> job id
    input_path: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """A batch "pets" of 6 rows: rows 0-2 succeeded, row 3 failed (with a secret URL in its error),
    rows 4-5 queued; an edit job of a local image; a job of 2 images; an edit whose input is a presigned
    URL (never run); a job whose image a test deletes. Tests that change jobs come last in their module."""
    from worker.batches import NewBatch
    from worker.jobstore import open_job_store
    from worker.runner import JobRunner
    from worker.settings import load_settings
    from worker.storage import open_store

    home = tmp_path_factory.mktemp("dashboard_home")
    settings = replace(
        load_settings({"DG_HOME": str(home)}),
        progress_interval_seconds=0.0,
        heartbeat_seconds=0.2,
        lease_seconds=30,
        allow_local_inputs=True,
    )
    store = open_job_store(settings)
    artifacts = open_store(settings.storage_url)
    engine = FakeEngine()
    runner = JobRunner(settings, lambda: engine, store=store, artifact_store=artifacts)
    specs = [{**T2I, "prompt": f"a red fox, take {row}"} for row in range(6)]
    pets = store.submit(specs, batch=NewBatch("pets", owner="tester"))
    for submitted in pets[:3]:
        runner.run(submitted.job.id, "test-worker")
    engine.error = ValueError(
        "prompt too long for https://admin:hunter2@models.example/x?X-Amz-Signature=SECRETSIG"
    )
    runner.run(pets[3].job.id, "test-worker")
    engine.error = None
    source = write_png(home / "inputs" / "cat.png", (48, 40), (10, 200, 30))
    edit = store.submit(
        [
            {
                "kind": "edit",
                "instruction": "make it blue",
                "images": [str(source)],
                "params": {"num_inference_steps": 2},
            }
        ]
    )[0].job.id
    runner.run(edit, "test-worker")
    pair = store.submit(
        [{**T2I, "prompt": "two foxes", "params": {**T2I["params"], "num_images_per_prompt": 2}}]
    )
    runner.run(pair[0].job.id, "test-worker")
    doomed = store.submit([{**T2I, "prompt": "pruned later"}])[0].job.id
    runner.run(doomed, "test-worker")
    again = store.submit(
        [{**T2I, "prompt": f"fails, take {row}"} for row in range(2)], batch=NewBatch("again")
    )
    engine.error = RuntimeError("out of luck")
    for submitted in again:
        runner.run(submitted.job.id, "test-worker")
    engine.error = None
    signed = store.submit(
        [
            {
                "kind": "edit",
                "instruction": "never runs",
                "images": [
                    "https://bucket.example/in.png?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=SECRETSIG"
                ],
                "params": {"num_inference_steps": 2},
            }
        ]
    )[0].job.id
    return World(
        settings=settings,
        store=store,
        artifacts=artifacts,
        runner=runner,
        batch_id=str(pets[0].job.batch_id),
        again_id=str(again[0].job.batch_id),
        jobs={
            **{f"row{row}": submitted.job.id for row, submitted in enumerate(pets)},
            "edit": edit,
            "pair": pair[0].job.id,
            "signed": signed,
            "doomed": doomed,
            "again0": again[0].job.id,
        },
        input_path=source,
    )


TOKEN = "test-token-0123456789abcdef"
LOCAL = "http://127.0.0.1:8765"


@pytest.fixture(scope="module")
def make_client(world: World) -> Callable[..., Any]:
    """A Starlette TestClient on a dashboard over `world`: ``make_client(token=..., allow_actions=...)``;
    ``publisher=`` plays queue mode (a `worker.publish.Publisher` that retries are sent through)."""
    from starlette.testclient import TestClient

    from api_client.dashboard.app import Services, create_app
    from api_client.dashboard.config import DashboardConfig

    def build(*, settings: Any = None, base_url: str = LOCAL, publisher: Any = None, **options: Any) -> Any:
        config = DashboardConfig(**options).check()
        factory = None if publisher is None else (lambda: publisher)  # queue mode: retries are published
        services = Services(
            settings or world.settings, world.store, world.artifacts, publisher_factory=factory
        )
        return TestClient(
            create_app(config, services),
            base_url=base_url,
            raise_server_exceptions=False,
            follow_redirects=False,
        )

    return build


@pytest.fixture(scope="module")
def client(make_client: Callable[..., Any]) -> Any:
    """The read-only dashboard without a token (loopback)."""
    return make_client()


# ------------------------------------------------------------------------------------- browser


def _install_chromium() -> str | None:
    """Install Debian's chromium when it is missing; None when it is there, else why it cannot be."""
    if CHROMIUM.exists():
        return None
    apt = shutil.which("apt-get")
    if apt is None:
        return "/usr/bin/chromium is missing and there is no apt-get to install it"
    if os.geteuid() != 0:
        return "/usr/bin/chromium is missing and installing it needs root (apt-get install -y chromium)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = [apt, "-o", "DPkg::Lock::Timeout=300", "install", "-y", "-q", "chromium"]
    for attempt in range(2):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_SECONDS)
        if done.returncode == 0 and CHROMIUM.exists():
            return None
        if attempt == 0:  # the package lists may be empty or stale: update once, then try again
            subprocess.run(
                [apt, "-o", "DPkg::Lock::Timeout=300", "update", "-q"],
                env=env,
                capture_output=True,
                timeout=APT_TIMEOUT_SECONDS,
            )
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return f"apt-get install -y chromium failed (exit {done.returncode}): {tail[0]}"


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """A headless chromium (Debian's) driven by playwright, for the session."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -e '.[dev]' (the dev extra has it)")
    problem = _install_chromium()
    if problem is not None:
        pytest.skip(f"no browser for the dashboard tests: {problem}")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield launched
        finally:
            launched.close()
