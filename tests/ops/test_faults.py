"""worker.faults.FaultProxy against a tiny local echo server: pass, refuse, hang, restore (no services)."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from worker.faults import FaultMode, FaultProxy
from worker.testing import wait_for


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(echo_port: int) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo_port, name="echo") as p:
        yield p


def _connect(proxy: FaultProxy, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=timeout)


def _roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received


def _is_cut(sock: socket.socket) -> bool:
    """The peer reset (or closed) the connection."""
    try:
        sock.sendall(b"x")
        return sock.recv(10) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_pass_forwards_both_ways(proxy: FaultProxy) -> None:
    assert proxy.mode is FaultMode.PASS
    with _connect(proxy) as a, _connect(proxy) as b:
        assert _roundtrip(a, b"hello") == b"hello"
        assert _roundtrip(b, b"x" * 200_000) == b"x" * 200_000  # larger than one chunk
    # The proxy counts a chunk after passing it on: the client can hold the bytes a moment before
    # the counter moves (seen on a loaded machine), so wait for the counts to settle.
    wait_for(lambda: proxy.stats().bytes_down == 200_005, 10, lambda: f"counts: {proxy.stats()}")
    stats = proxy.stats()
    assert stats.accepted == 2 and stats.forwarded == 2
    assert stats.bytes_up == stats.bytes_down == 200_005


def test_refuse_cuts_open_connections_and_refuses_new_ones_then_restore(proxy: FaultProxy) -> None:
    port = proxy.port
    held = _connect(proxy)
    assert _roundtrip(held, b"before") == b"before"

    proxy.refuse()
    assert proxy.mode is FaultMode.REFUSE
    assert _is_cut(held)
    held.close()
    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        _connect(proxy)
    assert time.monotonic() - started < 1  # refused at once, not a timeout
    assert proxy.stats().cut == 1

    proxy.restore()
    assert proxy.port == port  # the same port again
    with _connect(proxy) as again:
        assert _roundtrip(again, b"after") == b"after"


def test_hang_accepts_but_forwards_nothing_until_restored(proxy: FaultProxy) -> None:
    open_before = _connect(proxy)
    assert _roundtrip(open_before, b"1") == b"1"

    proxy.hang()
    fresh = _connect(proxy, timeout=0.3)  # the connection is accepted...
    fresh.sendall(b"ping")
    with pytest.raises(TimeoutError):  # ...but nothing comes back
        fresh.recv(10)
    open_before.settimeout(0.3)
    open_before.sendall(b"2")
    with pytest.raises(TimeoutError):  # an open connection stalls too
        open_before.recv(10)
    assert proxy.stats().forwarded == 1  # the hung connection never reached the service

    proxy.restore()  # what was sent during the hang is delivered now
    fresh.settimeout(2)
    open_before.settimeout(2)
    assert fresh.recv(10) == b"ping"
    assert open_before.recv(10) == b"2"
    fresh.close()
    open_before.close()


def test_refuse_during_a_hang_cuts_the_held_connections(proxy: FaultProxy) -> None:
    proxy.hang()
    held = _connect(proxy, timeout=1)
    held.sendall(b"stuck")
    proxy.refuse()
    assert _is_cut(held)
    held.close()
    proxy.restore()
    with _connect(proxy) as sock:
        assert _roundtrip(sock, b"ok") == b"ok"


def test_context_managers_hold_the_fault_for_at_least_the_given_time(proxy: FaultProxy) -> None:
    started = time.monotonic()
    with proxy.refusing(0.3):
        assert proxy.mode is FaultMode.REFUSE
        with pytest.raises(ConnectionRefusedError):
            _connect(proxy)
    assert time.monotonic() - started >= 0.3
    assert proxy.mode is FaultMode.PASS

    with proxy.hanging():
        assert proxy.mode is FaultMode.HANG
    assert proxy.mode is FaultMode.PASS
    with _connect(proxy) as sock:
        assert _roundtrip(sock, b"ok") == b"ok"


def test_restore_after_an_error_in_the_block(proxy: FaultProxy) -> None:
    with pytest.raises(RuntimeError), proxy.refusing(10):  # the error ends the fault at once
        raise RuntimeError("boom")
    assert proxy.mode is FaultMode.PASS


def test_an_unreachable_upstream_resets_the_client() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    with FaultProxy("127.0.0.1", dead_port) as proxy, _connect(proxy) as sock:
        assert _is_cut(sock)
        assert proxy.stats().upstream_failures == 1
