"""Fixtures for storage and input tests: a loopback HTTP server with good and hostile images."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import pytest

from tests.support import ImageRoutes


@pytest.fixture(scope="session")
def http_images() -> Iterator[str]:
    """Base URL (``http://127.0.0.1:<port>``) of a server with /good.png, /corrupt.png, /bomb.png, /slow ...
    (routes: tests.support.ImageRoutes)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), ImageRoutes)
    server.daemon_threads = True
    server.block_on_close = False
    thread = threading.Thread(target=server.serve_forever, name="test-http-images", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        ImageRoutes.stop.set()
        server.shutdown()
        server.server_close()
