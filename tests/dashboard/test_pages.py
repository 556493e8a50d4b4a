"""The dashboard's pages through Starlette's TestClient: what each page shows, bad input (unknown ids,
bad query parameters, a pruned storage object), redaction, and the security model (token, login,
CSRF, read-only, Host check, binding rules). Jobs are real rows run by JobRunner on FakeEngine."""

from __future__ import annotations

import io
import re
import uuid
from dataclasses import replace
from typing import Any

import pytest
from PIL import Image

from api_client.dashboard.config import DashboardConfig, is_loopback
from api_client.dashboard.security import safe_next
from api_client.errors import ConfigurationError
from schemas.enums import JobStatus
from tests.dashboard.conftest import TOKEN, World

HTML = {"Accept": "text/html"}


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


# ------------------------------------------------------------------------------------------ pages


def test_batches_page_lists_the_batch_with_its_counts(client: Any, world: World) -> None:
    assert client.get("/").headers["location"] == "/batches"
    page = client.get("/batches")
    assert page.status_code == 200
    assert "pets" in page.text and "tester" in page.text
    row = page.text[page.text.index(f'data-batch-id="{world.batch_id}"') :]
    assert "2 queued · 3 succeeded · 1 failed" in row[:3000]
    assert '>4</span>/<span data-role="total">6</span> finished' in row[:3000]
    assert "Content-Security-Policy" in page.headers or "content-security-policy" in page.headers
    assert page.headers["x-frame-options"] == "DENY"


def test_gallery_shows_tiles_with_thumbnails_and_never_full_images(client: Any, world: World) -> None:
    page = client.get(f"/batches/{world.batch_id}")
    assert page.status_code == 200
    assert page.text.count('class="tile ') == 6
    thumbs = re.findall(r'src="(/thumb/[^"]+)"', page.text)
    assert len(thumbs) == 3  # the succeeded rows
    assert "/image/" not in page.text  # a grid never downloads full PNGs
    for thumb in thumbs:
        response = client.get(thumb.replace("&amp;", "&"))
        assert response.status_code == 200 and response.headers["content-type"] == "image/webp"
        assert len(response.content) <= 30_000
        with Image.open(io.BytesIO(response.content)) as image:
            assert max(image.size) <= 256 and image.width > 0
    for row in range(6):
        assert f'href="/jobs/{world.jobs[f"row{row}"]}"' in page.text


def test_gallery_filters_by_status_and_pages(client: Any, world: World) -> None:
    failed = client.get(f"/batches/{world.batch_id}?status=failed")
    assert failed.status_code == 200 and failed.text.count('class="tile ') == 1
    assert world.jobs["row3"] in failed.text and "ValueError" in failed.text
    second = client.get(f"/batches/{world.batch_id}?per_page=2&page=2")
    assert second.text.count('class="tile ') == 2
    assert "#2" in second.text and "#3" in second.text and "page 2 of 3" in second.text
    past = client.get(f"/batches/{world.batch_id}?per_page=2&page=9")
    assert past.status_code == 200 and "No jobs on page 9" in past.text


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("status=bogus", "status must be one of"),
        ("page=0", "page must be a whole number"),
        ("page=abc", "page must be a whole number"),
        ("per_page=100000", "per_page must be a whole number from 1 to 500"),
        ("page=-1", "page must be a whole number"),
    ],
)
def test_bad_query_parameters_get_a_400_page(client: Any, world: World, query: str, says: str) -> None:
    response = client.get(f"/batches/{world.batch_id}?{query}")
    assert response.status_code == 400
    assert says in response.text and "Traceback" not in response.text
    assert response.headers["content-type"].startswith("text/html")


def test_job_page_shows_parameters_image_timeline_and_provenance(client: Any, world: World) -> None:
    job_id = world.jobs["row0"]
    page = client.get(f"/jobs/{job_id}")
    assert page.status_code == 200
    text = page.text
    assert "a red fox, take 0" in text and 'data-param="num_inference_steps">3<' in text
    assert 'data-param="guidance_scale"' in text and 'data-field="seed">7<' in text
    assert f'src="/image/{job_id}/0?v=' in text
    for label in ("created", "published", "started", "finished", "attempts"):
        assert f"<th>{label}</th>" in text
    assert "fake" in text and "cpu" in text  # provenance
    assert "pets" in text and "row 0" in text
    image = client.get(re.search(r'src="(/image/[^"]+)"', text).group(1))  # type: ignore[union-attr]
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def test_job_page_of_an_edit_shows_its_input_beside_the_output(client: Any, world: World) -> None:
    job_id = world.jobs["edit"]
    page = client.get(f"/jobs/{job_id}")
    assert f'src="/input/{job_id}/0"' in page.text and f'src="/image/{job_id}/0' in page.text
    preview = client.get(f"/input/{job_id}/0")
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/webp"
    with Image.open(io.BytesIO(preview.content)) as image:
        assert image.size == (48, 40)
    assert client.get(f"/input/{job_id}/3").status_code == 404


def test_job_with_several_images_shows_each(client: Any, world: World) -> None:
    job_id = world.jobs["pair"]
    page = client.get(f"/jobs/{job_id}")
    assert f"/image/{job_id}/0?v=" in page.text and f"/image/{job_id}/1?v=" in page.text
    assert client.get(f"/thumb/{job_id}/1").status_code == 200
    assert client.get(f"/thumb/{job_id}/2").status_code == 404


def test_failed_job_page_shows_the_error_redacted(client: Any, world: World) -> None:
    page = client.get(f"/jobs/{world.jobs['row3']}")
    assert page.status_code == 200
    assert "ValueError" in page.text and "prompt too long" in page.text
    assert "hunter2" not in page.text and "SECRETSIG" not in page.text


def test_pages_never_carry_credentials(make_client: Any, world: World) -> None:
    settings = replace(world.settings, broker_url="redis://:brokerpass@127.0.0.1:9/0")
    dashboard = make_client(settings=settings)
    pages = [
        "/batches",
        f"/batches/{world.batch_id}",
        "/jobs",
        "/workers",
        *(f"/jobs/{job_id}" for job_id in world.jobs.values()),
    ]
    for path in pages:
        text = dashboard.get(path).text
        for secret in ("brokerpass", "hunter2", "SECRETSIG", "AKIAEXAMPLE"):
            assert secret not in text, (path, secret)
    signed = dashboard.get(f"/jobs/{world.jobs['signed']}").text
    assert "X-Amz-Signature=***" in signed


def test_jobs_and_workers_pages(client: Any, world: World) -> None:
    jobs = client.get("/jobs?status=succeeded")
    assert (
        jobs.status_code == 200
        and world.jobs["row0"][:8] in jobs.text
        and world.jobs["row4"][:8] not in jobs.text
    )
    workers = client.get("/workers")
    assert workers.status_code == 200
    assert "deepgen" in workers.text and "No registered workers" in workers.text


def test_live_update_endpoints(client: Any, world: World) -> None:
    batches = client.get(f"/api/batches?ids={world.batch_id},{uuid.uuid4()}").json()["batches"]
    assert list(batches) == [world.batch_id]
    assert batches[world.batch_id]["counts"] == {
        "queued": 2,
        "running": 0,
        "succeeded": 3,
        "failed": 1,
        "cancelled": 0,
    }
    jobs = client.get(f"/api/jobs?ids={world.jobs['row0']},{world.jobs['row4']}").json()["jobs"]
    assert jobs[world.jobs["row0"]]["thumb"].startswith(f"/thumb/{world.jobs['row0']}/0?v=")
    assert jobs[world.jobs["row4"]] | {"thumb": None} == jobs[world.jobs["row4"]]
    assert jobs[world.jobs["row4"]]["status"] == "queued" and jobs[world.jobs["row4"]]["live"] is True
    bad = client.get("/api/jobs?ids=nope")
    assert bad.status_code == 400 and bad.json()["error"] == "Bad query parameter"


# ------------------------------------------------------------------------------------- bad input


def test_unknown_ids_get_404_pages(client: Any, world: World) -> None:
    missing = str(uuid.uuid4())
    for path in (f"/jobs/{missing}", f"/batches/{missing}", "/jobs/not-a-job", "/batches/zz", "/nowhere"):
        response = client.get(path, headers=HTML)
        assert response.status_code == 404, path
        assert response.headers["content-type"].startswith("text/html") and "Traceback" not in response.text
    assert "no job with id" in client.get(f"/jobs/{missing}").text
    image = client.get(f"/image/{missing}/0")
    assert image.status_code == 404 and image.headers["content-type"] == "image/svg+xml"
    assert client.get(f"/image/{world.jobs['row4']}/0").status_code == 404  # queued: no image yet
    assert client.post("/batches").status_code == 405


def test_id_prefixes_redirect_to_the_full_id(client: Any, world: World) -> None:
    job = client.get(f"/jobs/{world.jobs['row0'][:8]}")
    assert job.status_code == 303 and job.headers["location"] == f"/jobs/{world.jobs['row0']}"
    batch = client.get(f"/batches/{world.batch_id[:8]}?status=failed")
    assert batch.headers["location"] == f"/batches/{world.batch_id}?status=failed"
    upper = client.get(f"/jobs/{world.jobs['row0'].upper()}")
    assert upper.status_code == 303 and upper.headers["location"] == f"/jobs/{world.jobs['row0']}"


def test_a_pruned_image_gets_a_clear_404_and_the_server_keeps_serving(make_client: Any, world: World) -> None:
    dashboard = make_client()  # a fresh thumbnail cache
    job_id = world.jobs["doomed"]
    job = world.store.get(job_id)
    world.artifacts.delete(job.artifacts[0].uri)
    for artifact in job.artifacts:
        if getattr(artifact, "thumbnail_uri", None):
            world.artifacts.delete(artifact.thumbnail_uri)
    thumb = dashboard.get(f"/thumb/{job_id}/0")
    assert thumb.status_code == 404 and thumb.headers["content-type"] == "image/svg+xml"
    assert b"image missing" in thumb.content
    image = dashboard.get(f"/image/{job_id}/0", headers=HTML)
    assert image.status_code == 404 and "gone from storage" in image.text and "Traceback" not in image.text
    assert dashboard.get(f"/jobs/{job_id}").status_code == 200  # the page itself still shows the job
    assert dashboard.get("/batches").status_code == 200


def test_an_internal_error_is_a_500_page_and_the_next_request_works(
    make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    dashboard = make_client()
    services = dashboard.app.state.services

    def broken(**_: Any) -> Any:
        raise RuntimeError("a bug with a secret https://u:topsecret@host/")

    monkeypatch.setattr(services.registry, "list", broken)
    response = dashboard.get("/workers")
    assert response.status_code == 500 and "Internal error" in response.text
    assert "Traceback" not in response.text and "topsecret" not in response.text
    assert dashboard.get("/batches").status_code == 200


def test_database_trouble_is_a_503_page(make_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlalchemy as sa

    dashboard = make_client()
    services = dashboard.app.state.services

    def down(*_: Any, **__: Any) -> Any:
        raise sa.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(services.batches, "list", down)
    response = dashboard.get("/batches")
    assert response.status_code == 503 and "Job database unavailable" in response.text


# -------------------------------------------------------------------------------------- security


def test_read_only_dashboard_offers_no_actions_and_refuses_them(client: Any, world: World) -> None:
    page = client.get(f"/jobs/{world.jobs['row4']}")
    assert "Cancel job" not in page.text and "read-only" in page.text
    refused = client.post(f"/jobs/{world.jobs['row4']}/cancel", data={"csrf": "x"})
    assert refused.status_code == 403 and "Read-only" in refused.text
    assert world.store.get(world.jobs["row4"]).status == JobStatus.QUEUED


def test_without_a_token_only_loopback_hosts_are_answered(client: Any) -> None:
    assert client.get("/batches", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/batches", headers={"Host": "localhost:8765"}).status_code == 200
    assert client.get("/batches", headers={"Host": "[::1]:8765"}).status_code == 200


def test_token_protects_every_page(make_client: Any, world: World) -> None:
    dashboard = make_client(token=TOKEN, base_url="http://dash.example")
    page = dashboard.get("/batches?page=1", headers=HTML)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=%2Fbatches%3Fpage%3D1"
    assert dashboard.get(f"/api/batches?ids={world.batch_id}").status_code == 401
    assert dashboard.get(f"/thumb/{world.jobs['row0']}/0").status_code == 401
    assert dashboard.get("/static/dashboard.js").status_code == 200
    assert dashboard.get("/login").status_code == 200
    bearer = dashboard.get("/batches", headers={"Authorization": f"Bearer {TOKEN}"})
    assert bearer.status_code == 200
    wrong = dashboard.post("/login", data={"token": "not-the-token-at-all", "next": "/jobs"})
    assert wrong.status_code == 401 and "Wrong token" in wrong.text
    assert dashboard.get("/batches", headers=HTML).status_code == 303  # no cookie was set


def test_login_then_cancel_with_csrf(make_client: Any, world: World) -> None:
    dashboard = make_client(token=TOKEN, allow_actions=True)
    job_id = world.jobs["row5"]
    login = dashboard.post("/login", data={"token": TOKEN, "next": f"/jobs/{job_id}"})
    assert login.status_code == 303 and login.headers["location"] == f"/jobs/{job_id}"
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    page = dashboard.get(f"/jobs/{job_id}")
    assert page.status_code == 200 and "Cancel job" in page.text
    token = csrf_of(page.text)
    no_csrf = dashboard.post(f"/jobs/{job_id}/cancel", data={})
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.text
    cross_site = dashboard.post(
        f"/jobs/{job_id}/cancel", data={"csrf": token}, headers={"Origin": "https://evil.example"}
    )
    assert cross_site.status_code == 403
    assert world.store.get(job_id).status == JobStatus.QUEUED
    done = dashboard.post(
        f"/jobs/{job_id}/cancel", data={"csrf": token}, headers={"Origin": "http://127.0.0.1:8765"}
    )
    assert done.status_code == 303 and done.headers["location"] == f"/jobs/{job_id}?notice=cancelled"
    assert world.store.get(job_id).status == JobStatus.CANCELLED
    assert "Job cancelled." in dashboard.get(done.headers["location"]).text
    finished = dashboard.post(f"/jobs/{world.jobs['row0']}/cancel", data={"csrf": token})
    assert finished.status_code == 409


def test_bearer_actions_retry_a_failed_job_and_cancel_a_batch(make_client: Any, world: World) -> None:
    dashboard = make_client(token=TOKEN, allow_actions=True)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    old = world.jobs["row3"]
    retried = dashboard.post(f"/jobs/{old}/retry", headers=bearer)
    assert retried.status_code == 303
    new_id = retried.headers["location"].split("/jobs/")[1].split("?")[0]
    new = world.store.get(new_id)
    assert new.retry_of == old and new.status == JobStatus.QUEUED and new.batch_index == 3
    assert "notice=retry-unpublished" in retried.headers["location"]  # embedded: no worker to send it to
    again = dashboard.post(f"/jobs/{old}/retry", headers=bearer)
    assert again.headers["location"].startswith(f"/jobs/{new_id}?notice=retry-existing")
    cancelled = dashboard.post(f"/batches/{world.batch_id}/cancel", headers=bearer)
    assert cancelled.status_code == 303 and "notice=batch-cancelled" in cancelled.headers["location"]
    assert world.store.get(new_id).status == JobStatus.CANCELLED
    assert dashboard.post(f"/batches/{uuid.uuid4()}/cancel", headers=bearer).status_code == 404
    assert dashboard.post(f"/jobs/{old}/explode", headers=bearer).status_code == 404
    anonymous = dashboard.post(f"/batches/{world.batch_id}/retry")
    assert anonymous.status_code == 401


class RecordingPublisher:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[str] = []

    def publish(self, targets: Any) -> None:
        if self.fail:
            raise ConnectionError("redis is down")
        self.sent.extend(target.job_id for target in targets)


def test_queue_mode_retries_are_published(make_client: Any, world: World) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    publisher = RecordingPublisher()
    dashboard = make_client(token=TOKEN, allow_actions=True, publisher=publisher)
    retried = dashboard.post(f"/jobs/{world.jobs['again0']}/retry", headers=bearer)
    assert retried.status_code == 303 and retried.headers["location"].endswith("?notice=retried")
    new_id = retried.headers["location"].split("/jobs/")[1].split("?")[0]
    assert publisher.sent == [new_id] and world.store.get(new_id).published_at is not None

    down = RecordingPublisher(fail=True)
    dashboard = make_client(token=TOKEN, allow_actions=True, publisher=down)
    batch = dashboard.post(f"/batches/{world.again_id}/retry", headers=bearer)
    assert batch.headers["location"] == f"/batches/{world.again_id}?notice=batch-retry-unsent"
    latest = [
        job for job in world.store.list(limit=100) if job.batch_id == world.again_id and not job.superseded
    ]
    rows = {job.batch_index: job for job in latest}
    assert rows[1].status == JobStatus.QUEUED and rows[1].published_at is None  # the sweeper sends it
    nothing = make_client(token=TOKEN, allow_actions=True, publisher=publisher)
    again = nothing.post(f"/batches/{world.again_id}/retry", headers=bearer)
    assert again.headers["location"].endswith("notice=batch-nothing")


def test_binding_and_token_rules() -> None:
    assert DashboardConfig().check().host == "127.0.0.1"
    with pytest.raises(ConfigurationError, match="not a loopback address"):
        DashboardConfig(host="0.0.0.0").check()
    with pytest.raises(ConfigurationError, match="--allow-actions needs a token"):
        DashboardConfig(allow_actions=True).check()
    with pytest.raises(ConfigurationError, match="at least 16"):
        DashboardConfig(token="short").check()
    assert DashboardConfig(host="0.0.0.0", token=TOKEN, allow_actions=True).check().allow_actions
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "[::1]", "localhost", "127.8.0.1")] == [True] * 5
    assert [is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com", "")] == [False] * 5
    assert [
        safe_next(t) for t in ("/jobs?x=1", "//evil.example", "https://evil.example", "/\\evil", None)
    ] == [
        "/jobs?x=1",
        "/",
        "/",
        "/",
        "/",
    ]
