"""PNG bytes for artifacts: text metadata (prompt, parameters, seed, model, job id) and facts for the artifact row."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from typing import Any, NamedTuple

from PIL import Image, PngImagePlugin

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Modes PNG stores natively; anything else is converted to RGB before encoding.
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"})
# A fixed level keeps bytes identical across runs; 6 is zlib's usual speed/size balance.
_COMPRESS_LEVEL = 6


class PngError(ValueError):
    """The bytes are not a readable PNG, or metadata cannot be stored in one."""


class PngSummary(NamedTuple):
    """What an artifact row records about a PNG."""

    width: int
    height: int
    sha256: str
    size: int


def generation_metadata(
    *, prompt: str, parameters: Mapping[str, Any], seed: int, model: str, job_id: str, **extra: str
) -> dict[str, str]:
    """The standard text chunks for a generated image; ``parameters`` is stored as canonical JSON."""
    return {
        "prompt": prompt,
        "parameters": json.dumps(parameters, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
        "seed": str(seed),
        "model": model,
        "job_id": str(job_id),
        **extra,
    }


def encode_png(image: Image.Image, metadata: Mapping[str, str]) -> bytes:
    """Encode ``image`` as PNG with ``metadata`` as text chunks.

    The same pixels and metadata always give the same bytes: keys are written sorted, the
    compression level is fixed and no timestamp chunk is written. Latin-1 values go into tEXt
    chunks, anything else into UTF-8 iTXt chunks.
    """
    info = PngImagePlugin.PngInfo()
    for key in sorted(metadata):
        value = metadata[key]
        _check_keyword(key)
        if not isinstance(value, str):
            raise PngError(f"PNG metadata value for {key!r} must be a str, got {type(value).__name__}")
        try:
            value.encode("latin-1")
            info.add_text(key, value)
        except UnicodeEncodeError:
            info.add_itxt(key, value)
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info, compress_level=_COMPRESS_LEVEL, optimize=False)
    return out.getvalue()


def read_png_metadata(data: bytes) -> dict[str, str]:
    """The text chunks (tEXt, zTXt and iTXt) of a PNG, as a plain dict."""
    image = _open_png(data)
    with image:
        try:
            image.load()  # text chunks after the image data are only seen once the data is read
        except (OSError, SyntaxError, ValueError) as exc:
            raise PngError(f"not a readable PNG: {exc}") from exc
        return {str(key): str(value) for key, value in image.text.items()}


def png_info(data: bytes) -> PngSummary:
    """Width, height, sha256 (hex) and byte size of a PNG, read from its header."""
    with _open_png(data) as image:
        width, height = image.size
    return PngSummary(width, height, hashlib.sha256(data).hexdigest(), len(data))


def _open_png(data: bytes) -> PngImagePlugin.PngImageFile:
    if not data.startswith(PNG_SIGNATURE):
        raise PngError(f"not a PNG: the data starts with {data[:8]!r}, not the PNG signature")
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
    except (OSError, SyntaxError, ValueError) as exc:
        raise PngError(f"not a readable PNG: {exc}") from exc
    assert isinstance(image, PngImagePlugin.PngImageFile)
    return image


def _check_keyword(key: str) -> None:
    # PNG keywords: 1-79 Latin-1 characters, no leading/trailing/double spaces.
    try:
        key.encode("latin-1")
    except UnicodeEncodeError as exc:
        raise PngError(f"PNG metadata key {key!r} must be Latin-1 text") from exc
    if not 1 <= len(key) <= 79 or key != key.strip() or "  " in key:
        raise PngError(f"PNG metadata key {key!r} must be 1-79 characters without leading/trailing spaces")
