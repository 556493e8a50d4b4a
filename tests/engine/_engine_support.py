"""Helpers shared by the engine generation tests (engines loaded through DG_DEEPGEN_* as in production)."""

from __future__ import annotations

import hashlib
import io

from PIL import Image

from worker.deepgen import tiny
from worker.deepgen.engine import DeepGenEngine


def load_tiny_engine(paths: tiny.TinyModelPaths, **overrides: str) -> DeepGenEngine:
    # "dynamic" keeps small inputs small: the tiny DiT's positional table only covers 512 pixels.
    settings = {"IMAGE_RESIZE_MODE": "dynamic", **overrides}
    return DeepGenEngine.from_env(tiny.tiny_env(paths, **settings))


def png_bytes(image: Image.Image) -> bytes:
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
