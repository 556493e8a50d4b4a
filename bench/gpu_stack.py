"""Full-stack GPU check: a real `diffgentor worker` running the full-size random-weight DeepGen model.

    python -m bench.gpu_stack                 # GPU: the issue's counts (30 t2i, 10 edits, ...)
    python -m bench.gpu_stack --quick         # GPU: 10 t2i, 4 edits, fewer of the rest
    python -m bench.gpu_stack --tiny --cpu    # CPU check of the script itself (tiny model, small counts)
    python -m bench.gpu_stack --smoke --cpu   # CPU check of the full-size writer (toy sizes, real layouts)

It starts its own services: a private `redis-server` on a free port (the binary must be installed),
a throw-away PostgreSQL database when a server answers at DG_BENCH_PG_ADMIN_URL (default
postgresql+psycopg://postgres@127.0.0.1:5432/test), else SQLite in a temporary folder, and an
in-process moto S3 server. The model is written to a temporary folder in the real on-disk layouts
(Qwen2.5-VL folder, diffusers `transformer/ vae/ scheduler/`, a DeepGen checkpoint with the
meta queries, projectors and connector) with random weights at the released geometry
(`worker/deepgen/geometry.py`), and loaded by the worker through DG_DEEPGEN_* like real weights.

Measured, each section written to the results file (default bench/results/gpu_stack.md) as soon as
it is known, with one JSON line per measurement (also printed):

1. t2i queued against direct: N t2i jobs (512 px, 50 steps) submitted at once through
   `DiffgentorClient` and run by the worker, from just before the submit to the last
   `finished_at`; then, with the worker stopped, the same N requests through `DeepGenEngine.generate`
   in this process on the same device. Ratio = direct / queued (target >= 0.98). Both warmed up.
2. two-image edits through the worker (seconds per job).
3. num_images_per_prompt 4 against 1 through the worker, in images per second.
4. accelerator memory: `diffgentor_accelerator_max_allocated_bytes` scraped from the worker's
   `/metrics` (DG_METRICS_PORT) after its jobs, against `torch.cuda.max_memory_allocated` of the
   direct engine after the same kinds of requests.
5. stage offload (DG_DEEPGEN_OFFLOAD=1): a second worker run, seconds per t2i job, the metric's
   peak, and the direct engine's offloaded encode time. Pinned host memory for offload: there is
   no setting for it in the engine, so it is reported as not done.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results"
PG_ADMIN_URL = os.environ.get("DG_BENCH_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MODEL_NAME = "deepgen"
PROMPT = "a photograph of a red fox standing in fresh snow, morning light"
EDIT_PROMPT = "make it look like winter"
GUIDANCE = 4.0
STARTED = time.monotonic()


def log(message: str) -> None:
    """A progress line with wall-clock time and seconds since start (a cut-short run still tells)."""
    stamp = datetime.now(timezone.utc).strftime("%H:%M:%S")
    print(f"[{stamp} +{time.monotonic() - STARTED:7.1f}s] {message}", flush=True)


# ------------------------------------------------------------------------------------ counts


@dataclasses.dataclass(frozen=True)
class Counts:
    t2i: int
    edits: int
    per_batch_size: int  # jobs at num_images_per_prompt 1 and again at 4
    offload_t2i: int
    steps: int
    size: int
    edit_size: int  # side of the two edit input images


FULL = Counts(t2i=30, edits=10, per_batch_size=4, offload_t2i=10, steps=50, size=512, edit_size=512)
QUICK = Counts(t2i=10, edits=4, per_batch_size=2, offload_t2i=4, steps=50, size=512, edit_size=512)
CPU_CHECK = Counts(t2i=3, edits=2, per_batch_size=1, offload_t2i=2, steps=2, size=64, edit_size=64)


# ------------------------------------------------------------------------------------ results


class Results:
    """The Markdown results file, appended section by section, plus a JSON line per measurement."""

    def __init__(self, path: Path, command: str, machine: dict[str, Any], on_gpu: bool) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        status = (
            "Ran on a GPU."
            if on_gpu
            else "**NOT yet run on a GPU.** This file is the CPU check of the script (tiny model, small "
            "counts): its figures say that every section runs end to end, not how fast a GPU is. The GPU "
            "run is `python -m bench.gpu_stack` (the issue's counts, full-size random weights; `--quick` for "
            "10 t2i and 4 edits), which writes this file again."
        )
        lines = [
            "# Full-stack GPU check (`bench/gpu_stack.py`)",
            "",
            f"Command: `{command}`",
            "",
            f"Started: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
            "",
            f"Machine: {', '.join(f'{key} {value}' for key, value in machine.items())}",
            "",
            status,
            "",
            "Sections are written as they are measured; a run cut short ends at its last section.",
            "",
        ]
        path.write_text("\n".join(lines) + "\n")

    def section(self, title: str, lines: Sequence[str], record: dict[str, Any] | None = None) -> None:
        text = [f"## {title}", "", *lines, ""]
        if record is not None:
            record = {"section": title, **record}
            self.records.append(record)
            line = json.dumps(record, default=str)
            print(line, flush=True)
            text += ["```json", line, "```", ""]
        with self.path.open("a") as handle:
            handle.write("\n".join(text) + "\n")
        log(f"section written: {title}")


def machine_facts(device: str) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load average": "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg()),
    }
    if device.startswith("cuda"):
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


# ------------------------------------------------------------------------------------ services


@contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    from worker.testing import RedisServer

    if shutil.which("redis-server") is None:
        raise SystemExit(
            "gpu_stack: the `redis-server` binary is not installed (apt-get install redis-server); "
            "the check starts its own Redis on a free port"
        )
    server = RedisServer(directory).start()
    try:
        yield server.url
    finally:
        server.stop()


def postgres_answers(admin_url: str) -> bool:
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(admin_url, connect_args={"connect_timeout": 3})
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        finally:
            engine.dispose()
        return True
    except Exception as error:  # any driver or connection error: fall back to SQLite
        log(f"PostgreSQL at {admin_url} does not answer ({type(error).__name__}); using SQLite")
        return False


@contextmanager
def job_database(directory: Path, force_sqlite: bool) -> Iterator[str]:
    from worker.db import upgrade
    from worker.testing import temporary_database

    if not force_sqlite and postgres_answers(PG_ADMIN_URL):
        with temporary_database(PG_ADMIN_URL, prefix="dg_gpu_stack_") as url:
            upgrade(url)
            yield url
        return
    url = f"sqlite:///{directory / 'jobs.sqlite3'}"
    upgrade(url)
    yield url


# ------------------------------------------------------------------------------------ model


def write_full_size_random(root: Path, device: str, smoke: bool) -> dict[str, str]:
    """Random weights at the released geometry (or `bench.engine.SMOKE_GEOMETRY`'s toy sizes), written
    in the real layouts; returns the DG_DEEPGEN_* variables that load them. Tensors are created on
    `device` in the run dtype (fast on a GPU), then saved."""
    import torch
    from diffusers.models import AutoencoderKL
    from diffusers.models.transformers import SD3Transformer2DModel
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from bench.engine import FULL_GEOMETRY, SMOKE_GEOMETRY
    from worker.deepgen.model import selected_layer_indices
    from worker.deepgen.tiny import build_tokenizer

    geometry: dict[str, Any] = SMOKE_GEOMETRY if smoke else FULL_GEOMETRY
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    ar, diffusion = root / "ar", root / "diffusion"
    ar.mkdir(parents=True)
    diffusion.mkdir(parents=True)
    started = time.perf_counter()

    tokenizer = build_tokenizer()  # local BPE with Qwen's special tokens (ids read, never hard-coded)
    tokenizer.save_pretrained(ar)
    special = {
        name: tokenizer.convert_tokens_to_ids(name)
        for name in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    }
    text = {**geometry["text"], "tie_word_embeddings": True}
    lmm_config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=geometry["vision"],
        image_token_id=special["<|image_pad|>"],
        video_token_id=special["<|video_pad|>"],
        vision_start_token_id=special["<|vision_start|>"],
        vision_end_token_id=special["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(device):
        lmm = Qwen2_5_VLForConditionalGeneration(lmm_config).to(dtype)  # type: ignore[arg-type]  # transformers wraps .to()
    lmm.save_pretrained(ar)
    del lmm
    log(f"wrote the AR folder ({geometry['name']}) in {time.perf_counter() - started:.1f} s")

    with torch.device(device):
        transformer = SD3Transformer2DModel(**geometry["dit"]).to(dtype)
    transformer.save_pretrained(diffusion / "transformer")
    transformer_config = dict(transformer.config)
    del transformer
    with torch.device(device):
        vae = AutoencoderKL(**geometry["vae"]).to(dtype)
    vae.save_pretrained(diffusion / "vae")
    del vae
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(
        diffusion / "scheduler"
    )
    model_index = {
        "_class_name": "StableDiffusion3Pipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (diffusion / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    log(f"wrote the diffusion folder in {time.perf_counter() - started:.1f} s")

    # The checkpoint's required families (docs/engine.md, 'Checkpoint key names'); the DiT stays the
    # folder's (a checkpoint's transformer keys are optional) and there are no LoRA keys.
    connector = geometry["connector"]
    hidden, inner, layers = (
        connector["hidden_size"],
        connector["intermediate_size"],
        connector["num_hidden_layers"],
    )
    text_hidden = text["hidden_size"]
    selected = len(selected_layer_indices(text["num_hidden_layers"]))
    pooled, joint = (
        int(transformer_config["pooled_projection_dim"]),
        int(transformer_config["joint_attention_dim"]),
    )
    generator = torch.Generator(device=device).manual_seed(1)

    def random(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator, device=device) * 0.02).to(dtype).cpu()

    state = {
        "meta_queries": random(geometry["num_queries"], text_hidden),
        "projector_1.weight": random(hidden, selected * text_hidden),
        "projector_1.bias": random(hidden),
        "projector_2.weight": random(pooled, hidden),
        "projector_2.bias": random(pooled),
        "projector_3.weight": random(joint, hidden),
        "projector_3.bias": random(joint),
    }
    for layer in range(layers):
        prefix = f"connector.layers.{layer}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[f"{prefix}.self_attn.{proj}.weight"] = random(hidden, hidden)
            state[f"{prefix}.self_attn.{proj}.bias"] = random(hidden)
        for norm in ("layer_norm1", "layer_norm2"):
            state[f"{prefix}.{norm}.weight"] = (1.0 + random(hidden).float()).to(dtype)
            state[f"{prefix}.{norm}.bias"] = random(hidden)
        state[f"{prefix}.mlp.fc1.weight"] = random(inner, hidden)
        state[f"{prefix}.mlp.fc1.bias"] = random(inner)
        state[f"{prefix}.mlp.fc2.weight"] = random(hidden, inner)
        state[f"{prefix}.mlp.fc2.bias"] = random(hidden)
    checkpoint = root / "checkpoint.safetensors"
    save_file(state, str(checkpoint))

    if smoke:  # the released config with the toy geometry's queries and connector
        config_path = root / "deepgen_smoke.py"
        config_path.write_text(
            "from worker.deepgen.config.deepgen import model as _released, prompt_template, tokenizer  # noqa: F401\n"
            f"model = dict(_released, num_queries={geometry['num_queries']}, "
            f"connector=dict(_released['connector'], hidden_size={hidden}, intermediate_size={inner}, "
            f"num_hidden_layers={layers}, num_attention_heads={connector['num_attention_heads']}))\n"
        )
        config = str(config_path)
    else:
        config = "deepgen"
    log(f"wrote the checkpoint in {time.perf_counter() - started:.1f} s")
    return {
        "DG_DEEPGEN_CONFIG": config,
        "DG_DEEPGEN_DIFFUSION_MODEL_PATH": str(diffusion),
        "DG_DEEPGEN_AR_MODEL_PATH": str(ar),
        "DG_DEEPGEN_CHECKPOINT": str(checkpoint),
        "DG_DEEPGEN_DEVICE": device,
        "DG_DEEPGEN_DTYPE": str(dtype).removeprefix("torch."),
        "DG_DEEPGEN_ATTENTION": "sdpa",  # flash-attn may not be installed; sdpa is the same math here
    }


def write_model(root: Path, args: argparse.Namespace, device: str) -> dict[str, str]:
    if args.tiny:
        from worker.deepgen.tiny import tiny_env, write_tiny_model

        # "dynamic" keeps the edit inputs small: the tiny DiT's positional table covers 1024 pixels.
        return tiny_env(write_tiny_model(root), DEVICE=device, IMAGE_RESIZE_MODE="dynamic")
    return write_full_size_random(root, device, smoke=args.smoke)


# ------------------------------------------------------------------------------------ requests


def striped(size: int, colours: tuple[tuple[int, int, int], ...]) -> Any:
    import numpy as np
    from PIL import Image

    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    band = max(1, size // len(colours))
    for index, colour in enumerate(colours):
        pixels[index * band : (index + 1) * band] = colour
    return Image.fromarray(pixels)


def edit_images(size: int) -> tuple[Any, Any]:
    return (
        striped(size, ((200, 30, 30), (30, 200, 30), (30, 30, 200))),
        striped(size, ((240, 240, 20), (20, 20, 20))),
    )


def t2i_params(counts: Counts, steps: int | None = None, images: int = 1) -> dict[str, Any]:
    return {
        "num_inference_steps": steps or counts.steps,
        "height": counts.size,
        "width": counts.size,
        "guidance_scale": GUIDANCE,
        "num_images_per_prompt": images,
    }


def direct_request(kind: str, params: Mapping[str, Any], seed: int, images: tuple[Any, ...] = ()) -> Any:
    from worker.deepgen.types import GenerationRequest

    return GenerationRequest(
        kind=kind,  # type: ignore[arg-type]  # "t2i" | "edit"
        prompt=PROMPT if kind == "t2i" else EDIT_PROMPT,
        images=images,
        guidance_scale=params.get("guidance_scale", GUIDANCE),
        num_inference_steps=params["num_inference_steps"],
        height=params.get("height"),
        width=params.get("width"),
        seed=seed,
        num_images_per_prompt=params.get("num_images_per_prompt", 1),
    )


# ------------------------------------------------------------------------------------ worker


def scrape(port: int) -> dict[str, float]:
    """`/metrics` of the worker's job process: {name{labels}: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{key}={value}" for key, value in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return samples


def metric(samples: Mapping[str, float], name: str, **labels: str) -> float | None:
    """The sum of `name`'s samples whose labels include `labels` (None when there is none)."""
    values = [
        value
        for key, value in samples.items()
        if key.split("{", 1)[0] == name and all(f"{k}={v}" in key for k, v in labels.items())
    ]
    return sum(values) if values else None


@dataclasses.dataclass
class Stack:
    database_url: str
    broker_url: str
    s3_endpoint: str
    bucket: str
    model_env: dict[str, str]
    home: Path
    logs: Path

    def client(self) -> Any:
        from api_client.client import DiffgentorClient

        return DiffgentorClient(
            database_url=self.database_url,
            broker_url=self.broker_url,
            storage_url=f"s3://{self.bucket}/gpu-stack",
            s3_endpoint_url=self.s3_endpoint,
            home=self.home,
        )

    @contextmanager
    def worker(
        self, name: str, metrics_port: int, ready_timeout: float, **model_overrides: str
    ) -> Iterator[Any]:
        """A real `diffgentor worker` (preflight, prefork child) with DG_METRICS_PORT set."""
        from worker.testing import WorkerProcess, worker_environ

        env = worker_environ(
            database_url=self.database_url,
            broker_url=self.broker_url,
            storage_url=f"s3://{self.bucket}/gpu-stack",
            home=self.home,
            s3_endpoint_url=self.s3_endpoint,
            model_env={**self.model_env, **model_overrides},
            DG_METRICS_PORT=str(metrics_port),
        )
        script = Path(sys.executable).with_name("diffgentor")
        command = (
            [str(script)]
            if script.exists()
            else [sys.executable, "-c", "from api_client.cli import main; main()"]
        )
        argv = [*command, "worker", "--model_name", MODEL_NAME, "--loglevel", "INFO"]
        log(f"starting worker '{name}': {shlex.join(argv)} (log {self.logs / f'worker-{name}.log'})")
        process = WorkerProcess(argv, env, self.logs / f"worker-{name}.log", cwd=REPO_ROOT, append_log=False)
        with process:
            process.wait_ready(timeout=ready_timeout)
            log(f"worker '{name}' consumes (pid {process.pid})")
            yield process
        log(f"worker '{name}' stopped")


def run_jobs(client: Any, specs: Sequence[Any], timeout: float) -> dict[str, Any]:
    """Submit `specs` at once, wait; wall = just before the submit to the last finished_at."""
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    handles = client.submit_many(specs, batch_name="gpu_stack")
    views = client.wait([handle.id for handle in handles], timeout=timeout)
    waited = time.monotonic() - t0
    failed = [view for view in views if view.status != "succeeded"]
    if failed:
        first = failed[0]
        raise RuntimeError(
            f"{len(failed)} of {len(views)} jobs did not succeed; first: {first.id} {first.status} "
            f"{first.error_type}: {first.error_message}"
        )
    wall = (max(view.finished_at for view in views) - started).total_seconds()
    runs = [(view.finished_at - view.started_at).total_seconds() for view in views]
    return {
        "jobs": len(views),
        "wall_s": wall,
        "seconds_per_job": wall / len(views),
        "job_run_median_s": statistics.median(runs),
        "wait_returned_s": waited,
    }


# ------------------------------------------------------------------------------------ main


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny model instead of full-size random weights"
    )
    parser.add_argument("--smoke", action="store_true", help="full-size writer and layouts at toy sizes")
    parser.add_argument(
        "--cpu", action="store_true", help="run on the CPU (with --tiny or --smoke: the script check)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer jobs: 10 t2i, 4 edits, 2+2 batch jobs, 4 offloaded"
    )
    parser.add_argument("--t2i", type=int, help="t2i jobs queued and direct (default 30; --quick 10; CPU 3)")
    parser.add_argument("--edits", type=int, help="two-image edit jobs (default 10; --quick 4; CPU 2)")
    parser.add_argument("--batch-jobs", type=int, help="jobs at num_images_per_prompt 1 and at 4 (default 4)")
    parser.add_argument("--offload-t2i", type=int, help="t2i jobs through the offloaded worker (default 10)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 50; CPU 2)")
    parser.add_argument("--size", type=int, help="t2i side in pixels (default 512; CPU 64)")
    parser.add_argument(
        "--no-offload-run", action="store_true", help="skip the second (offloaded) worker run"
    )
    parser.add_argument("--sqlite", action="store_true", help="SQLite even when PostgreSQL answers")
    parser.add_argument("--output", type=Path, help="results file (default bench/results/gpu_stack.md)")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "bench.gpu_stack", *(sys.argv[1:] if argv is None else argv)])

    import torch

    device = "cpu" if args.cpu else "cuda"
    if args.cpu and not (args.tiny or args.smoke):
        parser.error(
            "--cpu runs the script check only: add --tiny or --smoke (full size on a CPU takes hours)"
        )
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_stack: no CUDA device; `--tiny --cpu` checks the script on the CPU", flush=True)
        return 2
    base = CPU_CHECK if args.cpu else (QUICK if args.quick else FULL)
    counts = dataclasses.replace(
        base,
        t2i=args.t2i or base.t2i,
        edits=args.edits if args.edits is not None else base.edits,
        per_batch_size=args.batch_jobs if args.batch_jobs is not None else base.per_batch_size,
        offload_t2i=args.offload_t2i if args.offload_t2i is not None else base.offload_t2i,
        steps=args.steps or base.steps,
        size=args.size or base.size,
    )
    torch.set_num_threads(1)  # as the worker (OMP_NUM_THREADS=1, worker.testing.worker_environ)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    on_gpu = device == "cuda"
    model_kind = (
        "tiny"
        if args.tiny
        else ("smoke (toy sizes, full-size layouts)" if args.smoke else "full-size random")
    )
    results = Results(args.output or RESULTS / "gpu_stack.md", command, machine_facts(device), on_gpu)
    log(f"gpu_stack: {model_kind} model on {device}, counts {counts}")
    ready_timeout = 900.0 if on_gpu and not args.tiny else 300.0
    job_timeout = 1800.0

    from bench.harness import s3_bucket
    from worker.testing import free_port

    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="dg_gpu_stack_") as tmp_name:
        tmp = Path(tmp_name)
        broker_url = stack.enter_context(redis_server(tmp))
        log(f"redis-server at {broker_url}")
        database_url = stack.enter_context(job_database(tmp, args.sqlite))
        dialect = database_url.split(":", 1)[0].split("+", 1)[0]
        log(f"job database: {dialect}")
        endpoint, bucket = stack.enter_context(s3_bucket())
        log(f"moto S3 at {endpoint}")
        started = time.perf_counter()
        model_env = write_model(tmp / "model", args, device)
        model_seconds = time.perf_counter() - started
        log(f"model written in {model_seconds:.1f} s")
        logs = Path(tempfile.mkdtemp(prefix="dg_gpu_stack_logs_"))
        s = Stack(database_url, broker_url, endpoint, bucket, model_env, tmp / "home", logs)
        results.section(
            "Set-up",
            [
                f"* model: {model_kind}, device {device}, written to a temporary folder in {model_seconds:.1f} s",
                f"* services: own redis-server, {dialect} job database, moto S3; worker: `diffgentor worker "
                f"--model_name {MODEL_NAME}` (prefork child, preflight on), logs in `{logs}`",
                f"* counts: {counts.t2i} t2i at {counts.size} px / {counts.steps} steps, {counts.edits} two-image "
                f"edits ({counts.edit_size} px inputs), {counts.per_batch_size} jobs each at "
                f"num_images_per_prompt 1 and 4, {counts.offload_t2i} t2i with offload",
            ],
            {
                "model": model_kind,
                "device": device,
                "database": dialect,
                "model_write_s": model_seconds,
                **dataclasses.asdict(counts),
            },
        )
        client = stack.enter_context(s.client())
        images = edit_images(counts.edit_size)

        def t2i_specs(n: int, steps: int | None = None, per_prompt: int = 1, seed0: int = 0) -> list[Any]:
            params = t2i_params(counts, steps, per_prompt)
            return [client.t2i_spec(PROMPT, seed=seed0 + i, **params) for i in range(n)]

        def edit_specs(n: int, steps: int | None = None, seed0: int = 0) -> list[Any]:
            return [
                client.edit_spec(
                    EDIT_PROMPT,
                    images,
                    seed=seed0 + i,
                    num_inference_steps=steps or counts.steps,
                    guidance_scale=GUIDANCE,
                )
                for i in range(n)
            ]

        def warm_up(label: str) -> None:
            t0 = time.monotonic()
            warm = [*t2i_specs(1, steps=2, seed0=10_000), *edit_specs(1, steps=2, seed0=10_000)]
            if counts.per_batch_size:
                warm += t2i_specs(1, steps=2, per_prompt=4, seed0=10_001)
            run_jobs(client, warm, job_timeout)
            log(f"{label}: warm-up jobs done in {time.monotonic() - t0:.1f} s (includes the model load)")

        # ---- worker run 1: resident model
        port = free_port()
        queued: dict[str, Any] = {}
        with s.worker("resident", port, ready_timeout) as worker_process:
            warm_up("resident")
            log(f"t2i: {counts.t2i} jobs queued")
            queued["t2i"] = run_jobs(client, t2i_specs(counts.t2i), job_timeout)
            log(f"t2i queued: {queued['t2i']['seconds_per_job']:.3f} s/job")
            results.section(
                "1a. t2i through the worker",
                [
                    f"{counts.t2i} jobs submitted at once: {queued['t2i']['wall_s']:.2f} s from the submit to the last "
                    f"finished_at, **{queued['t2i']['seconds_per_job']:.3f} s per job** (median job run "
                    f"{queued['t2i']['job_run_median_s']:.3f} s, claim to completion incl. upload)."
                ],
                {"mode": "queued", "kind": "t2i", **queued["t2i"]},
            )
            if counts.edits:
                log(f"edits: {counts.edits} two-image jobs queued")
                queued["edit"] = run_jobs(client, edit_specs(counts.edits), job_timeout)
                results.section(
                    "2. Two-image edits through the worker",
                    [
                        f"{counts.edits} edit jobs (two {counts.edit_size} px inputs each, uploaded to S3 by the "
                        f"client, output at the resize mode's size): {queued['edit']['wall_s']:.2f} s, "
                        f"**{queued['edit']['seconds_per_job']:.3f} s per job**."
                    ],
                    {"mode": "queued", "kind": "edit", **queued["edit"]},
                )
            if counts.per_batch_size:
                per_count: dict[int, dict[str, Any]] = {}
                for per_prompt in (1, 4):
                    log(f"num_images_per_prompt {per_prompt}: {counts.per_batch_size} jobs queued")
                    row = run_jobs(
                        client,
                        t2i_specs(counts.per_batch_size, per_prompt=per_prompt, seed0=500),
                        job_timeout,
                    )
                    row["images_per_second"] = counts.per_batch_size * per_prompt / row["wall_s"]
                    per_count[per_prompt] = row
                speedup = per_count[4]["images_per_second"] / per_count[1]["images_per_second"]
                results.section(
                    "3. num_images_per_prompt 4 against 1 (through the worker)",
                    [
                        "| images per prompt | jobs | wall s | images per second |",
                        "|---|---|---|---|",
                        *(
                            f"| {n} | {row['jobs']} | {row['wall_s']:.2f} | {row['images_per_second']:.3f} |"
                            for n, row in per_count.items()
                        ),
                        "",
                        f"N=4 / N=1 images per second: **x{speedup:.2f}**.",
                    ],
                    {
                        "mode": "queued",
                        "images_per_second_n1": per_count[1]["images_per_second"],
                        "images_per_second_n4": per_count[4]["images_per_second"],
                        "n4_over_n1": speedup,
                    },
                )
            samples = scrape(port)
            worker_metrics = {
                "accelerator_max_allocated_bytes": metric(
                    samples, "diffgentor_accelerator_max_allocated_bytes"
                ),
                "accelerator_max_reserved_bytes": metric(
                    samples, "diffgentor_accelerator_max_reserved_bytes"
                ),
                "jobs_succeeded": metric(samples, "diffgentor_jobs_finished_total", status="succeeded"),
                "steps_per_second": metric(samples, "diffgentor_steps_per_second"),
                "model_load_seconds": metric(samples, "diffgentor_model_load_seconds"),
                "model_loads": metric(samples, "diffgentor_model_loads_total"),
            }
            log(f"/metrics of worker pid {worker_process.pid}: {worker_metrics}")

        # ---- direct engine, the worker stopped
        from worker.deepgen.engine import DeepGenEngine

        log("direct: loading the engine in this process")
        t0 = time.perf_counter()
        engine = DeepGenEngine.from_env(model_env)
        log(f"direct: loaded in {time.perf_counter() - t0:.1f} s")
        params = t2i_params(counts)
        engine.generate(direct_request("t2i", t2i_params(counts, steps=2), seed=10_000))  # warm-up
        engine.generate(direct_request("edit", {"num_inference_steps": 2}, 10_000, images))
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        encode: list[float] = []
        for seed in range(counts.t2i):
            encode.append(
                engine.generate(direct_request("t2i", params, seed)).timings.get("encode", float("nan"))
            )
        direct_seconds = time.perf_counter() - t0
        direct_per_job = direct_seconds / counts.t2i
        ratio = direct_per_job / queued["t2i"]["seconds_per_job"]
        log(f"t2i direct: {direct_per_job:.3f} s/job, ratio {ratio:.3f}")
        results.section(
            "1b. t2i queued against direct",
            [
                f"The same {counts.t2i} requests through `DeepGenEngine.generate` in the bench process on {device}, "
                f"after the worker stopped (both warmed up): {direct_seconds:.2f} s, {direct_per_job:.3f} s per job "
                f"(encode median {statistics.median(encode):.3f} s).",
                "",
                f"**Ratio direct / queued = {ratio:.3f}** (target >= 0.98: "
                f"{'met' if ratio >= 0.98 else 'MISSED'}{'' if on_gpu else '; CPU tiny-model figure, not the target run'}).",
            ],
            {
                "mode": "direct",
                "kind": "t2i",
                "jobs": counts.t2i,
                "direct_s": direct_seconds,
                "direct_seconds_per_job": direct_per_job,
                "queued_seconds_per_job": queued["t2i"]["seconds_per_job"],
                "ratio": ratio,
                "target_met": ratio >= 0.98,
                "encode_median_s": statistics.median(encode),
            },
        )
        # the largest requests the worker ran, once each, so the direct peak covers the same kinds
        if counts.edits:
            engine.generate(direct_request("edit", {"num_inference_steps": counts.steps}, 0, images))
        if counts.per_batch_size:
            engine.generate(direct_request("t2i", t2i_params(counts, images=4), 500))
        direct_peak = float(torch.cuda.max_memory_allocated()) if on_gpu else None
        metric_peak = worker_metrics["accelerator_max_allocated_bytes"]
        memory_ratio = metric_peak / direct_peak if metric_peak is not None and direct_peak else None
        results.section(
            "4. Accelerator memory: /metrics against torch.cuda.max_memory_allocated",
            [
                f"* worker `/metrics` (DG_METRICS_PORT, prefork child): "
                f"`diffgentor_accelerator_max_allocated_bytes` {mib(metric_peak)}, "
                f"`..._max_reserved_bytes` {mib(worker_metrics['accelerator_max_reserved_bytes'])}; "
                f"`diffgentor_jobs_finished_total{{status=succeeded}}` {worker_metrics['jobs_succeeded']}, "
                f"`diffgentor_steps_per_second` {worker_metrics['steps_per_second']}, "
                f"`diffgentor_model_load_seconds` {worker_metrics['model_load_seconds']}",
                f"* direct engine `torch.cuda.max_memory_allocated` after t2i, one edit and one N=4 request: "
                f"{mib(direct_peak)}",
                f"* metric / direct: {'n/a' if memory_ratio is None else f'{memory_ratio:.3f}'}"
                + ("" if on_gpu else " (on a CPU the accelerator metrics are absent by design)"),
            ],
            {**worker_metrics, "direct_max_allocated_bytes": direct_peak, "metric_over_direct": memory_ratio},
        )

        # offloaded encode in this process: the same loaded weights, offload on (bench/engine.py's way)
        offload_direct: dict[str, Any] = {}
        if not args.no_offload_run:
            offloaded = DeepGenEngine(
                dataclasses.replace(engine.loaded, env=dataclasses.replace(engine.loaded.env, offload=True))
            )
            offloaded.generate(direct_request("t2i", t2i_params(counts, steps=2), seed=10_000))
            rows = [
                offloaded.generate(direct_request("t2i", params, seed))
                for seed in range(min(3, counts.offload_t2i or 1))
            ]
            offload_direct = {
                "direct_offload_encode_median_s": statistics.median(
                    r.timings.get("encode", float("nan")) for r in rows
                ),
                "direct_offload_total_median_s": statistics.median(
                    r.timings.get("total", float("nan")) for r in rows
                ),
            }
            del offloaded
        del engine
        if on_gpu:
            torch.cuda.empty_cache()

        # ---- worker run 2: stage offload
        if args.no_offload_run or not counts.offload_t2i:
            results.section("5. Stage offload", ["Not run (--no-offload-run or --offload-t2i 0)."], None)
        else:
            port = free_port()
            with s.worker("offload", port, ready_timeout, DG_DEEPGEN_OFFLOAD="1"):
                warm_up("offload")
                log(f"offload t2i: {counts.offload_t2i} jobs queued")
                offload_row = run_jobs(client, t2i_specs(counts.offload_t2i, seed0=900), job_timeout)
                offload_samples = scrape(port)
            offload_peak = metric(offload_samples, "diffgentor_accelerator_max_allocated_bytes")
            slowdown = offload_row["seconds_per_job"] / queued["t2i"]["seconds_per_job"]
            results.section(
                "5. Stage offload on against off (through the worker)",
                [
                    "| DG_DEEPGEN_OFFLOAD | t2i jobs | s per job | /metrics max allocated |",
                    "|---|---|---|---|",
                    f"| off | {counts.t2i} | {queued['t2i']['seconds_per_job']:.3f} | {mib(metric_peak)} |",
                    f"| on | {counts.offload_t2i} | {offload_row['seconds_per_job']:.3f} | {mib(offload_peak)} |",
                    "",
                    f"Offload costs x{slowdown:.2f} per job. Direct engine with offload: encode median "
                    f"{offload_direct.get('direct_offload_encode_median_s', float('nan')):.3f} s "
                    f"(resident: {statistics.median(encode):.3f} s).",
                    "",
                    "Pinned host memory for the offloaded stages: **not done**. The engine has no setting for it "
                    "(no `pin_memory` in `worker/deepgen/`, no DG_DEEPGEN_* variable), so the 1.35 s offloaded "
                    "encode was not compared with pinned copies.",
                ],
                {
                    "mode": "queued",
                    "kind": "t2i",
                    "offload": True,
                    **offload_row,
                    "offload_over_resident": slowdown,
                    "offload_max_allocated_bytes": offload_peak,
                    **offload_direct,
                    "pinned_memory": "not done: no setting",
                },
            )
        log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
