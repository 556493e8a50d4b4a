"""Time one CFG denoise step of the DiT: stock diffusers SD3 vs DeepGen's `DeepGenSD3Transformer`.

Both models get the same random weights (ours loads the stock state dict), the same inputs
(batch 2 = [negative; positive], 512x512 -> 1024 image tokens, ~150 context tokens) and run under
`torch.inference_mode`. Each case: warm-up calls, then `--repeats` timed calls, each closed by a
device synchronize; the table shows the median and min in milliseconds. Needs only torch, diffusers
(and this repository's `worker/deepgen/transformer.py`, loaded by path).

    python3 bench/dit_step.py                                                # tiny geometry, CPU ok
    python3 bench/dit_step.py --full-size --device cuda --dtype bfloat16     # SD3.5-Medium geometry

Cases: stock (t2i); ours t2i (must equal stock); stock at the edit's token count (2048 image
tokens, as a 64x128 latent); ours edit (one 64x64 reference latent per row: 1024 target + 1024
reference tokens, nothing padded, so no mask); ours padded edit (rows with references of different
sizes: the boolean-mask path the reference always took).
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from diffusers import SD3Transformer2DModel

from worker.deepgen.geometry import SD35_MEDIUM_TRANSFORMER

TRANSFORMER_PY = Path(__file__).resolve().parent.parent / "worker" / "deepgen" / "transformer.py"

SD35_MEDIUM = SD35_MEDIUM_TRANSFORMER  # the released DiT geometry, one source
TINY = dict(
    sample_size=32,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    caption_projection_dim=16,
    pooled_projection_dim=32,
    pos_embed_max_size=96,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_transformer_module() -> ModuleType:
    """Our DiT module by file path: importing the `worker` package would pull in the job system."""
    spec = importlib.util.spec_from_file_location("deepgen_transformer", TRANSFORMER_PY)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {TRANSFORMER_PY}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(call: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of `repeats` calls after `warmup` untimed ones, each ended by a synchronize."""
    for _ in range(warmup):
        call()
    synchronize(device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        synchronize(device)
        times.append((time.perf_counter() - started) * 1000)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full-size", action="store_true", help="SD3.5-Medium geometry (default: tiny)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on cuda, else float32"
    )
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (multiple of 16)")
    parser.add_argument("--context-tokens", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="also print the top kernels of ours (t2i)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    geometry = SD35_MEDIUM if args.full_size else TINY
    latent = args.size // 8
    ours_module = load_transformer_module()

    torch.manual_seed(0)
    with torch.device(device):
        stock = SD3Transformer2DModel.from_config(geometry).to(dtype).eval()
        ours = ours_module.DeepGenSD3Transformer.from_config(geometry).to(dtype).eval()
    ours.load_state_dict(stock.state_dict())
    parameters = sum(parameter.numel() for parameter in stock.parameters())

    generator = torch.Generator(device).manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    batch = 2  # one CFG step: [negative; positive]
    latents = randn(1, geometry["in_channels"], latent, latent)
    common = dict(
        encoder_hidden_states=randn(batch, args.context_tokens, geometry["joint_attention_dim"]),
        pooled_projections=randn(batch, geometry["pooled_projection_dim"]),
        timestep=torch.full((batch,), 500.0, device=device),
        return_dict=False,
    )
    hidden = torch.cat([latents, latents])
    wide = randn(batch, geometry["in_channels"], latent, 2 * latent)  # the edit's token count for stock
    reference = randn(geometry["in_channels"], latent, latent)
    small_reference = randn(geometry["in_channels"], latent, latent - 8)

    cases: list[tuple[str, int, Callable[[], Any]]] = [
        ("stock SD3 t2i", latent * latent // 4, lambda: stock(hidden_states=hidden, **common)),
        ("ours t2i", latent * latent // 4, lambda: ours(hidden_states=hidden, **common)),
        ("stock SD3, edit token count", latent * latent // 2, lambda: stock(hidden_states=wide, **common)),
        (
            "ours edit, 1 reference",
            latent * latent // 2,
            lambda: ours(hidden_states=hidden, reference_latents=[[reference]] * batch, **common),
        ),
        (
            "ours edit, padded batch (masked)",
            latent * latent // 2,
            lambda: ours(hidden_states=hidden, reference_latents=[[reference], [small_reference]], **common),
        ),
    ]

    print(
        f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}"
        f", torch {torch.__version__}, diffusers {sys.modules['diffusers'].__version__}, dtype {dtype}"
    )
    print(
        f"geometry: {'SD3.5-Medium' if args.full_size else 'tiny'} ({parameters / 1e9:.3f} B parameters), "
        f"{args.size}x{args.size}, batch {batch}, {args.context_tokens} context tokens, "
        f"{args.warmup} warm-up + {args.repeats} timed calls per case\n"
    )

    with torch.inference_mode():
        stock_out = stock(hidden_states=hidden, **common)[0]
        ours_out = ours(hidden_states=hidden, **common)[0]
        difference = (stock_out.float() - ours_out.float()).abs().max().item()
        rows = []
        for name, image_tokens, call in cases:
            times = time_call(call, device, args.warmup, args.repeats)
            rows.append((name, image_tokens, statistics.median(times), min(times)))

        print("| case | image tokens/row | median ms | min ms |")
        print("|---|---|---|---|")
        for name, image_tokens, median, best in rows:
            print(f"| {name} | {image_tokens} | {median:.2f} | {best:.2f} |")
        print(f"\nmax |stock - ours| on the t2i step: {difference:.3g} (same weights, same inputs)")

        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=activities) as profiler:
                for _ in range(3):
                    ours(hidden_states=hidden, **common)
                synchronize(device)
            sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
            print(profiler.key_averages().table(sort_by=sort_by, row_limit=15))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
