"""DeepGen engine benchmark: seconds per stage, images per second and peak memory.

Default: the tiny random model (written to a temporary folder, loaded through DG_DEEPGEN_* exactly
as real weights) at 64x64 and 512x512. `--full-size-random`: the real DeepGen geometry
(Qwen2.5-VL-3B + SD3.5-Medium DiT/VAE, connector 2048x6) with random weights built directly on the
device, bf16, 512x512, 50 steps: stage offload off/on x CUDA graphs off/on (graphs only on CUDA), one
warm-up + one timed call per row. No files, no hub access.

Every configuration runs once per `--images` value (default 1 and 4 images per prompt, i.e. one
batched DiT call making N images): the rows give seconds per call, images per second and the
peak memory, and a summary line per configuration the N=4 / N=1 throughput ratio.

    .venv/bin/python bench/engine.py                       # -> bench/results/engine.md
    .venv/bin/python bench/engine.py --full-size-random    # on a GPU -> bench/results/engine_full_size.md
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `python3 bench/engine.py` puts bench/ first on sys.path, not the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from worker.deepgen import cuda_graphs
from worker.deepgen.configuration import DEFAULT_CONNECTOR, DEFAULT_NUM_QUERIES
from worker.deepgen.engine import DeepGenEngine
from worker.deepgen.geometry import (
    QWEN25_VL_3B_TEXT,
    QWEN25_VL_3B_VISION,
    SD35_MEDIUM_TRANSFORMER,
    SD35_MEDIUM_VAE,
)
from worker.deepgen.types import GenerationRequest

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "a photograph of a red fox standing in fresh snow, morning light"

# The released config's defaults; sdpa is the same function as FA2 here (the connector has no mask).
CONNECTOR = {**DEFAULT_CONNECTOR, "attn_implementation": "sdpa"}
NUM_QUERIES = DEFAULT_NUM_QUERIES


def machine_description(device: torch.device) -> str:
    parts = [
        f"{platform.platform()}",
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"{os.cpu_count()} CPUs",
        f"threads {torch.get_num_threads()}",
        "load average at start {:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg()),
    ]
    if device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    return ", ".join(parts)


def run_request(engine: DeepGenEngine, size: int, steps: int, images: int, seed: int = 0) -> dict[str, Any]:
    request = GenerationRequest(
        kind="t2i",
        prompt=PROMPT,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=4.0,
        seed=seed,
        num_images_per_prompt=images,
    )
    started = time.perf_counter()
    result = engine.generate(request)
    wall = time.perf_counter() - started
    assert len(result.images) == images
    return {
        "size": size,
        "steps": steps,
        "images": images,
        "seconds_per_call": wall,
        "seconds_per_image": wall / images,
        "images_per_second": images / wall,
        "peak_memory_mib": result.peak_memory_bytes / 2**20,
        **{f"{stage}_s": value for stage, value in result.timings.items()},
    }


def measure(
    engine: DeepGenEngine, size: int, steps: int, repeats: int, image_counts: list[int]
) -> list[dict[str, Any]]:
    """One row per image count: the best of `repeats` calls, the counts' calls interleaved so that
    load from other processes hits every count alike."""
    for images in image_counts:  # warm-up: allocator, kernels, lazy processor install
        run_request(engine, size, min(steps, 2), images)
    runs: dict[int, list[dict[str, Any]]] = {images: [] for images in image_counts}
    for index in range(repeats):
        for images in image_counts:
            runs[images].append(run_request(engine, size, steps, images, seed=index))
    rows = []
    for images in image_counts:
        best = min(runs[images], key=lambda run: run["seconds_per_call"])
        best["repeats"] = repeats
        best["seconds_per_call_median"] = statistics.median(run["seconds_per_call"] for run in runs[images])
        rows.append(best)
    return rows


def tiny_rows(steps: int, repeats: int, image_counts: list[int]) -> list[dict[str, Any]]:
    from worker.deepgen import tiny

    with tempfile.TemporaryDirectory() as folder:
        paths = tiny.write_tiny_model(Path(folder))
        engine = DeepGenEngine.from_env(tiny.tiny_env(paths))
        return [
            dict(model="tiny", offload=False, **row)
            for size in (64, 512)
            for row in measure(engine, size, steps, repeats, image_counts)
        ]


def build_full_size_loaded(
    device: torch.device, dtype: torch.dtype, offload: bool, geometry: dict[str, Any]
) -> Any:
    """A LoadedDeepGen with the real geometry and random weights, created directly on `device`."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from worker.deepgen.configuration import load_config
    from worker.deepgen.connector import ConnectorConfig
    from worker.deepgen.env import DeepGenEnv
    from worker.deepgen.loading import LoadedDeepGen
    from worker.deepgen.model import DeepGenModel
    from worker.deepgen.tiny import build_tokenizer
    from worker.deepgen.transformer import DeepGenSD3Transformer

    tokenizer = build_tokenizer()  # local BPE with Qwen's special tokens (ids read, never hard-coded)
    special = {
        name: tokenizer.convert_tokens_to_ids(name)
        for name in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    }
    lmm_config = Qwen2_5_VLConfig(
        text_config=geometry["text"],
        vision_config=geometry["vision"],
        image_token_id=special["<|image_pad|>"],
        video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"],
        vision_end_token_id=special["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    lmm_config._attn_implementation = "sdpa"
    lmm_config.text_config._attn_implementation = "sdpa"
    lmm_config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        lmm = Qwen2_5_VLForConditionalGeneration(lmm_config).to(dtype)
        transformer = DeepGenSD3Transformer.from_config(geometry["dit"]).to(dtype)
        vae = AutoencoderKL.from_config(geometry["vae"]).to(dtype)
        model = DeepGenModel(
            lmm=lmm,
            transformer=transformer,
            connector=ConnectorConfig(**geometry["connector"]),
            num_queries=geometry["num_queries"],
        ).to(dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    config = load_config("deepgen")
    env = DeepGenEnv(
        config=config,
        config_name="deepgen",
        diffusion_model_path=Path("/random-weights"),
        ar_model_path=Path("/random-weights"),
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        offload=offload,
        attention="sdpa",
    )
    return LoadedDeepGen(
        model=model.eval(),
        vae=vae.eval(),
        scheduler=scheduler,
        tokenizer=tokenizer,
        env=env,
        report=None,
        device=device,
        dtype=dtype,
        provenance={"weights": "random (benchmark)", "geometry": geometry["name"]},
    )


FULL_GEOMETRY = dict(
    name="DeepGen 1.0 (Qwen2.5-VL-3B + SD3.5-M)",
    text=QWEN25_VL_3B_TEXT,
    vision=QWEN25_VL_3B_VISION,
    dit=SD35_MEDIUM_TRANSFORMER,
    vae=SD35_MEDIUM_VAE,
    connector=CONNECTOR,
    num_queries=NUM_QUERIES,
)
# Same code path at toy sizes, to check the full-size mode on a CPU before spending GPU time.
SMOKE_GEOMETRY = dict(
    name="smoke (toy sizes)",
    text={
        **QWEN25_VL_3B_TEXT,
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "rope_parameters": dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]),
    },
    vision={
        **QWEN25_VL_3B_VISION,
        "depth": 1,
        "hidden_size": 32,
        "intermediate_size": 32,
        "num_heads": 2,
        "fullatt_block_indexes": [0],
        "out_hidden_size": 64,
    },
    dit={
        **SD35_MEDIUM_TRANSFORMER,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "caption_projection_dim": 16,
        "pooled_projection_dim": 32,
        "pos_embed_max_size": 64,
        "dual_attention_layers": (0,),
    },
    vae={**SD35_MEDIUM_VAE, "block_out_channels": (8, 8, 8, 8), "norm_num_groups": 4, "layers_per_block": 1},
    connector=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
    num_queries=8,
)


def full_size_rows(
    device: torch.device, size: int, steps: int, repeats: int, smoke: bool, image_counts: list[int]
) -> list[dict[str, Any]]:
    geometry = SMOKE_GEOMETRY if smoke else FULL_GEOMETRY
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    started = time.perf_counter()
    print(f"building {geometry['name']} with random weights on {device} ({dtype})", flush=True)
    loaded = build_full_size_loaded(device, dtype, offload=False, geometry=geometry)
    print(f"built in {time.perf_counter() - started:.1f} s", flush=True)
    graph_options = (False, True) if device.type == "cuda" else (False,)  # graphs are CUDA-only
    for offload in (False, True):
        for graphs in graph_options:
            env = dataclasses.replace(loaded.env, offload=offload, cuda_graphs=graphs)
            engine = DeepGenEngine(dataclasses.replace(loaded, env=env))
            before = dict(cuda_graphs.graph_counts)
            measured = measure(engine, size, steps, repeats, image_counts)
            # Proof that the graph path ran (a silent eager fallback would show fell_back > 0); counted
            # over the configuration's calls, every image count together.
            graph_stats = {
                f"graphs_{key}": cuda_graphs.graph_counts[key] - before.get(key, 0)
                for key in ("captured", "replayed", "fell_back")
            }
            for row in measured:
                rows.append(
                    dict(
                        model=geometry["name"],
                        dtype=str(dtype),
                        offload=offload,
                        cuda_graphs=graphs,
                        **row,
                        **graph_stats,
                    )
                )
                print(json.dumps(rows[-1]), f"[{time.perf_counter() - started:.1f} s]", flush=True)
            del engine
    del loaded
    gc.collect()
    return rows


def batch_summary(rows: list[dict[str, Any]]) -> list[str]:
    """One line per configuration: images per second at each N, relative to N=1."""
    groups: dict[tuple[Any, ...], dict[int, dict[str, Any]]] = {}
    for row in rows:
        key = (row["model"], row["offload"], row.get("cuda_graphs"), row["size"], row["steps"])
        groups.setdefault(key, {})[row["images"]] = row
    lines = []
    for (model, offload, graphs, size, steps), by_count in groups.items():
        if 1 not in by_count or len(by_count) < 2:
            continue
        base = by_count[1]["images_per_second"]
        parts = [
            f"N={count}: {row['images_per_second']:.2f} img/s (x{row['images_per_second'] / base:.2f}, "
            f"peak {row['peak_memory_mib']:.0f} MiB)"
            for count, row in sorted(by_count.items())
        ]
        graph_note = "" if graphs is None else f", graphs {graphs}"
        lines.append(
            f"* {model}, offload {offload}{graph_note}, {size}px, {steps} steps: " + "; ".join(parts)
        )
    return lines


def write_markdown(path: Path, command: str, machine: str, rows: list[dict[str, Any]]) -> None:
    columns = [
        "model",
        "offload",
        "cuda_graphs",
        "size",
        "steps",
        "images",
        "seconds_per_call",
        "seconds_per_call_median",
        "images_per_second",
        "encode_s",
        "denoise_per_step_s",
        "decode_s",
        "peak_memory_mib",
        "graphs_fell_back",
    ]
    lines = [
        "# DeepGen engine benchmark\n",
        f"Command: `{command}`\n",
        f"Machine: {machine}\n",
        "Seconds are the best (and the median) of the repeats after one warm-up call, the image counts' "
        "calls interleaved; `images` is num_images_per_prompt "
        "(one batched DiT call per step makes them all; the VAE decodes them one at a time), "
        "`images_per_second` = images / seconds_per_call; peak memory is CUDA `max_memory_allocated` "
        "on a GPU, else the call's peak RSS growth.\n",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        cells = [
            f"{row.get(column, ''):.4f}" if isinstance(row.get(column), float) else str(row.get(column, ""))
            for column in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.extend(["", *batch_summary(rows)])
    lines.append("\nRaw rows:\n\n```json\n" + json.dumps(rows, indent=1) + "\n```\n")
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--full-size-random", action="store_true", help="real geometry, random weights, on device"
    )
    parser.add_argument("--smoke", action="store_true", help="with --full-size-random: toy sizes (CPU check)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--steps", type=int, default=None, help="default 4 (tiny) / 50 (full size)")
    parser.add_argument("--size", type=int, default=512, help="full-size mode image side")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (tiny) / 1 (full size)")
    parser.add_argument(
        "--images",
        default="1,4",
        help="comma-separated num_images_per_prompt values, each measured per configuration (default 1,4)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    image_counts = [int(value) for value in args.images.split(",") if value.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.full_size_random:
        rows = full_size_rows(
            device, args.size, args.steps or 50, args.repeats or 1, args.smoke, image_counts
        )
        output = args.output or RESULTS / (
            "engine_full_size_smoke.md" if args.smoke else "engine_full_size.md"
        )
    else:
        rows = tiny_rows(args.steps or 4, args.repeats or 3, image_counts)
        output = args.output or RESULTS / "engine.md"
    write_markdown(output, command, machine_description(device), rows)
    print(output.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
