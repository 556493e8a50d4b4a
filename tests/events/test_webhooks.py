"""Webhooks (worker/webhooks.py, migration 0005): the outbox row commits with the job's end and never
without it; delivery to a loopback HTTP server, signed (checked with the snippet of docs/events.md),
retried after a 500, sent again with the same event id after a deliverer died, dead after its last
attempt; private, loopback and non-http URLs refused at submit."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from api_client import DiffgentorClient
from api_client.cli import main
from api_client.errors import ConfigurationError
from schemas.enums import JobStatus
from tests.support import T2I, complete_job, fail_job
from worker.jobstore import JobStore
from worker.settings import Settings
from worker.storage import open_store
from worker.webhooks import (
    DEAD,
    DELIVERED,
    EVENT_ID_HEADER,
    PENDING,
    DeliveryError,
    WebhookDeliverer,
    post_json,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRET = "test-secret-0123456789abcdef"


@dataclass
class Receiver:
    """A loopback HTTP server: answers each POST with the next scripted status (then 200)."""

    url: str
    statuses: list[int] = field(default_factory=list)
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            state.requests.append(({key: value for key, value in self.headers.items()}, body))
            status = state.statuses.pop(0) if state.statuses else 200
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _hooked(url: str, events: list[str] | None = None) -> dict[str, Any]:
    return {**T2I, "webhook_url": url, "webhook_events": events}


def _deliverer(settings: Settings, store: JobStore, **changes: Any) -> WebhookDeliverer:
    hooked = replace(
        settings,
        webhook_secret=SECRET,
        webhook_allow_private_networks=True,  # the test receiver is on loopback
        webhook_retry_seconds=0.01,
        **changes,
    )
    return WebhookDeliverer(hooked, store)


def _documented_verify() -> Any:
    """The `verify` function of docs/events.md, run as a receiver would copy it."""
    text = (REPO_ROOT / "docs" / "events.md").read_text()
    [code] = re.findall(r"```python\n(# verify_webhook\.py.*?)```", text, re.S)
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/events.md", "exec"), namespace)
    return namespace["verify"]


def _rows(deliverer: WebhookDeliverer, job_id: str) -> list[dict[str, Any]]:
    return deliverer.rows_for_job(job_id)


def test_the_outbox_row_commits_with_the_jobs_end_and_not_without_it(
    settings: Settings, store: JobStore
) -> None:
    deliverer = _deliverer(settings, store)
    artifacts = open_store(settings.storage_url)
    ok, failed, only_failed, plain, queued = (
        s.job.id
        for s in store.submit(
            [
                _hooked("https://example.com/a"),
                _hooked("https://example.com/b"),
                _hooked("https://example.com/c", ["failed"]),
                T2I,
                _hooked("https://example.com/d"),
            ]
        )
    )
    # A completion that rolls back leaves no row; a finish refused by the fence writes none either.
    assert store.claim(ok, "w1", 60) is not None
    from worker import claims

    with pytest.raises(RuntimeError), store.database.transaction() as session:
        assert claims.finish(session, ok, "w1", JobStatus.SUCCEEDED)
        raise RuntimeError("crash before the commit")
    assert store.get(ok).status == JobStatus.RUNNING and _rows(deliverer, ok) == []
    assert not store.finish_succeeded(
        ok, "someone-else", artifacts=[], seed=1, width=8, height=8, provenance=None
    )
    assert _rows(deliverer, ok) == []
    store.finish_cancelled(ok, "w1")  # now it ends: exactly one row, in that transaction
    complete_job(store, artifacts, only_failed)  # succeeded, but it asked for failures only
    fail_job(store, failed)
    complete_job(store, artifacts, plain)  # no webhook
    store.cancel(queued)  # a client's cancel of a queued job
    [row] = _rows(deliverer, ok)
    assert (row["event_type"], row["url"], row["status"], row["attempts"]) == (
        "cancelled",
        "https://example.com/a",
        PENDING,
        0,
    )
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", row["id"])
    assert [r["event_type"] for r in _rows(deliverer, failed)] == ["failed"]
    assert _rows(deliverer, only_failed) == [] and _rows(deliverer, plain) == []
    assert [r["event_type"] for r in _rows(deliverer, queued)] == ["cancelled"]
    # The hard-time-limit path (the Celery parent's write) gets its row too.
    killed = store.submit([_hooked("https://example.com/e")])[0].job.id
    assert store.claim(killed, "host:42:abc", 60) is not None
    assert store.fail_killed_process_job(
        killed, "host:42:", error_type="TimeLimitExceeded", error_message="x"
    )
    assert [r["event_type"] for r in _rows(deliverer, killed)] == ["failed"]


def test_delivery_is_signed_and_retried_after_a_500_with_the_same_event_id(
    settings: Settings, store: JobStore, receiver: Receiver
) -> None:
    deliverer = _deliverer(settings, store)
    job = store.submit([_hooked(receiver.url)])[0].job
    complete_job(store, open_store(settings.storage_url), job.id)
    receiver.statuses = [500]
    first = deliverer.deliver_due()
    assert (first.delivered, first.retried) == (0, 1)
    [row] = _rows(deliverer, job.id)
    assert row["status"] == PENDING and row["attempts"] == 1 and row["last_status_code"] == 500
    assert "HTTP 500" in row["last_error"]
    time.sleep(0.1)  # the back-off of DG_WEBHOOK_RETRY_SECONDS=0.01 (at most 0.01 s here)
    second = deliverer.deliver_due()
    assert second.delivered == 1
    [row] = _rows(deliverer, job.id)
    assert row["status"] == DELIVERED and row["attempts"] == 2 and row["last_error"] is None
    assert len(receiver.requests) == 2
    verify = _documented_verify()
    for headers, body in receiver.requests:
        assert headers[EVENT_ID_HEADER] == row["id"]  # every attempt carries the event id
        assert verify(SECRET, headers, body)
        assert not verify("another-secret-0123456789", headers, body)
        assert not verify(SECRET, headers, body + b" ")  # the exact bytes are signed
    payload = json.loads(receiver.requests[-1][1])
    assert payload["event_id"] == row["id"] and payload["type"] == "succeeded"
    assert payload["job"]["id"] == job.id and payload["job"]["status"] == "succeeded"
    assert payload["job"]["artifacts"][0]["sha256"]
    assert [h["X-Diffgentor-Delivery-Attempt"] for h, _ in receiver.requests] == ["1", "2"]
    stale = dict(receiver.requests[0][0], **{"X-Diffgentor-Timestamp": str(int(time.time()) - 3600)})
    assert not verify(SECRET, stale, receiver.requests[0][1])  # a replayed old request


def test_a_deliverer_that_dies_after_the_post_lets_another_send_it_again(
    settings: Settings, store: JobStore, receiver: Receiver
) -> None:
    job = store.submit([_hooked(receiver.url)])[0].job
    fail_job(store, job.id)
    crashed = _deliverer(settings, store)
    crashed.lease_seconds = 0.5
    crashed._record = lambda row, attempt: None  # type: ignore[method-assign]  # dies before recording
    assert crashed.deliver_due().delivered == 1
    other = _deliverer(settings, store)
    assert other.deliver_due().attempted == 0  # the dead deliverer's lease still holds the row
    time.sleep(1.0)
    assert other.deliver_due().delivered == 1
    [row] = _rows(other, job.id)
    assert row["status"] == DELIVERED and row["attempts"] == 2
    ids = {headers[EVENT_ID_HEADER] for headers, _ in receiver.requests}
    assert len(receiver.requests) == 2 and ids == {row["id"]}  # a duplicate, recognisable by its id
    assert json.loads(receiver.requests[0][1])["job"] == json.loads(receiver.requests[1][1])["job"]


def test_an_event_is_dead_after_its_last_attempt_and_redirects_are_not_followed(
    settings: Settings, store: JobStore, receiver: Receiver
) -> None:
    deliverer = _deliverer(settings, store, webhook_max_attempts=3)
    job = store.submit([_hooked(receiver.url)])[0].job
    complete_job(store, open_store(settings.storage_url), job.id)
    receiver.statuses = [503, 302, 500, 200]
    for _ in range(3):
        deliverer.deliver_due()
        time.sleep(0.1)
    assert deliverer.deliver_due().attempted == 0  # nothing due any more
    [row] = _rows(deliverer, job.id)
    assert row["status"] == DEAD and row["attempts"] == 3 and row["last_status_code"] == 500
    assert "HTTP 500" in row["last_error"]
    assert len(receiver.requests) == 3  # the 302 was a failed attempt: its Location was never fetched


def test_the_deliverer_refuses_private_addresses_without_the_hatch(receiver: Receiver) -> None:
    with pytest.raises(DeliveryError, match="loopback address"):
        post_json(receiver.url, b"{}", {}, timeout_seconds=5, allow_private_networks=False)
    assert receiver.requests == []


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:9/hook", "resolves to 127.0.0.1, a loopback address"),
        ("http://10.0.0.7/hook", "resolves to 10.0.0.7, a private address"),
        ("http://169.254.169.254/latest", "link-local (cloud metadata service) address"),
        ("http://[::ffff:192.168.1.1]/", "a private"),
        ("http://localhost:8080/x", "a loopback address"),
        ("ftp://example.com/hook", "must be an http:// or https:// URL"),
        ("https://user:pw@example.com/hook", "must not carry credentials"),
    ],
)
def test_webhook_urls_are_checked_at_submit(settings: Settings, url: str, message: str) -> None:
    guarded = replace(settings, webhook_secret=SECRET, webhook_allow_private_networks=False)
    with (
        DiffgentorClient(guarded) as client,
        pytest.raises(ConfigurationError, match=re.escape(message)) as caught,
    ):
        client.submit_t2i("a fox", webhook_url=url)
    assert caught.value.exit_code == 4 and "\n" not in str(caught.value)
    assert client.list() == []  # nothing was written


def test_a_webhook_needs_the_secret(settings: Settings) -> None:
    with DiffgentorClient(replace(settings, webhook_secret=None)) as client:
        with pytest.raises(ConfigurationError, match="DG_WEBHOOK_SECRET is not set"):
            client.submit_t2i("a fox", webhook_url="https://example.com/hook")
        client.check_webhook  # noqa: B018 - the client itself still works
        assert client.list() == []


def test_the_cli_refuses_a_bad_webhook_with_exit_4(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key in [key for key in __import__("os").environ if key.startswith("DG_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("DG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DG_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("DG_WEBHOOK_ALLOW_PRIVATE_NETWORKS", "false")
    out = str(tmp_path / "out")
    for url, expected in [
        ("http://127.0.0.1:8080/hook", "a loopback address"),
        ("gopher://example.com/", "must be an http:// or https:// URL"),
    ]:
        code = main(["t2i", "--prompt", "x", "--output_dir", out, "--webhook_url", url])
        err = capsys.readouterr().err
        assert code == 4 and expected in err and err.count("\n") == 1, err
    code = main(["t2i", "--prompt", "x", "--output_dir", out, "--webhook-url", "https://example.com/h",
                 "--webhook_events", "succeeded,started"])  # fmt: skip
    assert code == 2 and "unknown event(s) started" in capsys.readouterr().err
    monkeypatch.delenv("DG_WEBHOOK_SECRET")
    code = main(["t2i", "--prompt", "x", "--output_dir", out, "--webhook_url", "https://example.com/h"])
    assert code == 4 and "DG_WEBHOOK_SECRET is not set" in capsys.readouterr().err
    code = main(["webhooks", "deliver"])
    assert code == 4 and "DG_WEBHOOK_SECRET is not set" in capsys.readouterr().err
