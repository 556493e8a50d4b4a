"""Helpers shared by the tests: the one place test modules and conftest files import helpers from.

Test modules never import from another test module or from a conftest file (conftest files hold
fixtures only). For a free TCP port use `worker.testing.free_port`; for a service that misbehaves,
`worker.faults.FaultProxy`. Heavy imports (torch, redis) happen inside the helpers that need them,
so importing this module stays cheap for the client and storage tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from PIL import Image

from worker.deepgen.types import GenerationRequest, GenerationResult, GenerationStopped, StepCallback
from worker.testing import RedisServer

__all__ = ["RedisServer"]  # re-exported for the tests

if TYPE_CHECKING:
    from worker.deepgen.engine import DeepGenEngine
    from worker.deepgen.tiny import TinyModelPaths

REPO_ROOT = Path(__file__).resolve().parents[1]
DIFFGENTOR = Path(sys.executable).parent / "diffgentor"  # the console script declared in pyproject


# ----------------------------------------------------------------------------------- CLI and env


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


def base_env(home: Path) -> dict[str, str]:
    """This process's environment without any DG_* setting, with its own DG_HOME."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DG_")}
    env.update(DG_HOME=str(home), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def run_cli(
    args: list[str], env: Mapping[str, str], timeout: float = 240, cwd: Path | None = None
) -> CliResult:
    """Run the real `diffgentor` console script in a subprocess."""
    done = subprocess.run(
        [str(DIFFGENTOR), *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or REPO_ROOT,
    )
    return CliResult(done.returncode, done.stdout, done.stderr)


# ---------------------------------------------------------------------------------------- images


def write_png(
    path: Path, size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (200, 30, 30)
) -> Path:
    """A flat PNG file at `path` (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def solid_png(width: int = 8, height: int = 6, color: tuple[int, int, int] = (200, 30, 40)) -> bytes:
    """The bytes of a flat PNG."""
    return png_bytes(Image.new("RGB", (width, height), color))


def png_bytes(image: Image.Image) -> bytes:
    """`image` encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_digest(image: Image.Image) -> str:
    return hashlib.sha256(png_bytes(image)).hexdigest()


def striped_image(width: int, height: int, colours: tuple[tuple[int, int, int], ...]) -> Image.Image:
    """A deterministic test picture with some structure (vertical colour stripes)."""
    image = Image.new("RGB", (width, height))
    stripe = max(1, width // len(colours))
    for x in range(width):
        colour = colours[min(x // stripe, len(colours) - 1)]
        for y in range(height):
            image.putpixel((x, y), colour)
    return image


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


# ------------------------------------------------------------------------- HTTP image routes


SLOW_TRICKLE_SECONDS = 10.0  # how long the /slow route keeps trickling; far above the test timeouts


class ImageRoutes(BaseHTTPRequestHandler):
    """Handler of the loopback image server (fixture `http_images`): /good.png, /corrupt.png,
    /bomb.png, /slow, redirects ... `hosts_seen` collects the Host headers /host.png received."""

    good = solid_png()
    stop = threading.Event()
    hosts_seen: ClassVar[list[str]] = []

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

    def _redirect(self, code: int, location: str) -> None:
        self.send_response(code)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def route_good_png(self) -> None:
        self._send(self.good)

    def route_corrupt_png(self) -> None:
        self._send(b"this is not an image at all" * 10)

    def route_truncated_png(self) -> None:
        self._send(solid_png(64, 64)[:90])

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
        self._redirect(302, "/good.png")

    def route_redirect_ftp(self) -> None:
        self._redirect(301, "ftp://127.0.0.1/x.png")

    def route_redirect_metadata(self) -> None:
        self._redirect(302, "http://169.254.169.254/latest/meta-data/")

    def route_redirect_private(self) -> None:
        self._redirect(302, "http://10.0.0.7:8080/internal.png")

    def route_host_png(self) -> None:
        self.hosts_seen.append(self.headers.get("Host", ""))
        self._send(self.good)

    def route_redirect_loop(self) -> None:
        self._redirect(302, "/redirect-loop")


# ------------------------------------------------------------------------------- engines


class FakeEngine:
    """Draws flat images, one per `num_images_per_prompt` (image j a shade darker than image j - 1);
    `on_step(step)` lets a test act in the middle of a run."""

    provenance: ClassVar[dict[str, str]] = {"config": "fake", "device": "cpu"}

    def __init__(self, color: tuple[int, int, int] = (200, 10, 10)) -> None:
        self.color = color
        self.calls: list[GenerationRequest] = []
        self.on_step: Callable[[int], None] = lambda step: None
        self.error: BaseException | None = None

    def generate(
        self, request: GenerationRequest, step_callback: StepCallback | None = None
    ) -> GenerationResult:
        self.calls.append(request)
        if self.error is not None:
            raise self.error
        total = request.num_inference_steps
        for step in range(1, total + 1):
            self.on_step(step)
            if step_callback is not None and step_callback(step, total):
                raise GenerationStopped(step, total)
        width = request.width or request.images[0].width
        height = request.height or request.images[0].height
        images = [
            Image.new("RGB", (width, height), tuple(max(0, channel - 8 * index) for channel in self.color))
            for index in range(request.num_images_per_prompt)
        ]
        return GenerationResult(
            images=images, seed=request.seed or 0, width=width, height=height, peak_memory_bytes=0
        )


# A small t2i job spec for runs on FakeEngine.
T2I: dict[str, Any] = {
    "kind": "t2i",
    "prompt": "a red fox",
    "params": {"num_inference_steps": 3, "width": 64, "height": 96, "seed": 7},
}


def load_tiny_engine(paths: TinyModelPaths, **overrides: str) -> DeepGenEngine:
    """A DeepGenEngine on the tiny model, loaded through DG_DEEPGEN_* as in production."""
    from worker.deepgen import tiny
    from worker.deepgen.engine import DeepGenEngine

    # "dynamic" keeps small inputs small: the tiny DiT's positional table only covers 512 pixels.
    settings = {"IMAGE_RESIZE_MODE": "dynamic", **overrides}
    return DeepGenEngine.from_env(tiny.tiny_env(paths, **settings))


# ------------------------------------------------------------------------ jobs finished by hand


def complete_job(
    store: Any, artifacts: Any, job_id: str, *, images: int = 1, worker_id: str = "test-worker"
) -> Any:
    """Claim ``job_id`` and finish it succeeded the way a worker does: ``images`` small PNGs put into
    ``artifacts`` (an ArtifactStore) under the attempt's keys, artifact rows 0..images-1 with their
    sha256, in the fenced completion. Returns the job's view (no model, no runner)."""
    from schemas.views import ArtifactView
    from worker.storage import artifact_key

    claimed = store.claim(job_id, worker_id, 60)
    assert claimed is not None, f"job {job_id} could not be claimed"
    rows = []
    for index in range(images):
        data = solid_png(8, 6, (200, 30, (40 + 20 * index) % 256))
        uri = artifacts.put_bytes(artifact_key(job_id, index, attempt=claimed.attempts), data)
        digest = hashlib.sha256(data).hexdigest()
        rows.append(ArtifactView(index=index, uri=uri, width=8, height=6, bytes=len(data), sha256=digest))
    assert store.finish_succeeded(
        job_id, worker_id, artifacts=rows, seed=claimed.seed, width=8, height=6, provenance=None
    )
    return store.get(job_id)


def fail_job(store: Any, job_id: str, *, message: str = "boom", worker_id: str = "test-worker") -> Any:
    """Claim ``job_id`` and finish it failed (`ValueError: message`), as a worker records a job error."""
    assert store.claim(job_id, worker_id, 60) is not None, f"job {job_id} could not be claimed"
    assert store.finish_failed(job_id, worker_id, error_type="ValueError", error_message=message)
    return store.get(job_id)


# ------------------------------------------------------------------------------- services


# ---------------------------------------------------------------------------------------- clients


@contextlib.contextmanager
def embedded_client(home: Path, model_environ: Mapping[str, str], poll_seconds: float = 0.1) -> Iterator[Any]:
    """A `DiffgentorClient` on the embedded default in this process: no DG_* variable but the tiny
    model's and short leases, its home in ``home``; closed (its jobs finished) on exit."""
    import pytest

    from api_client import DiffgentorClient

    with pytest.MonkeyPatch.context() as patch:
        for key in list(os.environ):
            if key.startswith("DG_"):
                patch.delenv(key)
        quick = {"DG_LEASE_SECONDS": "3", "DG_HEARTBEAT_SECONDS": "0.5", "DG_PROGRESS_INTERVAL_SECONDS": "0"}
        for key, value in {**model_environ, **quick}.items():
            patch.setenv(key, value)
        with DiffgentorClient(home=home, poll_seconds=poll_seconds) as client:
            assert client.embedded
            yield client
