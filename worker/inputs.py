"""Fetch and decode edit input images, with limits on size, time and pixel count.

References may be ``s3://bucket/key`` (read through the storage layer, from the allowed buckets only:
DG_INPUT_S3_BUCKETS, by default the artifact bucket), ``http(s)://`` URLs (public addresses only
unless private networks are allowed: see ``worker.http_fetch``), and
local paths or ``file://`` URIs only where the caller allows them (the embedded default does; a
shared GPU worker does not, since a job spec must not read the worker's disk).
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

from PIL import Image, UnidentifiedImageError

from worker.http_fetch import FetchError, fetch_http
from worker.redact import redact_url
from worker.settings import ANY_BUCKET, load_settings
from worker.storage import ArtifactStore, ObjectNotFoundError, StorageError, StorageUnavailable, open_store

StoreFactory = Callable[[str], ArtifactStore]
"""Given ``s3://bucket``, return a store that can read objects of that bucket."""


@dataclass(frozen=True)
class InputLimits:
    max_bytes: int = 20 * 1024 * 1024
    timeout_seconds: float = 30.0
    max_pixels: int = 40_000_000  # about 6300 x 6300; refused before any pixel is decoded
    max_redirects: int = 3


class InputImageError(Exception):
    """An input image could not be used; the message names it (redacted) and says why."""

    def __init__(self, ref: str, reason: str, index: int | None = None) -> None:
        self.ref = redact_url(ref)
        self.reason = reason
        self.index = index
        label = "input image" if index is None else f"input image {index}"
        super().__init__(f"{label} ({self.ref}): {reason}")


def default_store_factory(storage_url: str) -> ArtifactStore:
    return open_store(storage_url)


def load_input_images(
    refs: Sequence[str],
    *,
    store_factory: StoreFactory = default_store_factory,
    limits: InputLimits | None = None,
    allow_local: bool = False,
    allow_private_networks: bool = False,
    base_dir: str | os.PathLike[str] | None = None,
    s3_buckets: Collection[str] | None = None,
) -> list[Image.Image]:
    """Load every reference in order; errors are numbered from 1 as users count them."""
    if s3_buckets is None and any(urlsplit(ref).scheme.lower() == "s3" for ref in refs):
        s3_buckets = configured_s3_buckets()  # read the environment once for the whole list
    return [
        load_input_image(
            ref,
            store_factory=store_factory,
            limits=limits,
            allow_local=allow_local,
            allow_private_networks=allow_private_networks,
            base_dir=base_dir,
            index=number,
            s3_buckets=s3_buckets,
        )
        for number, ref in enumerate(refs, start=1)
    ]


def load_input_image(
    ref: str,
    *,
    store_factory: StoreFactory = default_store_factory,
    limits: InputLimits | None = None,
    allow_local: bool = False,
    allow_private_networks: bool = False,
    base_dir: str | os.PathLike[str] | None = None,
    index: int | None = None,
    s3_buckets: Collection[str] | None = None,
) -> Image.Image:
    """Fetch ``ref`` and return it as an RGB image, or raise :class:`InputImageError`.

    ``allow_private_networks=False`` (the worker default) refuses http(s) URLs whose host resolves
    to a loopback, private, link-local, multicast, reserved or unspecified address (SSRF guard).

    ``s3_buckets``: the buckets an ``s3://`` reference may name (``"*"`` among them: any bucket);
    None reads them from this process's environment (:func:`configured_s3_buckets`). A caller
    holding a ``Settings`` passes ``settings.allowed_input_s3_buckets``.
    """
    limits = limits or InputLimits()
    try:
        data = _fetch_bytes(
            ref, store_factory, limits, allow_local, allow_private_networks, base_dir, s3_buckets
        )
        return decode_image(data, limits)
    except _Refused as exc:
        raise InputImageError(ref, str(exc), index) from exc.__cause__


class _Refused(Exception):
    """Internal: a reason without the reference, wrapped into InputImageError at the top."""


def configured_s3_buckets() -> frozenset[str]:
    """The buckets DG_INPUT_S3_BUCKETS allows in this process's environment (by default the
    artifact bucket of DG_STORAGE_URL when it is s3://, else none)."""
    return load_settings().allowed_input_s3_buckets


def _fetch_bytes(
    ref: str,
    store_factory: StoreFactory,
    limits: InputLimits,
    allow_local: bool,
    allow_private_networks: bool,
    base_dir: str | os.PathLike[str] | None,
    s3_buckets: Collection[str] | None,
) -> bytes:
    parts = urlsplit(ref)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        return _read_s3(ref, parts.netloc, store_factory, limits, s3_buckets)
    if scheme in {"http", "https"}:
        try:
            return fetch_http(
                ref,
                max_bytes=limits.max_bytes,
                timeout_seconds=limits.timeout_seconds,
                max_redirects=limits.max_redirects,
                allow_private_networks=allow_private_networks,
            )
        except FetchError as exc:
            raise _Refused(str(exc)) from exc
    # A one-letter "scheme" is a Windows drive (C:\...), i.e. a local path.
    if scheme == "file" or scheme == "" or len(scheme) == 1:
        if not allow_local:
            raise _Refused(
                "local files are not allowed on this worker; pass an s3:// or http(s):// reference "
                "(the client uploads local files for you)"
            )
        return _read_local(
            _local_path(ref, parts.netloc, parts.path if scheme == "file" else None, base_dir), limits
        )
    raise _Refused(f"unsupported scheme '{scheme}://'; use s3://, http:// or https://")


def _read_s3(
    ref: str,
    bucket: str,
    store_factory: StoreFactory,
    limits: InputLimits,
    s3_buckets: Collection[str] | None,
) -> bytes:
    if not bucket:
        raise _Refused("expected s3://bucket/key")
    allowed = configured_s3_buckets() if s3_buckets is None else s3_buckets
    # Exact match on the whole authority: "s3://user@bucket" or "s3://bucket:1" is not "bucket".
    if ANY_BUCKET not in allowed and bucket not in allowed:
        raise _Refused(
            f"bucket {bucket!r} is not allowed for input images on this worker "
            "(DG_INPUT_S3_BUCKETS; by default only the artifact bucket of DG_STORAGE_URL): "
            "use an allowed bucket or an http(s):// URL, or ask the operator to add the bucket"
        )
    try:
        return store_factory(f"s3://{bucket}").get_bytes(ref, max_bytes=limits.max_bytes)
    except ObjectNotFoundError as exc:
        raise _Refused("not found in object storage") from exc
    except StorageUnavailable:
        raise  # the store is down, not the input bad: the runner retries and requeues (docs/jobs.md)
    except StorageError as exc:
        raise _Refused(str(exc)) from exc


def _local_path(
    ref: str, netloc: str, file_uri_path: str | None, base_dir: str | os.PathLike[str] | None
) -> Path:
    if file_uri_path is not None:
        if netloc not in {"", "localhost"}:
            raise _Refused("file:// URIs must name a local path (file:///dir/image.png)")
        path = Path(url2pathname(unquote(file_uri_path)))
    else:
        path = Path(ref).expanduser()
    if not path.is_absolute():
        path = Path(base_dir or os.getcwd()) / path
    return path


def _read_local(path: Path, limits: InputLimits) -> bytes:
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise _Refused("not a regular file")
        if size > limits.max_bytes:
            raise _Refused(f"{size} bytes, over the limit of {limits.max_bytes} bytes")
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise _Refused(f"no such file: {path}") from exc
    except OSError as exc:
        raise _Refused(f"cannot read {path}: {exc.strerror or exc}") from exc


def decode_image(data: bytes, limits: InputLimits) -> Image.Image:
    """Decode to RGB, checking the pixel count from the header before any pixel data is decoded."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between its own limit and twice that; make it an error we can report.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                reason = _pixel_limit_reason(image.size, limits.max_pixels)
                if reason:
                    raise _Refused(reason)
                image.load()
                return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _Refused(_bomb_reason(exc, limits.max_pixels)) from exc
    except UnidentifiedImageError as exc:
        raise _Refused(
            f"not a readable image: unknown or unsupported format (starts with {data[:8]!r})"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _Refused(f"not a readable image: {exc}") from exc


def pixel_limit_problem(source: bytes | str | os.PathLike[str], max_pixels: int) -> str | None:
    """The decompression-bomb guard of :func:`decode_image` on its own, for checks before submitting:
    why ``source`` (image bytes or a file) is over ``max_pixels`` (DG_INPUT_MAX_PIXELS), read from its
    header only, or None. An unreadable image is None here: decoding it reports that."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                return _pixel_limit_reason(image.size, max_pixels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return _bomb_reason(exc, max_pixels)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        return None


def _pixel_limit_reason(size: tuple[int, int], max_pixels: int) -> str | None:
    width, height = size
    if width * height <= max_pixels:
        return None
    return (
        f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels} pixels "
        "(DG_INPUT_MAX_PIXELS, a decompression-bomb guard)"
    )


def _bomb_reason(exc: Exception, max_pixels: int) -> str:
    """PIL refused the header itself (over its own MAX_IMAGE_PIXELS): name the limit that applies."""
    pil_limit = Image.MAX_IMAGE_PIXELS or max_pixels
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f"Image size ({found[1]} pixels)" if found else "Image size"
    if max_pixels <= pil_limit:
        limit = f"the limit of {max_pixels} pixels (DG_INPUT_MAX_PIXELS)"
    else:
        limit = f"PIL's limit of {pil_limit} pixels (DG_INPUT_MAX_PIXELS cannot raise it)"
    return f"refused as a possible decompression bomb: {size} is over {limit}"
