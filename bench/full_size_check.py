"""Full-size DeepGen on a GPU with random weights: t2i and a two-image edit, CUDA graphs on vs off.

For each request: seconds per image, per denoise step and peak GPU memory with graphs off and on,
and whether the two PNGs are byte-identical (the tiny-model check is `bench/gpu_check.py`).
Random weights: the images are noise, but deterministic for a seed, which is all the check needs.

    python3 bench/full_size_check.py --output bench/results/full_size_check.md
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.engine import FULL_GEOMETRY, SMOKE_GEOMETRY, build_full_size_loaded, machine_description
from worker.deepgen import cuda_graphs
from worker.deepgen.engine import DeepGenEngine
from worker.deepgen.types import GenerationRequest


def striped(size: int, colours: tuple[tuple[int, int, int], ...]) -> Image.Image:
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    band = size // len(colours)
    for index, colour in enumerate(colours):
        pixels[index * band : (index + 1) * band] = colour
    return Image.fromarray(pixels)


def requests(steps: int) -> dict[str, GenerationRequest]:
    first = striped(512, ((200, 30, 30), (30, 200, 30), (30, 30, 200)))
    second = striped(512, ((240, 240, 20), (20, 20, 20)))
    return {
        "t2i 512x512": GenerationRequest(
            kind="t2i",
            prompt="a red fox in fresh snow",
            height=512,
            width=512,
            num_inference_steps=steps,
            seed=7,
        ),
        "edit, 2 images": GenerationRequest(
            kind="edit",
            prompt="make it look like winter",
            images=(first, second),
            num_inference_steps=steps,
            seed=7,
        ),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the script itself")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("full_size_check: no CUDA device", flush=True)
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    geometry = SMOKE_GEOMETRY if args.smoke else FULL_GEOMETRY
    started = time.perf_counter()
    loaded = build_full_size_loaded(
        device, torch.float32 if args.smoke else torch.bfloat16, offload=False, geometry=geometry
    )
    print(f"built {geometry['name']} in {time.perf_counter() - started:.1f} s", flush=True)
    rows: list[str] = []
    failures = 0
    for name, request in requests(args.steps).items():
        outputs: dict[bool, bytes] = {}
        for graphs in (False, True):
            engine = DeepGenEngine(
                dataclasses.replace(loaded, env=dataclasses.replace(loaded.env, cuda_graphs=graphs))
            )
            engine.generate(dataclasses.replace(request, num_inference_steps=2))  # warm-up
            before = dict(cuda_graphs.graph_counts)
            synchronize(device)
            t0 = time.perf_counter()
            result = engine.generate(request)
            synchronize(device)
            seconds = time.perf_counter() - t0
            fell_back = cuda_graphs.graph_counts["fell_back"] - before.get("fell_back", 0)
            outputs[graphs] = png(result.image)
            row = (
                f"| {name} | {'on' if graphs else 'off'} | {result.width}x{result.height} | {args.steps} | "
                f"{seconds:.3f} | {result.timings['denoise_per_step'] * 1000:.1f} | "
                f"{result.timings.get('encode', float('nan')):.3f} | {result.peak_memory_bytes / 2**30:.2f} | "
                f"{fell_back} | {hashlib.sha256(outputs[graphs]).hexdigest()[:12]} |"
            )
            rows.append(row)
            print(row, f"[{time.perf_counter() - started:.1f} s]", flush=True)
            failures += fell_back
            del engine
        if outputs[False] != outputs[True]:
            failures += 1
            a = np.asarray(Image.open(io.BytesIO(outputs[False])), dtype=np.int16)
            b = np.asarray(Image.open(io.BytesIO(outputs[True])), dtype=np.int16)
            print(f"MISMATCH {name}: max abs pixel difference {int(np.abs(a - b).max())}", flush=True)
        else:
            print(f"identical: {name}, graphs on vs off", flush=True)
    command = "python3 bench/full_size_check.py" + (f" --steps {args.steps}" if args.steps != 50 else "")
    text = "\n".join(
        [
            "# Full-size DeepGen, random weights: CUDA graphs on vs off",
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {machine_description(device)}",
            "",
            "| request | CUDA graphs | size | steps | seconds per image | ms per denoise step | encode s | "
            "peak GiB | graph fallbacks | PNG sha256 |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Result: "
            + (
                "PASSED (graphs on and off give byte-identical PNGs)"
                if failures == 0
                else f"FAILED ({failures} problems)"
            ),
            "",
        ]
    )
    if args.output:
        args.output.write_text(text)
    print(text, flush=True)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
