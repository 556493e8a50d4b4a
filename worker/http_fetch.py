"""Download one http(s) resource with a byte cap, a total deadline and a redirect limit.

Built on ``http.client`` rather than ``urllib`` so the socket timeout can be shortened before every
read: a server that trickles one byte at a time cannot stretch the download past the deadline.
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import time
from urllib.parse import unquote, urljoin, urlsplit

from worker.redact import redact_url, redact_urls_in

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024


class FetchError(Exception):
    """The download failed; ``str()`` is a short reason without the URL (the caller names it)."""


def fetch_http(url: str, *, max_bytes: int, timeout_seconds: float, max_redirects: int = 3) -> bytes:
    """GET ``url`` and return the body; fail if it is over ``max_bytes`` or takes over ``timeout_seconds``."""
    deadline = time.monotonic() + timeout_seconds
    current = url
    for _ in range(max_redirects + 1):
        try:
            location = _fetch_once(current, max_bytes=max_bytes, deadline=deadline)
        except TimeoutError as exc:
            raise FetchError(f"timed out after {timeout_seconds:g} s") from exc
        except ConnectionRefusedError as exc:
            raise FetchError("connection refused (is the server running?)") from exc
        except socket.gaierror as exc:
            raise FetchError(f"cannot resolve host: {exc.strerror or exc}") from exc
        except ssl.SSLError as exc:
            raise FetchError(f"TLS error: {exc.reason or exc}") from exc
        except http.client.HTTPException as exc:
            raise FetchError(f"bad HTTP response: {type(exc).__name__} {redact_urls_in(str(exc))}") from exc
        except OSError as exc:
            raise FetchError(f"network error: {exc.strerror or exc}") from exc
        if isinstance(location, bytes):
            return location
        current = location
    raise FetchError(f"more than {max_redirects} redirects (last to {redact_url(current)})")


def _fetch_once(url: str, *, max_bytes: int, deadline: float) -> bytes | str:
    """Return the body, or the absolute URL a redirect points to."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in {"http", "https"} or not parts.hostname:
        raise FetchError(f"refusing {redact_url(url)!r}: only http:// and https:// URLs can be fetched")
    connection_class = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection
    connection = connection_class(parts.hostname, parts.port, timeout=_remaining(deadline))
    try:
        headers = {"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": "diffgentor-worker"}
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode("ascii")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("GET", target, headers=headers)
        # Keep the socket: http.client drops connection.sock once a closing response takes it over.
        sock = connection.sock
        _shorten_timeout(sock, deadline)
        response = connection.getresponse()
        if response.status in _REDIRECT_STATUSES:
            location = response.getheader("Location")
            if not location:
                raise FetchError(f"HTTP {response.status} redirect without a Location header")
            return urljoin(url, location)
        if response.status != 200:
            raise FetchError(f"HTTP {response.status} {response.reason}")
        return _read_capped(sock, response, max_bytes=max_bytes, deadline=deadline)
    finally:
        connection.close()


def _read_capped(
    sock: socket.socket | None, response: http.client.HTTPResponse, *, max_bytes: int, deadline: float
) -> bytes:
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise FetchError(f"the server says it is {int(declared)} bytes, over the limit of {max_bytes} bytes")
    chunks: list[bytes] = []
    total = 0
    while True:
        _shorten_timeout(sock, deadline)
        chunk = response.read1(_CHUNK)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise FetchError(f"more than {max_bytes} bytes (the size limit); stopped reading")
        chunks.append(chunk)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def _shorten_timeout(sock: socket.socket | None, deadline: float) -> None:
    remaining = _remaining(deadline)  # raises once the deadline has passed, socket or not
    if sock is not None:
        sock.settimeout(remaining)
