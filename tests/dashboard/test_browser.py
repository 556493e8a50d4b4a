"""The dashboard in a real browser (Debian's chromium, driven by playwright) over real jobs of the tiny
model, run by the embedded client in this process: counts, thumbnails that render, live progress
without a reload, click-through to a job, and cancel with and without the token.

Set DG_DASHBOARD_SCREENSHOT=docs/dashboard.png to write the gallery screenshot the docs show.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from schemas.enums import JobStatus
from tests.dashboard.conftest import TOKEN
from tests.support import write_png

pytestmark = pytest.mark.integration

FAST = {"num_inference_steps": 2, "height": 64, "width": 64}
SLOW = {"num_inference_steps": 200, "height": 512, "width": 512}  # 20-30 s on 2 cores, cancelled at the end


@dataclass
class Live:
    client: Any  # DiffgentorClient, embedded, with the tiny model
    url: str
    pets: str  # batch of 8 rows: 7 succeeded (row 2 with 2 images, row 6 an edit), row 7 failed
    pair: str  # row 2
    edit: str  # row 6
    slow: str | None = None  # batch whose one job runs for minutes
    slow_job: str | None = None  # that job (cancelled at the end)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model: Any) -> Iterator[Live]:
    from api_client import DiffgentorClient
    from api_client.dashboard.app import Services, create_app
    from api_client.dashboard.command import BackgroundServer
    from api_client.dashboard.config import DashboardConfig
    from worker.deepgen.tiny import tiny_env

    with pytest.MonkeyPatch.context() as patch:
        for key in list(os.environ):
            if key.startswith("DG_") and key != "DG_DASHBOARD_SCREENSHOT":
                patch.delenv(key)
        for key, value in tiny_env(tiny_model).items():
            patch.setenv(key, value)
        patch.setenv("DG_LEASE_SECONDS", "3")
        patch.setenv("DG_HEARTBEAT_SECONDS", "0.5")
        patch.setenv("DG_PROGRESS_INTERVAL_SECONDS", "0")
        home = tmp_path_factory.mktemp("dashboard_browser")
        with DiffgentorClient(home=home, poll_seconds=0.1) as client:
            photo = write_png(home / "photo.png", (64, 64), (30, 120, 200))
            truncated = home / "truncated.png"  # a valid header, half the data: fails in the worker
            truncated.write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])
            specs = [client.t2i_spec(f"a tabby cat, study {i}", seed=i, **FAST) for i in range(5)]
            specs.insert(2, client.t2i_spec("two beagles in a meadow", num_images_per_prompt=2, **FAST))
            specs.append(client.edit_spec("make the sky orange", [photo], **FAST))
            specs.append(client.edit_spec("make it night", [truncated], **FAST))
            pets = client.submit_many(specs, batch_name="pets")
            client.wait([handle.id for handle in pets], timeout=180)
            config = DashboardConfig(token=TOKEN, allow_actions=True, poll_seconds=0.3)
            app = create_app(config, Services.from_client(client))
            with BackgroundServer(app) as server:
                state = Live(client, server.url, str(pets[0].job.batch_id), pets[2].id, pets[6].id)
                try:
                    yield state
                finally:
                    if state.slow_job is not None and not client.get(state.slow_job).is_terminal:
                        client.cancel(state.slow_job)


@pytest.fixture(scope="module")
def page(browser: Any, live: Live) -> Iterator[Any]:
    """A logged-in tab: the token typed into the login form, as a person would."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(20_000)
    tab.goto(f"{live.url}/batches")
    assert "/login" in tab.url
    tab.fill("input[name=token]", TOKEN)
    tab.click("button[type=submit]")
    tab.wait_for_url(f"{live.url}/batches")
    yield tab
    context.close()


def counts_on_page(tab: Any, batch_id: str) -> dict[str, int]:
    text = tab.inner_text(f"tr[data-batch-id='{batch_id}'] [data-role=counts]")
    return {status: int(n) for n, status in re.findall(r"(\d+) (\w+)", text)}


def test_batches_page_shows_the_right_counts(page: Any, live: Live) -> None:
    from worker.batches import BatchStore

    page.goto(f"{live.url}/batches")
    batches = BatchStore(live.client.store)
    shown = page.eval_on_selector_all("tr[data-batch-id]", "rows => rows.map(r => r.dataset.batchId)")
    assert live.pets in shown
    for batch_id in shown:
        expected = {status: n for status, n in batches.counts(batch_id).as_dict().items() if n}
        assert counts_on_page(page, batch_id) == expected
    assert counts_on_page(page, live.pets) == {"succeeded": 7, "failed": 1}
    row = page.locator(f"tr[data-batch-id='{live.pets}']")
    assert row.locator("[data-role=finished]").inner_text() == "8"
    assert row.locator("svg.bar rect.seg.failed").count() == 1


def test_gallery_thumbnails_render(page: Any, live: Live) -> None:
    page.goto(f"{live.url}/batches/{live.pets}")
    assert page.locator("li.tile").count() == 8
    # Lazy images load after the page's load event: wait until each one finished (or failed).
    page.wait_for_function("() => [...document.querySelectorAll('li.tile img')].every(i => i.complete)")
    widths = page.eval_on_selector_all(
        "li.tile img", "images => images.map(i => [i.complete, i.naturalWidth, i.getAttribute('src')])"
    )
    assert len(widths) == 7  # the failed row has no image
    for complete, natural_width, src in widths:
        assert complete and natural_width > 0 and src.startswith("/thumb/"), (complete, natural_width, src)
    if os.environ.get("DG_DASHBOARD_SCREENSHOT"):
        page.screenshot(path=str(Path(os.environ["DG_DASHBOARD_SCREENSHOT"])), full_page=True)


def test_click_through_to_a_job_shows_its_parameters_and_image(page: Any, live: Live) -> None:
    page.goto(f"{live.url}/batches/{live.pets}")
    page.click(f"li[data-job-id='{live.pair}'] a")
    page.wait_for_url(f"{live.url}/jobs/{live.pair}")
    page.wait_for_function("() => [...document.querySelectorAll('img.full')].every(i => i.complete)")
    assert page.inner_text("[data-param=num_inference_steps]") == "2"
    assert page.inner_text("[data-param=num_images_per_prompt]") == "2"
    assert "two beagles in a meadow" in page.inner_text(".prompt-text")
    sizes = page.eval_on_selector_all("img.full", "images => images.map(i => i.naturalWidth)")
    assert sizes == [64, 64]


def test_an_edit_shows_its_input_beside_the_output(page: Any, live: Live) -> None:
    page.goto(f"{live.url}/jobs/{live.edit}")
    page.wait_for_function("() => [...document.querySelectorAll('img.full')].every(i => i.complete)")
    assert page.locator(".inputs img.full").evaluate("i => i.naturalWidth") == 64
    assert page.locator(".outputs img.full").evaluate("i => i.naturalWidth") == 64
    assert "make the sky orange" in page.inner_text(".prompt-text")


def test_a_running_jobs_progress_advances_without_a_reload(page: Any, live: Live) -> None:
    client = live.client
    [slow] = client.submit_many([client.t2i_spec("a long one", **SLOW)], batch_name="slow")
    live.slow, live.slow_job = str(slow.job.batch_id), slow.id
    deadline = time.monotonic() + 60
    while client.get(slow.id).progress_step < 2:
        assert time.monotonic() < deadline, "the slow job never started"
        time.sleep(0.05)
    page.goto(f"{live.url}/batches/{live.slow}")
    page.evaluate("window.__notReloaded = true")
    steps = page.locator(f"li[data-job-id='{slow.id}'] [data-role=steps]")
    first = int(steps.inner_text().split("/")[0])
    page.wait_for_function(
        "([id, first]) => { const e = document.querySelector(`li[data-job-id='${id}'] [data-role=steps]`);"
        " return parseInt(e.textContent) > first + 10; }",
        arg=[slow.id, first],
    )
    assert page.evaluate("window.__notReloaded") is True
    assert page.locator(f"li[data-job-id='{slow.id}'] [data-role=badge]").inner_text() == "running"
    bar = page.locator(f"li[data-job-id='{slow.id}'] progress")
    assert bar.evaluate("e => e.max") == SLOW["num_inference_steps"] and bar.evaluate("e => e.value") > first


def test_cancel_a_queued_job_with_the_token(page: Any, live: Live) -> None:
    client = live.client
    queued = client.submit_t2i("waits behind the long one", **FAST)  # the embedded runner is busy
    assert client.get(queued.id).status == JobStatus.QUEUED
    page.goto(f"{live.url}/jobs/{queued.id}")
    page.click("button[data-action=cancel]")
    page.wait_for_url(re.compile(r".*notice=cancelled$"))
    assert "Job cancelled." in page.inner_text(".notice")
    assert client.get(queued.id).status == JobStatus.CANCELLED


def test_cancel_without_the_token_is_refused(browser: Any, page: Any, live: Live) -> None:
    client = live.client
    queued = client.submit_t2i("also waits", **FAST)
    stranger = browser.new_context()
    try:
        response = stranger.request.post(f"{live.url}/jobs/{queued.id}/cancel", form={"csrf": "guess"})
        assert response.status == 401
        shown = stranger.new_page()
        shown.goto(f"{live.url}/jobs/{queued.id}")
        assert "/login" in shown.url  # not even the page without the token
    finally:
        stranger.close()
    # Logged in, but a request forged without the page's CSRF token: refused too.
    forged = page.evaluate(
        "async (id) => (await fetch(`/jobs/${id}/cancel`, {method: 'POST', body: new URLSearchParams({csrf: 'x'})})).status",
        queued.id,
    )
    assert forged == 403
    assert client.get(queued.id).status == JobStatus.QUEUED
    client.cancel(queued.id)
