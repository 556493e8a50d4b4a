"""Edit input loading against a real moto S3 endpoint and a loopback HTTP server."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image

from tests.support import bomb_png, solid_png
from worker.inputs import InputImageError, InputLimits, load_input_image, load_input_images
from worker.storage import ArtifactStore, content_addressed_key, open_store
from worker.testing import free_port

SMALL = InputLimits(max_bytes=512 * 1024, timeout_seconds=1.0, max_pixels=4_000_000)


@pytest.fixture
def s3_factory(s3_endpoint: str):  # type: ignore[no-untyped-def]
    def factory(storage_url: str) -> ArtifactStore:
        return open_store(storage_url, endpoint_url=s3_endpoint)

    return factory


def _load(ref: str, **kwargs: object) -> Image.Image:
    kwargs.setdefault("limits", SMALL)
    # The test server is on loopback; the SSRF guard itself is tested in test_ssrf_guard.py.
    kwargs.setdefault("allow_private_networks", True)
    return load_input_image(ref, **kwargs)  # type: ignore[arg-type]


def test_s3_input_is_read_through_the_store(s3_factory, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    data = solid_png(10, 7, (1, 2, 3))
    uri = s3_factory(f"s3://{s3_bucket}").put_bytes(content_addressed_key(data, "png"), data)
    image = _load(uri, store_factory=s3_factory, s3_buckets={s3_bucket})
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (10, 7), (1, 2, 3))

    with pytest.raises(InputImageError, match=rf"input image \(s3://{s3_bucket}/missing.png\): not found"):
        _load(f"s3://{s3_bucket}/missing.png", store_factory=s3_factory, s3_buckets={s3_bucket})
    cap = len(data) - 1
    with pytest.raises(InputImageError, match=f"{len(data)} bytes, over the limit of {cap} bytes"):
        _load(uri, store_factory=s3_factory, limits=InputLimits(max_bytes=cap), s3_buckets={s3_bucket})


def test_http_input_and_redirect(http_images: str) -> None:
    image = _load(f"{http_images}/good.png")
    assert (image.mode, image.size) == ("RGB", (8, 6))
    assert _load(f"{http_images}/redirect").size == (8, 6)


def test_http_failures_are_readable(http_images: str) -> None:
    cases = {
        "/missing.png": "HTTP 404",
        "/corrupt.png": "not a readable image: unknown or unsupported format",
        "/truncated.png": "not a readable image",
        "/huge-declared": "the server says it is 10485760 bytes, over the limit of 524288 bytes",
        "/huge-streamed": "more than 524288 bytes",
        "/redirect-loop": "more than 3 redirects",
        "/redirect-ftp": "refusing 'ftp://127.0.0.1/x.png': only http:// and https:// URLs can be fetched",
    }
    for number, (path, reason) in enumerate(cases.items(), start=1):
        with pytest.raises(InputImageError) as caught:
            _load(f"{http_images}{path}", index=number)
        assert str(caught.value).startswith(f"input image {number} ({http_images}{path}): "), str(
            caught.value
        )
        assert reason in str(caught.value)


def test_slow_server_hits_the_total_deadline(http_images: str) -> None:
    started = time.monotonic()
    with pytest.raises(InputImageError, match=r"timed out after 1 s"):
        _load(f"{http_images}/slow")
    assert time.monotonic() - started < 3.0  # the trickle would go on for 10 s


def test_connection_refused_redacts_the_password() -> None:
    url = f"http://user:topsecret@127.0.0.1:{free_port()}/x.png"
    with pytest.raises(InputImageError) as caught:
        _load(url, index=2)
    message = str(caught.value)
    assert message.startswith("input image 2 (http://user:***@127.0.0.1:")
    assert "connection refused" in message and "topsecret" not in message


def test_decompression_bombs_are_refused_before_decoding(http_images: str) -> None:
    # The header claims 64 MP with a few bytes of data: our limit fires before any decoding.
    with pytest.raises(InputImageError, match=r"8000x8000 = 64000000 pixels is over the limit of 4000000"):
        _load(f"{http_images}/bomb-64mp.png")
    # Past PIL's own hard limit (about 179 MP) its DecompressionBombError must come out as a clean error.
    with pytest.raises(InputImageError, match="refused as a possible decompression bomb: Image size"):
        _load(f"{http_images}/bomb.png", limits=InputLimits(max_pixels=10**10))


def test_local_files_only_when_allowed(tmp_path: Path) -> None:
    path = tmp_path / "in put.png"
    path.write_bytes(solid_png(5, 4))
    for ref in (str(path), path.as_uri(), "in put.png"):
        with pytest.raises(InputImageError, match="local files are not allowed on this worker"):
            _load(ref)
    assert _load(str(path), allow_local=True).size == (5, 4)
    assert _load(path.as_uri(), allow_local=True).size == (5, 4)
    assert _load("in put.png", allow_local=True, base_dir=tmp_path).size == (5, 4)
    with pytest.raises(InputImageError, match="no such file"):
        _load("absent.png", allow_local=True, base_dir=tmp_path)
    big = tmp_path / "big.png"
    big.write_bytes(bomb_png(3000, 3000))
    with pytest.raises(InputImageError, match="9000000 pixels is over the limit"):
        _load(str(big), allow_local=True)


def test_other_schemes_are_refused() -> None:
    for ref in ("ftp://host/a.png", "data:image/png;base64,AAAA", "gs://bucket/a.png"):
        with pytest.raises(InputImageError, match="unsupported scheme"):
            _load(ref)


def test_load_input_images_numbers_from_one(http_images: str) -> None:
    good = f"{http_images}/good.png"
    images = load_input_images([good, good], limits=SMALL, allow_private_networks=True)
    assert [image.size for image in images] == [(8, 6), (8, 6)]
    with pytest.raises(InputImageError, match=r"^input image 2 \("):
        load_input_images([good, f"{http_images}/corrupt.png"], limits=SMALL, allow_private_networks=True)
