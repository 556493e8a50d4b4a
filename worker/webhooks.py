"""Webhooks: a signed HTTP POST of a job when it ends, delivered from an outbox table.

The outbox (`webhook_outbox`, migration 0005) gets its row from a database trigger on `jobs`: every
UPDATE that moves a job whose spec has a `webhook_url` into `succeeded`, `failed` or `cancelled`
(and whose `webhook_events`, if given, lists that status) inserts one row with a new event id, in the
same transaction as the change itself. So every fenced completion, a cancel of a queued job, a
poison or cancel at claim time and the hard-time-limit failure written by the Celery parent all get
their row, with no extra statement on their path, and a crash can never keep one without the other.

`WebhookDeliverer.deliver_due()` (run by `diffgentor sweep --loop` and `diffgentor webhooks deliver
[--loop]`, see `run_loop`) claims due rows with a lease in one conditional UPDATE (as a job claim:
two deliverers never send the same row at once; a deliverer that dies mid-delivery lets its lease
expire and the row is sent again), POSTs ``{"event_id", "type", "created_at", "job"}`` (the job as
`JobView` JSON) with ``X-Diffgentor-Event-Id``, ``X-Diffgentor-Timestamp`` and
``X-Diffgentor-Signature: sha256=HMAC-SHA256(DG_WEBHOOK_SECRET, timestamp + "." + body)``, and marks
the row delivered (any 2xx), or schedules the next attempt with exponential back-off and jitter, or,
after DG_WEBHOOK_MAX_ATTEMPTS attempts or DG_WEBHOOK_MAX_AGE_SECONDS, marks it dead with the last
error. Every attempt of a row carries the same event id, so a receiver drops duplicates by it.

URLs pass the SSRF guard of edit inputs (`worker.http_fetch`): at submit (`check_webhook_url`, the
client) and again at every attempt, where the connection goes to exactly the addresses checked.
Redirects are never followed (a 3xx is a failed attempt).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import random
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import sqlalchemy as sa

from schemas.specs import webhook_url_problem
from schemas.tables import WebhookOutbox, utcnow
from worker.backoff import Backoff
from worker.claims import db_now_plus, rowcount
from worker.http_fetch import _PinnedHTTPConnection, _PinnedHTTPSConnection, address_class, resolve
from worker.redact import redact_url
from worker.transient import one_line

if TYPE_CHECKING:
    from worker.jobstore import JobStore
    from worker.settings import Settings

log = logging.getLogger(__name__)

EVENT_ID_HEADER = "X-Diffgentor-Event-Id"
EVENT_TYPE_HEADER = "X-Diffgentor-Event-Type"
TIMESTAMP_HEADER = "X-Diffgentor-Timestamp"
SIGNATURE_HEADER = "X-Diffgentor-Signature"
ATTEMPT_HEADER = "X-Diffgentor-Delivery-Attempt"
PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
MAX_RETRY_DELAY_SECONDS = 3600.0  # the longest pause between two attempts of one event
CLAIM_LIMIT = 20  # rows one pass claims
DELIVERY_THREADS = 4  # POSTs of one pass that run at once (one slow receiver does not hold the rest)
RESPONSE_BYTES = 2048  # of an error response kept in last_error
_PRIVATE_HINT = "set DG_WEBHOOK_ALLOW_PRIVATE_NETWORKS=true to allow private networks"


class WebhookRefused(ValueError):
    """A webhook URL that may not be used (at submit); ``str()`` is one line naming the URL."""


class WebhooksUnsigned(RuntimeError):
    """DG_WEBHOOK_SECRET is not set where webhooks are submitted or delivered: they are always signed."""

    def __init__(self, where: str) -> None:
        super().__init__(
            f"DG_WEBHOOK_SECRET is not set: webhooks are always signed with it, so {where} needs it "
            "(the same value where they are submitted, delivered and verified; at least 16 characters, e.g. "
            "`python -c 'import secrets; print(secrets.token_hex(32))'`)"
        )


# ---------------------------------------------------------------------------------- signatures


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Diffgentor-Signature`` value: ``sha256=`` + hex HMAC-SHA256(secret, timestamp + "." + body)."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify_signature(
    secret: str, headers: Mapping[str, str], body: bytes, *, tolerance_seconds: float = 300
) -> bool:
    """What a receiver checks (docs/events.md has the same lines to copy): the signature of the exact
    bytes received, and a timestamp within ``tolerance_seconds`` of now (a replayed old request fails)."""
    timestamp = headers.get(TIMESTAMP_HEADER, "")
    given = headers.get(SIGNATURE_HEADER, "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > tolerance_seconds:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), given)


# ---------------------------------------------------------------------------- the address guard


def check_webhook_url(url: str, *, allow_private_networks: bool) -> None:
    """Raise `WebhookRefused` unless ``url`` is an http(s) URL whose host resolves only to public
    addresses (the SSRF rule of edit inputs; ``allow_private_networks`` turns the address part off)."""
    problem = webhook_url_problem(url)
    if problem is not None:
        raise WebhookRefused(problem)
    if allow_private_networks:
        return
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    try:
        addresses = resolve(host, port)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookRefused(
            f"webhook_url {redact_url(url)!r}: cannot resolve host {host!r} ({exc})"
        ) from None
    refusal = _private_address(url, addresses)
    if refusal is not None:
        raise WebhookRefused(refusal)


def _private_address(url: str, addresses: Sequence[Any]) -> str | None:
    import ipaddress

    for info in addresses:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        kind = address_class(address)
        if kind is not None:
            return (
                f"webhook_url {redact_url(url)!r} is refused: its host resolves to {address}, a {kind} "
                f"address; webhooks go to public addresses only ({_PRIVATE_HINT})"
            )
    return None


# ---------------------------------------------------------------------------------- delivery


@dataclass(frozen=True)
class OutboxRow:
    id: str  # the event id: every attempt carries it
    job_id: str
    event_type: str
    url: str
    attempts: int  # including the attempt this claim is for
    created_at: datetime


@dataclass(frozen=True)
class Attempt:
    """What one POST did."""

    event_id: str
    delivered: bool
    status_code: int | None
    error: str | None
    dead: bool = False  # no further attempt


@dataclass
class DeliveryReport:
    delivered: int = 0
    retried: int = 0
    dead: int = 0

    @property
    def attempted(self) -> int:
        return self.delivered + self.retried + self.dead


_ROW_COLUMNS = (
    WebhookOutbox.id,
    WebhookOutbox.job_id,
    WebhookOutbox.event_type,
    WebhookOutbox.url,
    WebhookOutbox.attempts,
    WebhookOutbox.created_at,
)


class WebhookDeliverer:
    """Claims due outbox rows with a lease and POSTs them (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        *,
        owner: str | None = None,
        post: Callable[..., int] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.owner = owner or f"webhooks:{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self._post = post or post_json
        self._rng = rng or random.Random()
        # A row claimed by a deliverer that died is sent again once this passes.
        self.lease_seconds = 2 * settings.webhook_timeout_seconds + 30.0

    @property
    def secret(self) -> str:
        if not self.settings.webhook_secret:
            raise WebhooksUnsigned("the deliverer (`diffgentor sweep --loop`, `diffgentor webhooks deliver`)")
        return self.settings.webhook_secret

    def deliver_due(self, limit: int = CLAIM_LIMIT) -> DeliveryReport:
        """One pass: claim up to ``limit`` due rows, POST them (a few at once), record each outcome."""
        secret = self.secret
        rows = self.claim_due(limit)
        report = DeliveryReport()
        if not rows:
            return report
        with ThreadPoolExecutor(max_workers=min(DELIVERY_THREADS, len(rows))) as pool:
            attempts = list(pool.map(lambda row: self._attempt(row, secret), rows))
        for row, attempt in zip(rows, attempts, strict=True):
            self._record(row, attempt)
            if attempt.delivered:
                report.delivered += 1
            elif attempt.dead:
                report.dead += 1
            else:
                report.retried += 1
        return report

    def claim_due(self, limit: int = CLAIM_LIMIT) -> list[OutboxRow]:
        """Lease up to ``limit`` due pending rows to this deliverer (one conditional UPDATE)."""
        table = WebhookOutbox.__table__
        free = sa.or_(
            WebhookOutbox.lease_expires_at.is_(None), WebhookOutbox.lease_expires_at < db_now_plus(0)
        )
        due = sa.and_(WebhookOutbox.status == PENDING, WebhookOutbox.next_attempt_at <= db_now_plus(0), free)

        def claim(conn: sa.Connection) -> list[OutboxRow]:
            candidates = sa.select(table.c.id).where(due).order_by(table.c.next_attempt_at).limit(limit)
            if conn.dialect.name == "postgresql":
                candidates = candidates.with_for_update(skip_locked=True)
            statement = (
                sa.update(WebhookOutbox)
                .where(WebhookOutbox.id.in_(candidates.scalar_subquery()), due)  # re-checked per row
                .values(
                    lease_owner=self.owner,
                    lease_expires_at=db_now_plus(self.lease_seconds),
                    attempts=WebhookOutbox.attempts + 1,
                    last_attempt_at=utcnow(),
                )
                .returning(*_ROW_COLUMNS)
                .execution_options(synchronize_session=False)
            )
            return [OutboxRow(*row) for row in conn.execute(statement)]

        return self.store.database.write_one(claim)

    def _attempt(self, row: OutboxRow, secret: str) -> Attempt:
        from worker.jobstore import JobNotFound

        try:
            job = self.store.get(row.job_id)
        except JobNotFound:
            return Attempt(row.id, False, None, "the job no longer exists", dead=True)
        except Exception as exc:  # the database: this attempt did not happen; try again later
            return self._failed(row, None, f"could not read the job: {one_line(exc)}")
        body = json.dumps(
            {
                "event_id": row.id,
                "type": row.event_type,
                "created_at": row.created_at.isoformat(),
                "job": job.model_dump(mode="json"),
            },
            separators=(",", ":"),
        ).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "diffgentor-webhooks",
            EVENT_ID_HEADER: row.id,
            EVENT_TYPE_HEADER: row.event_type,
            ATTEMPT_HEADER: str(row.attempts),
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: signature(secret, timestamp, body),
        }
        try:
            status = self._post(
                row.url,
                body,
                headers,
                timeout_seconds=self.settings.webhook_timeout_seconds,
                allow_private_networks=self.settings.webhook_allow_private_networks,
            )
        except DeliveryError as exc:
            return self._failed(row, exc.status_code, str(exc))
        except Exception as exc:
            return self._failed(row, None, one_line(exc))
        return Attempt(row.id, True, status, None)

    def _failed(self, row: OutboxRow, status_code: int | None, error: str) -> Attempt:
        age = (utcnow() - row.created_at).total_seconds()
        dead = (
            row.attempts >= self.settings.webhook_max_attempts or age >= self.settings.webhook_max_age_seconds
        )
        return Attempt(row.id, False, status_code, error, dead=dead)

    def retry_delay(self, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``: DG_WEBHOOK_RETRY_SECONDS x 2^(attempts-1), at most an
        hour, with jitter (half of it random), so receivers that failed together are not hit together."""
        delay = min(MAX_RETRY_DELAY_SECONDS, self.settings.webhook_retry_seconds * 2 ** max(attempts - 1, 0))
        return delay / 2 + self._rng.uniform(0, delay / 2)

    def _record(self, row: OutboxRow, attempt: Attempt) -> None:
        """Fenced on this deliverer's lease: a row another deliverer took over meanwhile is left alone."""
        mine = sa.and_(
            WebhookOutbox.id == row.id,
            WebhookOutbox.status == PENDING,
            WebhookOutbox.lease_owner == self.owner,
        )
        values: dict[str, Any] = {"lease_owner": None, "lease_expires_at": None}
        values["last_status_code"] = attempt.status_code
        if attempt.delivered:
            values.update(status=DELIVERED, delivered_at=utcnow(), last_error=None)
            log.info(
                "webhook %s (%s of job %s) delivered: HTTP %s",
                row.id,
                row.event_type,
                row.job_id,
                attempt.status_code,
            )
        elif attempt.dead:
            values.update(status=DEAD, last_error=attempt.error)
            log.warning(
                "webhook %s (%s of job %s) to %s is dead after %d attempt(s): %s",
                row.id,
                row.event_type,
                row.job_id,
                redact_url(row.url),
                row.attempts,
                attempt.error,
            )
        else:
            delay = self.retry_delay(row.attempts)
            values.update(next_attempt_at=db_now_plus(delay), last_error=attempt.error)
            log.info(
                "webhook %s to %s failed (attempt %d: %s); next attempt in %.0f s",
                row.id,
                redact_url(row.url),
                row.attempts,
                attempt.error,
                delay,
            )
        statement = (
            sa.update(WebhookOutbox).where(mine).values(**values).execution_options(synchronize_session=False)
        )
        try:
            self.store.database.write_one(lambda conn: rowcount(conn.execute(statement)))
        except Exception as exc:  # the lease expires and the row is sent again, with the same event id
            log.warning("could not record the delivery of webhook %s: %s", row.id, one_line(exc))

    def rows_for_job(self, job_id: str) -> list[dict[str, Any]]:
        """The outbox rows of one job, oldest first (tests, operators)."""
        query = sa.select(WebhookOutbox.__table__).where(WebhookOutbox.job_id == job_id)
        query = query.order_by(WebhookOutbox.created_at, WebhookOutbox.id)
        return self.store.database.read(lambda conn: [dict(row._mapping) for row in conn.execute(query)])


class DeliveryError(Exception):
    """A POST that did not get a 2xx answer; ``str()`` is a short reason."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def post_json(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout_seconds: float,
    allow_private_networks: bool = False,
) -> int:
    """POST ``body``; the status code of a 2xx answer, else `DeliveryError`. The host is resolved once,
    checked (unless ``allow_private_networks``) and connected to at exactly those addresses; a redirect
    is an error, never followed."""
    problem = webhook_url_problem(url)
    if problem is not None:
        raise DeliveryError(problem)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    try:
        addresses = resolve(parts.hostname or "", port)
    except socket.gaierror as exc:
        raise DeliveryError(f"cannot resolve host: {exc.strerror or exc}") from None
    if not allow_private_networks:
        refusal = _private_address(url, addresses)
        if refusal is not None:
            raise DeliveryError(refusal)
    connection: http.client.HTTPConnection
    if scheme == "https":
        connection = _PinnedHTTPSConnection(parts.hostname or "", port, addresses, timeout=timeout_seconds)
    else:
        connection = _PinnedHTTPConnection(parts.hostname or "", port, addresses, timeout=timeout_seconds)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("POST", target, body=body, headers=dict(headers))
        response = connection.getresponse()
        text = response.read(RESPONSE_BYTES).decode("utf-8", "replace").strip()
    except TimeoutError:
        raise DeliveryError(f"timed out after {timeout_seconds:g} s") from None
    except ConnectionRefusedError:
        raise DeliveryError("connection refused") from None
    except ssl.SSLError as exc:
        raise DeliveryError(f"TLS error: {exc.reason or exc}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise DeliveryError(f"network error: {one_line(exc)}") from None
    finally:
        connection.close()
    status = response.status
    if 200 <= status < 300:
        return status
    if 300 <= status < 400:
        location = response.getheader("Location") or "?"
        raise DeliveryError(f"HTTP {status}: redirects are not followed (to {redact_url(location)})", status)
    snippet = " ".join(text.split())[:200]
    raise DeliveryError(f"HTTP {status} {response.reason}" + (f": {snippet}" if snippet else ""), status)


def run_loop(
    deliverer: WebhookDeliverer,
    *,
    stop: threading.Event | None = None,
    interval_seconds: float | None = None,
    on_report: Callable[[DeliveryReport], None] | None = None,
) -> None:
    """Deliver every ``interval_seconds`` (DG_WEBHOOK_POLL_SECONDS) until ``stop``; a full pass goes
    again at once. Never ends on a fault: one log line per back-off step, as the sweep loop."""
    stop = stop or threading.Event()
    interval = interval_seconds or deliverer.settings.webhook_poll_seconds
    backoff = Backoff("webhook delivery", log, max_factor=max(1, int(30 // interval)))
    while not stop.is_set():
        pause = interval
        try:
            report = deliverer.deliver_due()
        except Exception as exc:
            pause = backoff.failed(exc, interval)
        else:
            backoff.succeeded()
            if on_report is not None and report.attempted:
                on_report(report)
            if report.attempted >= CLAIM_LIMIT:
                pause = 0.0  # more are due
        stop.wait(pause)


def start_delivery_thread(
    settings: Settings, store: JobStore, stop: threading.Event
) -> threading.Thread | None:
    """`diffgentor sweep --loop`: deliver webhooks beside the sweeps (None, with one log line, when
    DG_WEBHOOK_SECRET is unset: rows then wait in the outbox until a deliverer with the secret runs)."""
    if not settings.webhook_secret:
        log.info("webhooks are not delivered by this process: DG_WEBHOOK_SECRET is not set")
        return None
    deliverer = WebhookDeliverer(settings, store)
    thread = threading.Thread(
        target=run_loop, args=(deliverer,), kwargs={"stop": stop}, name="diffgentor-webhooks", daemon=True
    )
    thread.start()
    return thread
