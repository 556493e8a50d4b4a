"""Thumbnails of a job's images: small WebP files stored beside the PNGs, for galleries.

The worker makes one per artifact when it stores the job's images (`worker.runner`) and records
its URI on the artifact row (`artifacts.thumbnail_uri`). The key sits beside the PNG's:
``jobs/<job_id>/<attempt>/<index>.png`` -> ``jobs/<job_id>/<attempt>/<index>.thumb.webp``, so the
cleanup of an attempt's objects finds both. Jobs stored before thumbnails existed have none; the
dashboard makes theirs from the PNG when asked (`make_thumbnail`, kept in its memory only).

A thumbnail fits in `THUMBNAIL_SIDE` x `THUMBNAIL_SIDE` pixels (aspect ratio kept, never
enlarged) and is at most `THUMBNAIL_MAX_BYTES`: the quality steps down until it fits, then the
side shrinks. Pillow without WebP support falls back to JPEG (same key suffix rule: `.thumb.jpg`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, features

THUMBNAIL_SIDE = 256
THUMBNAIL_MAX_BYTES = 30_000
THUMBNAIL_MAX_SOURCE_PIXELS = 64_000_000  # a PNG larger than this is not decoded (decompression bomb)
_QUALITIES = (80, 70, 60, 50, 40, 30)
_WEBP = features.check("webp")
THUMBNAIL_SUFFIX = ".thumb.webp" if _WEBP else ".thumb.jpg"
THUMBNAIL_CONTENT_TYPE = "image/webp" if _WEBP else "image/jpeg"


class ThumbnailError(ValueError):
    """The source bytes are not an image this module can shrink."""


@dataclass(frozen=True)
class Thumbnail:
    data: bytes
    width: int
    height: int
    content_type: str = THUMBNAIL_CONTENT_TYPE


def thumbnail_key(png_key: str) -> str:
    """The thumbnail's key (or URI) beside a PNG's: ``.../0.png`` -> ``.../0.thumb.webp``."""
    if not png_key.endswith(".png"):
        raise ValueError(f"expected a .png key or URI, got {png_key!r}")
    return png_key[: -len(".png")] + THUMBNAIL_SUFFIX


def make_thumbnail(
    data: bytes, *, side: int = THUMBNAIL_SIDE, max_bytes: int = THUMBNAIL_MAX_BYTES
) -> Thumbnail:
    """A WebP (or JPEG) of at most ``side`` px a side and ``max_bytes`` bytes from image bytes."""
    try:
        with Image.open(io.BytesIO(data)) as source:
            width, height = source.size
            if width * height > THUMBNAIL_MAX_SOURCE_PIXELS:
                raise ThumbnailError(f"image of {width}x{height} pixels is too large to shrink")
            source.draft("RGB", (side, side))  # JPEG sources decode at a smaller scale
            image = source.convert("RGBA" if _has_alpha(source) else "RGB")
    except ThumbnailError:
        raise
    except Exception as exc:  # PIL raises many kinds for bad data: all mean "not an image"
        raise ThumbnailError(f"not a readable image ({type(exc).__name__}: {exc})") from exc
    return shrink_image(image, side=side, max_bytes=max_bytes)


def shrink_image(
    image: Image.Image, *, side: int = THUMBNAIL_SIDE, max_bytes: int = THUMBNAIL_MAX_BYTES
) -> Thumbnail:
    """`make_thumbnail` of an image already decoded (PIL)."""
    if side < 8:
        raise ValueError(f"side must be at least 8 pixels, got {side}")
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if _has_alpha(image) else "RGB")
    current = side
    while True:
        small = image.copy()
        small.thumbnail((current, current), Image.Resampling.LANCZOS)
        encoded = b""
        for quality in _QUALITIES:
            encoded = _encode(small, quality)
            if len(encoded) <= max_bytes:
                return Thumbnail(encoded, small.width, small.height)
        if current <= 32:
            return Thumbnail(encoded, small.width, small.height)  # the smallest we make
        current = max(32, int(current * 0.75))


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def _encode(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    if _WEBP:
        image.save(out, format="WEBP", quality=quality, method=4)
    else:  # pragma: no cover - Pillow builds without libwebp
        image.convert("RGB").save(out, format="JPEG", quality=quality, optimize=True)
    return out.getvalue()
