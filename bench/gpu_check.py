"""GPU check of DG_DEEPGEN_CUDA_GRAPHS: graphs on must give byte-identical PNGs to graphs off.

Builds the tiny random DeepGen model (`worker.deepgen.tiny`) in a temporary folder, loads it on CUDA
through DG_DEEPGEN_* three times (graphs off; graphs on; graphs on with stage offload) and runs a t2i
and a two-image edit on each. Fails (exit 1) when an image differs (printing the max abs pixel
difference), or when the graph path did not really run (a silent eager fallback would also match).
Needs only torch, transformers, diffusers, safetensors, Pillow and numpy.

    python3 bench/gpu_check.py
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `python3 bench/gpu_check.py` puts bench/ first on sys.path, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from PIL import Image

from worker.deepgen import cuda_graphs, tiny
from worker.deepgen.engine import DeepGenEngine
from worker.deepgen.types import GenerationRequest


def striped(width: int, height: int, colours: tuple[tuple[int, int, int], ...]) -> Image.Image:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    stripe = max(1, width // len(colours))
    for x in range(width):
        pixels[:, x] = colours[min(x // stripe, len(colours) - 1)]
    return Image.fromarray(pixels)


REQUESTS = {
    "t2i": GenerationRequest(
        kind="t2i",
        prompt="a red fox in snow",
        width=256,
        height=192,
        num_inference_steps=8,
        guidance_scale=4.0,
        seed=7,
    ),
    "edit (2 images)": GenerationRequest(
        kind="edit",
        prompt="make the sky purple",
        images=(
            striped(200, 144, ((220, 20, 20), (20, 20, 220))),
            striped(120, 256, ((20, 200, 20), (250, 250, 250), (20, 200, 20))),
        ),
        num_inference_steps=8,
        guidance_scale=4.0,
        seed=11,
    ),
}
VARIANTS = {
    "graphs off": {},
    "graphs on": {"CUDA_GRAPHS": "1"},
    "graphs on + offload": {"CUDA_GRAPHS": "1", "OFFLOAD": "1"},
}


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", flush=True)
        return 2
    print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    failures = 0
    with tempfile.TemporaryDirectory() as folder:
        paths = tiny.write_tiny_model(Path(folder))
        images: dict[str, dict[str, Image.Image]] = {}
        for variant, overrides in VARIANTS.items():
            # "dynamic" keeps the inputs small: the tiny DiT's positional table covers 512 pixels.
            engine = DeepGenEngine.from_env(
                tiny.tiny_env(paths, DEVICE="cuda", IMAGE_RESIZE_MODE="dynamic", **overrides)
            )
            images[variant] = {}
            for name, request in REQUESTS.items():
                before = dict(cuda_graphs.graph_counts)
                result = engine.generate(request)
                images[variant][name] = result.image
                counts = {
                    key: cuda_graphs.graph_counts[key] - before.get(key, 0)
                    for key in ("captured", "replayed", "fell_back")
                }
                expected = (
                    {"captured": 1, "replayed": request.num_inference_steps, "fell_back": 0}
                    if "CUDA_GRAPHS" in overrides
                    else {"captured": 0, "replayed": 0, "fell_back": 0}
                )
                digest = hashlib.sha256(png(result.image)).hexdigest()[:16]
                status = "ok" if counts == expected else f"FAIL: graph counts {counts}, expected {expected}"
                failures += counts != expected
                print(
                    f"  {variant:20s} {name:16s} {result.width}x{result.height} png {digest} "
                    f"denoise/step {result.timings['denoise_per_step'] * 1000:.2f} ms  {status}",
                    flush=True,
                )
            del engine
            torch.cuda.empty_cache()
    for variant in VARIANTS:
        if variant == "graphs off":
            continue
        for name in REQUESTS:
            reference, candidate = images["graphs off"][name], images[variant][name]
            if png(reference) == png(candidate):
                print(f"identical: {variant} vs graphs off, {name}", flush=True)
                continue
            failures += 1
            difference = np.abs(np.asarray(reference, dtype=np.int16) - np.asarray(candidate, dtype=np.int16))
            print(
                f"MISMATCH: {variant} vs graphs off, {name}: max abs pixel difference {int(difference.max())}, "
                f"{int((difference > 0).any(axis=-1).sum())} pixels differ",
                flush=True,
            )
    print("gpu_check: " + ("PASSED" if failures == 0 else f"FAILED ({failures} problems)"), flush=True)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
