"""Download one http(s) resource with a byte cap, a total deadline and a redirect limit.

Built on ``http.client`` rather than ``urllib`` so the socket timeout can be shortened before every
read: a server that trickles one byte at a time cannot stretch the download past the deadline.

SSRF guard: unless private networks are allowed, every hop's host is resolved once, every address
it resolves to must be public, and the socket connects to one of exactly those addresses (no
second lookup a rebinding DNS server could answer differently). TLS still verifies, and the Host
header still names, the host from the URL. IPv6 addresses that carry an IPv4 address (IPv4-mapped,
NAT64, 6to4, Teredo) are judged by that IPv4 address too.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import socket
import ssl
import time
from collections.abc import Collection, Sequence
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from worker.redact import redact_url, redact_urls_in

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Cloud instance-metadata endpoints (AWS/GCP/Azure IPv4, AWS IPv6): named in refusals for clarity.
_METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
_ALLOW_HINT = "set DG_INPUT_ALLOW_PRIVATE_NETWORKS=true to allow private networks"
# getaddrinfo entry: (family, type, proto, canonname, sockaddr)
_AddrInfo = tuple[Any, ...]


class FetchError(Exception):
    """The download failed; ``str()`` is a short reason without the URL (the caller names it)."""


# IPv6 prefixes whose addresses carry an IPv4 address that the packets end up at (or come from).
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: IPv4 in the last 32 bits
_NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: a site's own NAT64, never public
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")  # RFC 3056: 2002:AABB:CCDD::/48 relays to A.B.C.D
_TEREDO = ipaddress.ip_network("2001::/32")  # RFC 4380: server IPv4, and the client IPv4 (obfuscated)


def embedded_ipv4(address: IPAddress) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address carries, with how ("NAT64", "6to4", "Teredo client" ...).

    A NAT64 address reaches its embedded IPv4 address through the site's translator, a 6to4 one
    through a relay: ``64:ff9b::a9fe:a9fe`` is 169.254.169.254 and must be judged as that. The
    local-use NAT64 prefix allows several layouts (RFC 6052); the /96 one is read here.
    """
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    if address.ipv4_mapped is not None:
        return [("IPv4-mapped", address.ipv4_mapped)]
    if address in _NAT64_WELL_KNOWN or address in _NAT64_LOCAL_USE:
        return [("NAT64", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))]
    if address.sixtofour is not None:
        return [("6to4", address.sixtofour)]
    if address.teredo is not None:
        server, client = address.teredo
        return [("Teredo server", server), ("Teredo client", client)]
    return []


def address_class(address: IPAddress) -> str | None:
    """Why ``address`` is not a public internet address (e.g. "loopback"), or None if it is public.

    An IPv6 address that carries an IPv4 address (IPv4-mapped, NAT64, 6to4, Teredo) is judged by
    that IPv4 address too: ``2002:7f00:1::`` is "loopback (6to4 of 127.0.0.1)".
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address_class(address.ipv4_mapped)  # ::ffff:127.0.0.1 reaches 127.0.0.1
    for how, inner in embedded_ipv4(address):
        kind = address_class(inner)
        if kind is not None:
            note = f"{how} of {inner}"
            return f"{kind[:-1]}; {note})" if kind.endswith(")") else f"{kind} ({note})"
    if address in _NAT64_WELL_KNOWN:
        return None  # its IPv4 address is public (Python counts all of ::/8 as reserved)
    if address in _NAT64_LOCAL_USE:
        return "non-public (local-use NAT64 prefix)"
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),  # before "private": Python counts 240/4 as both
        ("private", address.is_private),
    )
    for name, hit in checks:
        if hit:
            return f"{name} (cloud metadata service)" if address in _METADATA_ADDRESSES else name
    # Shared (100.64/10 carrier NAT) and other special-purpose ranges are neither private nor global.
    return None if address.is_global else "non-public"


def fetch_http(
    url: str,
    *,
    max_bytes: int,
    timeout_seconds: float,
    max_redirects: int = 3,
    allow_private_networks: bool = False,
    allowed_addresses: Collection[IPAddress] = (),
) -> bytes:
    """GET ``url`` and return the body; fail if it is over ``max_bytes`` or takes over ``timeout_seconds``.

    Without ``allow_private_networks`` a hop whose host resolves to a non-public address is refused
    before connecting; ``allowed_addresses`` exempts exact addresses (a test server on loopback).
    """
    deadline = time.monotonic() + timeout_seconds
    current = url
    allowed = frozenset(allowed_addresses)
    for _ in range(max_redirects + 1):
        try:
            location = _fetch_once(
                current,
                max_bytes=max_bytes,
                deadline=deadline,
                guard=not allow_private_networks,
                allowed=allowed,
            )
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


def _fetch_once(
    url: str, *, max_bytes: int, deadline: float, guard: bool, allowed: frozenset[IPAddress]
) -> bytes | str:
    """Return the body, or the absolute URL a redirect points to."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in {"http", "https"} or not parts.hostname:
        raise FetchError(f"refusing {redact_url(url)!r}: only http:// and https:// URLs can be fetched")
    port = parts.port or (443 if scheme == "https" else 80)
    addresses = resolve(parts.hostname, port)
    if guard:
        _check_addresses(url, addresses, allowed)
    connection: http.client.HTTPConnection
    if scheme == "https":
        connection = _PinnedHTTPSConnection(parts.hostname, port, addresses, timeout=_remaining(deadline))
    else:
        connection = _PinnedHTTPConnection(parts.hostname, port, addresses, timeout=_remaining(deadline))
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


def resolve(host: str, port: int) -> list[_AddrInfo]:
    """The one DNS lookup of a hop: the addresses checked are the addresses connected to."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)


def _ip(info: _AddrInfo) -> IPAddress:
    return ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")


def _check_addresses(url: str, addresses: Sequence[_AddrInfo], allowed: frozenset[IPAddress]) -> None:
    # Every address must pass, not just the first: the connection may fall through to any of them.
    for info in addresses:
        address = _ip(info)
        kind = None if address in allowed else address_class(address)
        if kind is not None:
            raise FetchError(
                f"refusing {redact_url(url)!r}: its host resolves to {address}, a {kind} address ({_ALLOW_HINT})"
            )


def open_socket(addresses: Sequence[_AddrInfo], timeout: float | None) -> socket.socket:
    """Connect to the first reachable of the already-resolved ``addresses`` (no new DNS lookup)."""
    last_error: OSError | None = None
    for family, kind, proto, _canonname, sockaddr in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as exc:
            sock.close()
            last_error = exc
    raise last_error or OSError("the host resolved to no address")


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to pre-resolved addresses; ``host`` still goes into the Host header."""

    def __init__(self, host: str, port: int, addresses: Sequence[_AddrInfo], *, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._addresses = list(addresses)

    def connect(self) -> None:
        self.sock = open_socket(self._addresses, self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """As above, with TLS: SNI and certificate verification use the host from the URL."""

    def __init__(
        self,
        host: str,
        port: int,
        addresses: Sequence[_AddrInfo],
        *,
        timeout: float,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self._tls = context or ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self._tls)
        self._addresses = list(addresses)

    def connect(self) -> None:
        sock = open_socket(self._addresses, self.timeout)
        try:
            self.sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


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
