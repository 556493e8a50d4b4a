"""`diffgentor demo`: one t2i job and one edit of its image on the embedded default.

Without `DG_DEEPGEN_*` model paths it first builds the tiny random-weight model (once, in
`DG_HOME/tiny-model`) and says so: its images are noise, but every stage of the real path runs.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

from api_client.client import DiffgentorClient
from api_client.embedded import quiet_library_progress_bars
from api_client.errors import ExitCode
from api_client.generation import GenerationOptions, run_edit, run_t2i
from api_client.inputs import EditRow, PromptRow
from schemas.specs import DEFAULT_GUIDANCE_SCALE, DEFAULT_MODEL_NAME, DEFAULT_STEPS, DEFAULT_T2I_SIDE
from worker.settings import load_settings

DEMO_PROMPT = "a lighthouse on a cliff at sunset, oil painting"
DEMO_INSTRUCTION = "make the sky stormy and purple"


def run_demo(output_dir: Path | None = None, num_inference_steps: int | None = None) -> int:
    """One t2i job, then one edit of its image, on the embedded default (SQLite + DG_HOME folder)."""
    # The demo always runs embedded, whatever DG_BROKER_URL / DG_DATABASE_URL / DG_STORAGE_URL say.
    settings = load_settings({"DG_HOME": os.environ.get("DG_HOME", "")})
    tiny = _ensure_demo_model(settings.home)
    output_dir = output_dir or settings.home / "demo"
    t2i_dir, edit_dir = output_dir / "t2i", output_dir / "edit"
    t2i = GenerationOptions(
        model_name=DEFAULT_MODEL_NAME,
        output_dir=t2i_dir,
        guidance_scale=DEFAULT_GUIDANCE_SCALE,
        num_inference_steps=num_inference_steps or DEFAULT_STEPS,
        height=DEFAULT_T2I_SIDE,
        width=DEFAULT_T2I_SIDE,
        negative_prompt="",
        seed=None,
        priority=0,
        resume=False,
    )
    edit = replace(t2i, output_dir=edit_dir, height=None, width=None)  # edit: size of the input image
    with DiffgentorClient(settings) as client:
        print(
            f"embedded default: jobs in {settings.database_url}, artifacts in {settings.storage_url}",
            file=sys.stderr,
        )
        code = run_t2i(client, [PromptRow(0, DEMO_PROMPT)], t2i)
        if code != ExitCode.OK:
            return code
        source = str((t2i_dir / "000000.png").resolve())
        row = EditRow(
            0, DEMO_INSTRUCTION, (source,), {"input_images": source, "instruction": DEMO_INSTRUCTION}
        )
        code = run_edit(client, [row], edit, edit_dir / "results.csv")
    print(f"t2i image:  {t2i_dir / '000000.png'}  ({DEMO_PROMPT!r})")
    print(
        f"edit image: {edit_dir / '000000.png'}  ({DEMO_INSTRUCTION!r}; results: {edit_dir / 'results.csv'})"
    )
    if tiny:
        print(
            f"these images are noise: they come from the tiny random-weight model in {settings.home / 'tiny-model'}."
        )
        print(REAL_WEIGHTS_HINT)
    return code


REAL_WEIGHTS_HINT = """\
for real images, point the DG_DEEPGEN_* variables at the DeepGen weights and rerun:
  export DG_DEEPGEN_CONFIG=deepgen
  export DG_DEEPGEN_DIFFUSION_MODEL_PATH=/path/to/sd3.5-medium
  export DG_DEEPGEN_AR_MODEL_PATH=/path/to/qwen2.5-vl-3b
  export DG_DEEPGEN_CHECKPOINT=/path/to/checkpoint.safetensors
  diffgentor demo    # or: diffgentor t2i --prompt "..." --output_dir ./output"""


def _ensure_demo_model(home: Path) -> bool:
    """No DG_DEEPGEN_* model paths set: build (once) and use the tiny random-weight model (True)."""
    wanted = ("DG_DEEPGEN_DIFFUSION_MODEL_PATH", "DG_DEEPGEN_AR_MODEL_PATH")
    if any(os.environ.get(name) for name in wanted):
        print("using the DeepGen model named by the DG_DEEPGEN_* variables", file=sys.stderr)
        return False
    from worker.deepgen.tiny import TinyModelPaths, tiny_env, write_tiny_model

    root = home / "tiny-model"
    paths = TinyModelPaths(
        root, root / "ar", root / "diffusion", root / "checkpoint.safetensors", root / "checkpoint.pt"
    )
    if not (paths.checkpoint_safetensors.is_file() and (paths.ar / "config.json").is_file()):
        print(f"building the tiny random-weight DeepGen model in {root} ...", file=sys.stderr)
        quiet_library_progress_bars()
        paths = write_tiny_model(root)
    os.environ.update(tiny_env(paths))
    print(
        "no DG_DEEPGEN_* model paths are set, so the demo uses a tiny random-weight model: "
        "its images are noise. Set DG_DEEPGEN_CONFIG, DG_DEEPGEN_DIFFUSION_MODEL_PATH, "
        "DG_DEEPGEN_AR_MODEL_PATH (and DG_DEEPGEN_CHECKPOINT) for real images.",
        file=sys.stderr,
    )
    return True
