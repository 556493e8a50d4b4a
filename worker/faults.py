"""A loopback TCP proxy that injects service faults, for chaos benchmarks and tests.

Put a :class:`FaultProxy` between a client and a service (PostgreSQL, an S3 endpoint, Redis)
and point the client at the proxy's port. The proxy forwards bytes both ways until it is
told to misbehave::

    with FaultProxy("127.0.0.1", 5432) as proxy:      # listens on 127.0.0.1:<free port>
        url = f"postgresql+psycopg://postgres@127.0.0.1:{proxy.port}/jobs"
        ...
        proxy.refuse()        # the service refuses connections: existing ones are reset,
        ...                   # new ones get ECONNREFUSED (nothing listens on the port)
        proxy.restore()       # forwarding again, on the same port
        with proxy.hanging(10):   # a hung endpoint for (at least) 10 s
            ...

Modes (:class:`FaultMode`):

* ``pass``: every accepted connection is forwarded to the upstream service.
* ``refuse``: the listening socket is closed, so a new connection is refused at once by the
  kernel (ECONNREFUSED, as when the service is down), and every open connection is cut with a
  TCP reset on both sides.
* ``hang``: connections are accepted and kept open, but no byte is forwarded in either
  direction (open connections stall too): a hung endpoint, which only the client's own
  timeouts detect. On :meth:`FaultProxy.restore` forwarding resumes: what the client sent while
  the endpoint hung is delivered then (as a server that froze and recovered would read it),
  and connections accepted during the hang are connected upstream.

Nothing here is imported by the worker or the client at run time.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from types import TracebackType

__all__ = ["FaultMode", "FaultProxy", "ProxyStats"]

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.05  # how quickly the accept loop notices a mode change
_PUMP_POLL_SECONDS = 1.0  # a pump wakes on data or on its sockets being shut down; this is a backstop
_CHUNK = 64 * 1024


class FaultMode(str, Enum):
    PASS = "pass"
    REFUSE = "refuse"
    HANG = "hang"


@dataclass(frozen=True)
class ProxyStats:
    """Counters since the proxy started."""

    accepted: int  # client connections accepted (in pass or hang mode)
    forwarded: int  # of those, connected to the upstream service
    upstream_failures: int  # upstream connects that failed (the client was reset)
    cut: int  # connections reset by refuse() or close()
    bytes_up: int  # client -> service
    bytes_down: int  # service -> client
    open_connections: int


def _reset(sock: socket.socket | None) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST (connection reset), not an orderly FIN."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv() on it
    with contextlib.suppress(OSError):
        sock.close()


class _Link:
    """One client connection and (once forwarding) its upstream connection."""

    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        proxy = self.proxy
        try:
            if not proxy._wait_flowing(self.closed):  # hang mode: hold the accepted connection
                return
            try:
                upstream = socket.create_connection(proxy.upstream, timeout=proxy.connect_timeout)
            except OSError as exc:
                log.debug("fault proxy %s: upstream %s:%d unreachable: %s", proxy.name, *proxy.upstream, exc)
                proxy._count("upstream_failures")
                return
            upstream.settimeout(None)
            with self._lock:
                if self.closed.is_set():
                    _reset(upstream)
                    return
                self.upstream = upstream
            proxy._count("forwarded")
            down = threading.Thread(
                target=self._pump,
                args=(upstream, self.client, "bytes_down"),
                name=f"faultproxy-{proxy.name}-down",
                daemon=True,
            )
            down.start()
            self._pump(self.client, upstream, "bytes_up")
            down.join()
        finally:
            self.close(cut=False)
            proxy._forget(self)

    def _pump(self, source: socket.socket, target: socket.socket, counter: str) -> None:
        proxy = self.proxy
        while not self.closed.is_set():
            if not proxy._wait_flowing(self.closed):
                return
            try:
                ready, _, _ = select.select([source], [], [], _PUMP_POLL_SECONDS)
                if not ready:
                    continue
                if not proxy._wait_flowing(self.closed):  # hung after the data arrived: keep it
                    return
                data = source.recv(_CHUNK)
            except (OSError, ValueError):  # ValueError: select() on a socket closed meanwhile
                break
            if not data:  # orderly close by this side: pass the half-close on, keep the other way open
                with contextlib.suppress(OSError):
                    target.shutdown(socket.SHUT_WR)
                return
            try:
                target.sendall(data)
            except OSError:
                break
            proxy._count(counter, len(data))
        self.close(cut=False)

    def close(self, *, cut: bool) -> None:
        """Close both sockets; `cut=True` resets them (RST) as a refusing service does."""
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
            upstream = self.upstream
        if cut:
            _reset(self.client)
            _reset(upstream)
            return
        for sock in (self.client, upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()


class FaultProxy:
    """A threaded TCP proxy 127.0.0.1:<port> -> `upstream_host`:`upstream_port` with switchable faults.

    `listen_port=0` picks a free port when the proxy starts; the port stays the same across
    :meth:`refuse` / :meth:`restore` (the listening socket is re-bound with SO_REUSEADDR).
    Thread-safe: the mode may be switched from any thread while clients use the proxy.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        name: str = "",
        connect_timeout: float = 5.0,
    ) -> None:
        self.upstream = (upstream_host, int(upstream_port))
        self.listen_host = listen_host
        self._port = int(listen_port)
        self.name = name or f"{upstream_host}:{upstream_port}"
        self.connect_timeout = connect_timeout
        self._mode = FaultMode.PASS
        self._lock = threading.Lock()
        self._mode_changed = threading.Condition(self._lock)
        self._links: set[_Link] = set()
        self._listener: socket.socket | None = None
        self._listener_wanted = True  # the accept thread owns the listener and applies this
        self._listener_applied = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._counters = {
            "accepted": 0,
            "forwarded": 0,
            "upstream_failures": 0,
            "cut": 0,
            "bytes_up": 0,
            "bytes_down": 0,
        }

    # ------------------------------------------------------------------------------- life cycle

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("the fault proxy was already started")
        self._listener = self._bind()
        self._port = int(self._listener.getsockname()[1])
        self._thread = threading.Thread(target=self._accept_loop, name=f"faultproxy-{self.name}", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting, reset every open connection, free the port. Safe to call twice."""
        self._stopping.set()
        with self._mode_changed:
            self._mode_changed.notify_all()
        if self._thread is not None:
            self._thread.join(5)
        self._cut_all()

    def __enter__(self) -> FaultProxy:
        return self.start() if self._thread is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ facts

    @property
    def port(self) -> int:
        if self._port == 0:
            raise RuntimeError("the fault proxy was not started (its port is chosen at start)")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) that clients connect to."""
        return self.listen_host, self.port

    @property
    def mode(self) -> FaultMode:
        return self._mode

    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(open_connections=len(self._links), **self._counters)

    # ---------------------------------------------------------------------------------- faults

    def set_mode(self, mode: FaultMode | str, timeout: float = 5.0) -> None:
        """Switch the mode; returns once it is in force (listener closed or re-bound, links cut)."""
        mode = FaultMode(mode)
        if self._thread is None:
            raise RuntimeError("start the fault proxy before switching its mode")
        with self._mode_changed:
            self._mode = mode
            want_listener = mode is not FaultMode.REFUSE
            changed = want_listener != self._listener_wanted
            self._listener_wanted = want_listener
            if changed:
                self._listener_applied.clear()
            self._mode_changed.notify_all()
        if mode is FaultMode.REFUSE:
            self._cut_all()
        if changed and not self._listener_applied.wait(timeout):
            raise RuntimeError(
                f"fault proxy {self.name}: the listener did not switch to {mode.value} in {timeout} s"
            )
        log.info("fault proxy %s (port %d -> %s:%d): %s", self.name, self._port, *self.upstream, mode.value)

    def refuse(self) -> None:
        """Refuse new connections (ECONNREFUSED) and reset the open ones."""
        self.set_mode(FaultMode.REFUSE)

    def hang(self) -> None:
        """Accept connections but forward nothing, in either direction, on new and open connections."""
        self.set_mode(FaultMode.HANG)

    def restore(self) -> None:
        """Forward again (held bytes and connections from a hang are delivered now)."""
        self.set_mode(FaultMode.PASS)

    @contextlib.contextmanager
    def refusing(self, seconds: float | None = None) -> Iterator[FaultProxy]:
        """Refuse inside the block, and for at least `seconds` from its start; then restore."""
        with self._fault(FaultMode.REFUSE, seconds):
            yield self

    @contextlib.contextmanager
    def hanging(self, seconds: float | None = None) -> Iterator[FaultProxy]:
        """Hang inside the block, and for at least `seconds` from its start; then restore."""
        with self._fault(FaultMode.HANG, seconds):
            yield self

    @contextlib.contextmanager
    def _fault(self, mode: FaultMode, seconds: float | None) -> Iterator[None]:
        started = time.monotonic()
        self.set_mode(mode)
        try:
            yield
            if seconds is not None:
                time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        finally:
            self.restore()

    # -------------------------------------------------------------------------------- internals

    def _bind(self) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.listen_host, self._port))
        except OSError as exc:
            listener.close()
            if exc.errno == errno.EADDRINUSE:
                raise RuntimeError(
                    f"fault proxy {self.name}: port {self._port} was taken while refusing"
                ) from exc
            raise
        listener.listen(128)
        return listener

    def _accept_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self._apply_listener_state()
                listener = self._listener
                if listener is None:
                    with self._mode_changed:
                        self._mode_changed.wait(_POLL_SECONDS)
                    continue
                ready, _, _ = select.select([listener], [], [], _POLL_SECONDS)
                if not ready:
                    continue
                try:
                    client, _ = listener.accept()
                except OSError:
                    continue
                self._start_link(client)
        finally:
            if self._listener is not None:
                self._listener.close()
                self._listener = None

    def _apply_listener_state(self) -> None:
        """Run by the accept thread only, so no thread ever select()s on a closed socket."""
        with self._lock:
            wanted = self._listener_wanted
        if wanted and self._listener is None:
            try:
                self._listener = self._bind()
            except Exception:
                log.exception("fault proxy %s: cannot listen on port %d again", self.name, self._port)
                time.sleep(_POLL_SECONDS)
                return
        elif not wanted and self._listener is not None:
            self._listener.close()  # the kernel now refuses connections to the port
            self._listener = None
        self._listener_applied.set()

    def _start_link(self, client: socket.socket) -> None:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(self, client)
        with self._lock:
            if self._mode is FaultMode.REFUSE:  # refuse() ran after accept(): its cut did not see this one
                refused = True
            else:
                refused = False
                self._links.add(link)
                self._counters["accepted"] += 1
        if refused:
            _reset(client)
            return
        threading.Thread(target=link.run, name=f"faultproxy-{self.name}-up", daemon=True).start()

    def _wait_flowing(self, closed: threading.Event) -> bool:
        """Block while the proxy hangs; False once the link is closed or the proxy stops."""
        with self._mode_changed:
            while self._mode is FaultMode.HANG and not closed.is_set() and not self._stopping.is_set():
                self._mode_changed.wait(_POLL_SECONDS)
        return not closed.is_set() and not self._stopping.is_set()

    def _cut_all(self) -> None:
        with self._lock:
            links = list(self._links)
            self._links.clear()
            self._counters["cut"] += sum(1 for link in links if not link.closed.is_set())
        for link in links:
            link.close(cut=True)

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _count(self, counter: str, amount: int = 1) -> None:
        with self._lock:
            self._counters[counter] += amount
