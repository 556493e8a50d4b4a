"""PNG bytes for artifacts: text metadata and facts for the artifact row.

Each generated PNG carries our JSON record under the ``diffgentor`` text key (prompt, parameters,
seed, model, job id, and the image's position in its job's batch), the A1111-style plain-text ``parameters`` line that image browsers and the
Stable Diffusion web UI show, and the prompt, seed, model and job id as plain keys.
"""

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


METADATA_KEY = "diffgentor"  # our JSON record of the generation
A1111_KEY = "parameters"  # the plain-text line Stable Diffusion web UI and image browsers read
SAMPLER = "FlowMatchEuler"  # SD3.5's flow-matching Euler scheduler, as DeepGen samples


def generation_metadata(
    *,
    prompt: str,
    parameters: Mapping[str, Any],
    seed: int,
    model: str,
    job_id: str,
    image_index: int | None = None,
    **extra: str,
) -> dict[str, str]:
    """The text chunks for a generated image.

    * ``diffgentor``: our record as canonical JSON: prompt, parameters, seed, model, job_id,
      ``image_index`` when given (and ``extra``), read back with `read_generation_metadata`;
    * ``parameters``: the A1111-style plain text other tools show (`a1111_parameters`);
    * ``prompt``, ``seed``, ``model``, ``job_id``, ``image_index`` (and ``extra``) as plain keys, for
      simple readers.

    ``image_index`` is the image's position j in its job's batch (``num_images_per_prompt`` images
    share one seed; image j starts from row j of the seed's noise draw, so seed, j and the batch size
    together reproduce it).
    """
    record: dict[str, Any] = {
        "prompt": prompt,
        "parameters": dict(parameters),
        "seed": seed,
        "model": model,
        "job_id": str(job_id),
        **extra,
    }
    plain = {"prompt": prompt, "seed": str(seed), "model": model, "job_id": str(job_id), **extra}
    if image_index is not None:
        record["image_index"] = image_index
        plain["image_index"] = str(image_index)
    return {
        METADATA_KEY: json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
        A1111_KEY: a1111_parameters(prompt, parameters, seed=seed, model=model, image_index=image_index),
        **plain,
    }


def a1111_parameters(
    prompt: str, parameters: Mapping[str, Any], *, seed: int, model: str, image_index: int | None = None
) -> str:
    """Stable Diffusion web UI's ``parameters`` text: the prompt, ``Negative prompt: ...`` when there
    is one, then ``Steps: 50, Sampler: FlowMatchEuler, CFG scale: 4.0, Seed: 7, Size: 512x512, Model: deepgen``
    (Size is width x height; a value with a comma, colon or line break is JSON-quoted, as A1111 does).
    An image of a batch (``num_images_per_prompt`` over 1) adds A1111's ``Batch size: 4, Batch pos: 2``
    (the position counted from 0, as A1111 counts it)."""
    fields: list[tuple[str, Any]] = []
    if parameters.get("num_inference_steps") is not None:
        fields.append(("Steps", int(parameters["num_inference_steps"])))
    fields.append(("Sampler", SAMPLER))
    if parameters.get("guidance_scale") is not None:
        fields.append(("CFG scale", float(parameters["guidance_scale"])))
    fields.append(("Seed", seed))
    if parameters.get("width") and parameters.get("height"):
        fields.append(("Size", f"{int(parameters['width'])}x{int(parameters['height'])}"))
    fields.append(("Model", model))
    batch_size = parameters.get("num_images_per_prompt")
    if image_index is not None and batch_size is not None and int(batch_size) > 1:
        fields.append(("Batch size", int(batch_size)))
        fields.append(("Batch pos", image_index))
    lines = [prompt]
    negative = parameters.get("negative_prompt")
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{name}: {_a1111_value(value)}" for name, value in fields))
    return "\n".join(lines)


def _a1111_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(char in text for char in ",:\n") else text


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


def read_generation_metadata(data: bytes) -> dict[str, Any]:
    """Our record of a generated PNG: prompt, parameters (a dict), seed, model, job_id.

    Reads the ``diffgentor`` JSON chunk; PNGs written before it existed kept the parameters as JSON
    under ``parameters`` (now the A1111 text) and the rest as plain keys, which are read instead.
    """
    text = read_png_metadata(data)
    if METADATA_KEY in text:
        try:
            record = json.loads(text[METADATA_KEY])
        except ValueError as exc:
            raise PngError(f"the {METADATA_KEY!r} PNG text chunk is not JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise PngError(f"the {METADATA_KEY!r} PNG text chunk is not a JSON object")
        return record
    try:
        parameters = json.loads(text.get(A1111_KEY, "{}"))
    except ValueError:
        parameters = {}
    seed = text.get("seed", "")
    return {
        "prompt": text.get("prompt"),
        "parameters": parameters if isinstance(parameters, dict) else {},
        "seed": int(seed) if seed.isdigit() else None,
        "model": text.get("model"),
        "job_id": text.get("job_id"),
    }


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
