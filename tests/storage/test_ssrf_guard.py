"""The SSRF guard on http(s) edit inputs: non-public addresses are refused before any connection.

Only the loopback test server is ever connected to; every refusal is checked with ``open_socket``
replaced by a recorder that fails the test on any other address.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Sequence
from typing import Any

import pytest

from tests.support import ImageRoutes, solid_png
from worker import http_fetch
from worker.http_fetch import FetchError, IPAddress, address_class, fetch_http
from worker.inputs import InputImageError, InputLimits, load_input_image

LOOPBACK = ipaddress.ip_address("127.0.0.1")
LIMITS = InputLimits(max_bytes=512 * 1024, timeout_seconds=2.0)


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[IPAddress]:
    """Addresses sockets were opened to; anything but the loopback test server fails the test."""
    opened: list[IPAddress] = []
    real_open = http_fetch.open_socket

    def recording_open(addresses: Sequence[Any], timeout: float | None) -> socket.socket:
        for info in addresses:
            address = ipaddress.ip_address(info[4][0])
            opened.append(address)
            assert address == LOOPBACK, f"the guard let a connection to {address} through"
        return real_open(addresses, timeout)

    monkeypatch.setattr(http_fetch, "open_socket", recording_open)
    return opened


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://127.0.0.1:8080/x.png", "127.0.0.1, a loopback address"),
        ("http://localhost/x.png", "a loopback address"),  # a name, resolved through /etc/hosts
        ("http://[::1]/x.png", "::1, a loopback address"),
        ("http://[::ffff:127.0.0.1]/x.png", "a loopback address"),  # printed ::ffff:7f00:1 before 3.13
        ("http://10.1.2.3/x.png", "10.1.2.3, a private address"),
        ("https://172.16.5.4/x.png", "172.16.5.4, a private address"),
        ("http://192.168.0.10/x.png", "192.168.0.10, a private address"),
        ("http://[fd12::1]/x.png", "fd12::1, a private address"),
        ("http://169.254.169.254/latest/meta-data/", "a link-local (cloud metadata service) address"),
        ("http://[::ffff:169.254.169.254]/", "a link-local (cloud metadata service) address"),
        ("http://[fe80::1]/x.png", "fe80::1, a link-local address"),
        ("http://224.0.0.1/x.png", "224.0.0.1, a multicast address"),
        ("http://0.0.0.0:8080/x.png", "0.0.0.0, a unspecified address"),
        ("http://240.0.0.1/x.png", "240.0.0.1, a reserved address"),
        ("http://100.64.0.1/x.png", "100.64.0.1, a non-public address"),
        # IPv6 addresses that carry a non-public IPv4 address (NAT64, 6to4, Teredo)
        (
            "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",
            "a link-local (cloud metadata service; NAT64 of 169.254.169.254) address",
        ),
        ("http://[64:ff9b:1::a00:1]/x.png", "64:ff9b:1::a00:1, a private (NAT64 of 10.0.0.1) address"),
        ("http://[2002:7f00:1::]:8080/x.png", "2002:7f00:1::, a loopback (6to4 of 127.0.0.1) address"),
        ("http://[2001:0:808:808:0:0:80ff:fffe]/x.png", "a loopback (Teredo client of 127.0.0.1) address"),
    ],
)
def test_non_public_addresses_are_refused_before_connecting(
    connections: list[IPAddress], url: str, kind: str
) -> None:
    with pytest.raises(InputImageError) as caught:
        load_input_image(url, limits=LIMITS, index=1)
    message = str(caught.value)
    assert message.startswith(f"input image 1 ({url}): refusing"), message
    assert kind in message and "DG_INPUT_ALLOW_PRIVATE_NETWORKS" in message, message
    assert connections == []


def test_refusal_redacts_credentials(connections: list[IPAddress]) -> None:
    with pytest.raises(InputImageError) as caught:
        load_input_image("http://user:topsecret@10.0.0.1/x.png", limits=LIMITS)
    assert "topsecret" not in str(caught.value) and "http://user:***@10.0.0.1/x.png" in str(caught.value)
    assert connections == []


def test_the_guard_is_on_by_default_and_can_be_turned_off(
    http_images: str, connections: list[IPAddress]
) -> None:
    with pytest.raises(InputImageError, match=r"127\.0\.0\.1, a loopback address"):
        load_input_image(f"{http_images}/good.png", limits=LIMITS)
    assert connections == []
    assert load_input_image(f"{http_images}/good.png", limits=LIMITS, allow_private_networks=True).size == (
        8,
        6,
    )
    assert connections == [LOOPBACK]


@pytest.mark.parametrize(
    ("route", "target", "kind"),
    [
        (
            "/redirect-metadata",
            "http://169.254.169.254/latest/meta-data/",
            "link-local (cloud metadata service)",
        ),
        ("/redirect-private", "http://10.0.0.7:8080/internal.png", "private"),
    ],
)
def test_every_redirect_hop_is_checked(
    http_images: str, connections: list[IPAddress], route: str, target: str, kind: str
) -> None:
    # The test server's own address is exempted; the hop it redirects to is not.
    with pytest.raises(FetchError) as caught:
        fetch_http(f"{http_images}{route}", max_bytes=1024, timeout_seconds=2.0, allowed_addresses={LOOPBACK})
    assert str(caught.value).startswith(f"refusing {target!r}: its host resolves to"), str(caught.value)
    assert f"a {kind} address" in str(caught.value)
    assert connections == [LOOPBACK]  # the first hop only


def test_the_checked_address_is_the_one_connected_to(
    http_images: str, connections: list[IPAddress], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebinding DNS answer (public first, private next) cannot redirect the connection."""
    port = int(http_images.rsplit(":", 1)[1])
    real_getaddrinfo = socket.getaddrinfo
    lookups: list[str] = []

    def rebinding(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        if host != "images.example":
            return real_getaddrinfo(host, *args, **kwargs)
        lookups.append(host)
        address = "127.0.0.1" if len(lookups) == 1 else "10.0.0.9"
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    body = fetch_http(
        f"http://images.example:{port}/host.png",
        max_bytes=1024,
        timeout_seconds=2.0,
        allowed_addresses={LOOPBACK},
    )
    assert body == solid_png()
    assert lookups == ["images.example"] and connections == [LOOPBACK]
    assert ImageRoutes.hosts_seen[-1] == f"images.example:{port}"  # the Host header keeps the name


def test_https_uses_the_url_host_for_sni_and_verification(monkeypatch: pytest.MonkeyPatch) -> None:
    server_names: list[str | None] = []

    class RecordingContext(ssl.SSLContext):
        def wrap_socket(
            self, sock: socket.socket, *args: Any, server_hostname: str | None = None, **kwargs: Any
        ) -> Any:
            server_names.append(server_hostname)
            return sock

    ours, theirs = socket.socketpair()
    monkeypatch.setattr(http_fetch, "open_socket", lambda addresses, timeout: ours)
    info = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("203.0.113.5", 443))
    context = RecordingContext(ssl.PROTOCOL_TLS_CLIENT)
    connection = http_fetch._PinnedHTTPSConnection(
        "images.example", 443, [info], timeout=1.0, context=context
    )
    try:
        connection.connect()
        assert server_names == ["images.example"] and connection.sock is ours
        assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    finally:
        connection.close()
        theirs.close()


def test_address_classes() -> None:
    for public in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"):
        assert address_class(ipaddress.ip_address(public)) is None, public
    assert address_class(ipaddress.ip_address("::")) == "unspecified"
    assert address_class(ipaddress.ip_address("ff02::1")) == "multicast"
    assert address_class(ipaddress.ip_address("fd00:ec2::254")) == "private (cloud metadata service)"
    assert address_class(ipaddress.ip_address("::ffff:10.0.0.1")) == "private"


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        # NAT64, well-known prefix 64:ff9b::/96: judged by the IPv4 address in the last 32 bits
        ("64:ff9b::7f00:1", "loopback (NAT64 of 127.0.0.1)"),
        ("64:ff9b::a00:1", "private (NAT64 of 10.0.0.1)"),
        ("64:ff9b::c0a8:101", "private (NAT64 of 192.168.1.1)"),
        ("64:ff9b::a9fe:a9fe", "link-local (cloud metadata service; NAT64 of 169.254.169.254)"),
        ("64:ff9b::e000:1", "multicast (NAT64 of 224.0.0.1)"),
        ("64:ff9b::f000:1", "reserved (NAT64 of 240.0.0.1)"),
        ("64:ff9b::6440:1", "non-public (NAT64 of 100.64.0.1)"),
        ("64:ff9b::", "unspecified (NAT64 of 0.0.0.0)"),
        ("64:ff9b::808:808", None),  # 8.8.8.8 through the translator: public
        ("64:ff9b::1:0:0:1", "reserved"),  # outside the /96: not NAT64, ::/8 is reserved
        # NAT64, local-use prefix 64:ff9b:1::/48: never public, named by its IPv4 when that is not
        ("64:ff9b:1::7f00:1", "loopback (NAT64 of 127.0.0.1)"),
        ("64:ff9b:1:abcd::ac10:1", "private (NAT64 of 172.16.0.1)"),
        ("64:ff9b:1::808:808", "non-public (local-use NAT64 prefix)"),
        # 6to4 2002::/16: the IPv4 address in bits 16-47
        ("2002:7f00:1::", "loopback (6to4 of 127.0.0.1)"),
        ("2002:a00:1:1::5", "private (6to4 of 10.0.0.1)"),
        ("2002:a9fe:a9fe::1", "link-local (cloud metadata service; 6to4 of 169.254.169.254)"),
        ("2002::1", "unspecified (6to4 of 0.0.0.0)"),
        ("2002:808:808::1", None),  # relays to 8.8.8.8: public
        # Teredo 2001::/32: the server address, and the client address (inverted) in the last 32 bits
        ("2001:0:7f00:1::", "loopback (Teredo server of 127.0.0.1)"),
        ("2001:0:808:808:0:0:80ff:fffe", "loopback (Teredo client of 127.0.0.1)"),
        ("2001:0:808:808:0:0:f5ff:fffe", "private (Teredo client of 10.0.0.1)"),
        ("2001:0:808:808::f7f7:f7f7", "private"),  # both public: still not globally reachable (2001::/23)
        # unchanged neighbours
        ("::ffff:7f00:1", "loopback"),
        ("2606:4700:4700::1111", None),
    ],
)
def test_ipv6_addresses_that_carry_an_ipv4_address_are_judged_by_it(
    address: str, expected: str | None
) -> None:
    assert address_class(ipaddress.ip_address(address)) == expected
