"""Fixtures for storage and input tests: a loopback HTTP server with good and hostile images."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

SLOW_TRICKLE_SECONDS = 10.0  # how long the /slow route keeps trickling; far above the test timeouts


def png_bytes(width: int = 8, height: int = 6, color: tuple[int, int, int] = (200, 30, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG header claiming ``width`` x ``height`` with almost no pixel data.

    Decoding it would allocate width*height*3 bytes; a guard must refuse it from the header alone.
    """
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


hosts_seen: list[str] = []  # Host headers received by /host.png


class _Routes(BaseHTTPRequestHandler):
    good = png_bytes()
    stop = threading.Event()

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        route = self.path.split("?")[0]
        try:
            handler = getattr(self, "route_" + route.strip("/").replace("-", "_").replace(".", "_"), None)
            if handler is None:
                self.send_error(404, "Not Found")
            else:
                handler()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on purpose (size cap, timeout)

    def _send(self, body: bytes, content_type: str = "image/png", length: bool = True) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def route_good_png(self) -> None:
        self._send(self.good)

    def route_corrupt_png(self) -> None:
        self._send(b"this is not an image at all" * 10)

    def route_truncated_png(self) -> None:
        self._send(png_bytes(64, 64)[:90])

    def route_bomb_png(self) -> None:
        self._send(bomb_png(50_000, 50_000))

    def route_bomb_64mp_png(self) -> None:
        self._send(bomb_png(8_000, 8_000))

    def route_huge_declared(self) -> None:
        # Claims to be large; the client must refuse from the header without reading.
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(10 * 1024 * 1024))
        self.end_headers()
        self.wfile.write(b"\0" * 1024)

    def route_huge_streamed(self) -> None:
        # No Content-Length: the cap must be enforced while streaming.
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Connection", "close")
        self.end_headers()
        for _ in range(200):
            self.wfile.write(b"\0" * 64 * 1024)

    def route_slow(self) -> None:
        # One byte every 50 ms: each read is quick, only a total deadline stops it.
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Connection", "close")
        self.end_headers()
        end = time.monotonic() + SLOW_TRICKLE_SECONDS
        while time.monotonic() < end and not self.stop.is_set():
            self.wfile.write(b"\0")
            self.wfile.flush()
            time.sleep(0.05)

    def route_redirect(self) -> None:
        self.send_response(302)
        self.send_header("Location", "/good.png")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_redirect_ftp(self) -> None:
        self.send_response(301)
        self.send_header("Location", "ftp://127.0.0.1/x.png")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_redirect_metadata(self) -> None:
        self.send_response(302)
        self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_redirect_private(self) -> None:
        self.send_response(302)
        self.send_header("Location", "http://10.0.0.7:8080/internal.png")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_host_png(self) -> None:
        hosts_seen.append(self.headers.get("Host", ""))
        self._send(self.good)

    def route_redirect_loop(self) -> None:
        self.send_response(302)
        self.send_header("Location", "/redirect-loop")
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="session")
def http_images() -> Iterator[str]:
    """Base URL (``http://127.0.0.1:<port>``) of a server with /good.png, /corrupt.png, /bomb.png, /slow ..."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Routes)
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, name="test-http-images", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        _Routes.stop.set()
        server.shutdown()
        server.server_close()
