"""Who may see and act: the token, login sessions, CSRF tokens, and the headers every response gets.

With `DG_DASHBOARD_TOKEN` set, every route but /login, /static and /healthz needs either the
`Authorization: Bearer <token>` header (scripts) or the session cookie that /login sets after
the token was typed in. The cookie holds a random nonce and its HMAC under the token (so a new
token ends every session); it is HttpOnly and SameSite=Strict. Actions are POSTed forms that
also carry a CSRF token, the HMAC of the session's nonce under the token under another label,
and a browser's Origin header, when sent, must be this dashboard's own. A Bearer request needs no
CSRF token: a browser never adds that header to a cross-site request by itself.

Without a token (loopback only, read-only) the Host header must name a loopback address or
localhost, so a web page cannot reach the dashboard through DNS rebinding.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlencode, urlsplit

from api_client.dashboard.config import DashboardConfig, is_loopback

COOKIE = "dg_dashboard"
SESSION_SECONDS = 12 * 3600
OPEN_PREFIXES = ("/login", "/static/", "/healthz")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Every page is built from this origin only: no inline script, no third-party resource, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),  # no-referrer would make browsers send `Origin: null`
    (b"cross-origin-opener-policy", b"same-origin"),
]


def _mac(token: str, label: str, nonce: str) -> str:
    return hmac.new(token.encode(), f"{label}:{nonce}".encode(), hashlib.sha256).hexdigest()


class Guard:
    """The token checks of one dashboard (no token: everything is open, nothing can act)."""

    def __init__(self, config: DashboardConfig) -> None:
        self.token = config.token
        self.allow_actions = config.allow_actions

    @property
    def enabled(self) -> bool:
        return self.token is not None

    def token_matches(self, given: str | None) -> bool:
        if self.token is None or not given:
            return False
        return hmac.compare_digest(given.encode(), self.token.encode())

    def new_session(self, now: float | None = None) -> str:
        assert self.token is not None
        issued = int(time.time() if now is None else now)
        nonce = f"{issued}-{secrets.token_urlsafe(18)}"
        return f"{nonce}.{_mac(self.token, 'session', nonce)}"

    def session_nonce(self, cookie: str | None, now: float | None = None) -> str | None:
        """The nonce of a valid, unexpired session cookie, else None."""
        if self.token is None or not cookie or "." not in cookie:
            return None
        nonce, mac = cookie.rsplit(".", 1)
        if not hmac.compare_digest(mac.encode(), _mac(self.token, "session", nonce).encode()):
            return None
        issued = nonce.split("-", 1)[0]
        age = (time.time() if now is None else now) - (int(issued) if issued.isdigit() else 0)
        return nonce if 0 <= age <= SESSION_SECONDS else None

    def csrf_token(self, nonce: str | None) -> str:
        if self.token is None or nonce is None:
            return ""
        return _mac(self.token, "csrf", nonce)

    def bearer(self, authorization: str | None) -> bool:
        if not authorization or not authorization.lower().startswith("bearer "):
            return False
        return self.token_matches(authorization[7:].strip())


class AuthMiddleware:
    """With a token: every route but the open ones needs the Bearer header or a session cookie.

    Records who asked in the scope (`dg.auth`: "bearer", "cookie" or None; `dg.session`: the
    session's nonce, for its CSRF token). A page asked for without either is redirected to
    /login; an API call or an image gets 401.
    """

    def __init__(self, app: ASGIApp, *, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope["dg.auth"] = None
        scope["dg.session"] = None
        if not self.guard.enabled:
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if self.guard.bearer(headers.get("authorization")):
            scope["dg.auth"] = "bearer"
        else:
            nonce = self.guard.session_nonce(_cookie(headers.get("cookie", ""), COOKIE))
            if nonce is not None:
                scope["dg.auth"] = "cookie"
                scope["dg.session"] = nonce
        path = scope.get("path", "/")
        if scope["dg.auth"] is not None or path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        if scope.get("method") in ("GET", "HEAD") and "text/html" in headers.get("accept", ""):
            query = scope.get("query_string", b"").decode("latin-1")
            target = path + (f"?{query}" if query else "")
            location = "/login?" + urlencode({"next": safe_next(target)})
            await _respond(send, 303, b"", [(b"location", location.encode("latin-1"))])
            return
        body = b"login required: log in at /login, or send Authorization: Bearer <DG_DASHBOARD_TOKEN>\n"
        await _respond(send, 401, body, [(b"www-authenticate", b"Bearer")])


def _headers(scope: Scope) -> dict[str, str]:
    return {
        name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", [])
    }


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value.strip('"')
    return None


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


def safe_next(target: str | None) -> str:
    """A local path to return to after login (never another site: `//host` and `\\` refused)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def origin_matches(origin: str | None, host: str | None) -> bool:
    """A browser's Origin header (when present) must name this dashboard's host[:port].

    The scheme is not compared: behind a TLS-terminating proxy the browser's origin is https while
    this process sees http. The CSRF token is the check that counts; this one refuses what a
    browser says came from another site.
    """
    if origin is None:
        return True  # not sent (older browsers, scripts)
    if origin == "null" or host is None:
        return False
    return urlsplit(origin).netloc.lower() == host.lower()


class HeadersMiddleware:
    """Adds the security headers to every response and, without a token, refuses Host headers that
    are not loopback (DNS rebinding)."""

    def __init__(self, app: ASGIApp, *, check_host: bool) -> None:
        self.app = app
        self.check_host = check_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.check_host and not _host_allowed(scope):
            await _plain(send, 400, b"this dashboard answers to localhost only (Host header refused)\n")
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def _host_allowed(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"host":
            host = value.decode("latin-1").strip()
            if host.startswith("["):  # [::1]:8765
                host = host[1 : host.find("]")] if "]" in host else host
            else:
                host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
            return is_loopback(host)
    return True  # HTTP/1.0 without Host: only a local client would send that


async def _plain(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), *SECURITY_HEADERS],
        }
    )
    await send({"type": "http.response.body", "body": body})
