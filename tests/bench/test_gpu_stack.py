"""`bench/gpu_stack.py` end to end on the CPU: the tiny model, the smallest counts.

The script's GPU run needs a GPU; this checks that every section of it runs against real services
(its own `redis-server`, a PostgreSQL database or SQLite, moto S3, two real `diffgentor worker`
processes) and writes its results file with numeric figures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

pytestmark = pytest.mark.integration
# The suite's PostgreSQL server (tests/conftest.py); the script falls back to SQLite without one.
PG_ADMIN_URL = os.environ.get("DG_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

SECTIONS = (
    "Set-up",
    "1a. t2i through the worker",
    "2. Two-image edits through the worker",
    "3. num_images_per_prompt 4 against 1 (through the worker)",
    "1b. t2i queued against direct",
    "4. Accelerator memory: /metrics against torch.cuda.max_memory_allocated",
    "5. Stage offload on against off (through the worker)",
)


def _records(text: str) -> dict[str, dict]:
    lines = text.splitlines()
    records = [json.loads(lines[i + 1]) for i, line in enumerate(lines) if line == "```json"]
    return {record["section"]: record for record in records}


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server binary not installed")
def test_gpu_stack_tiny_cpu_end_to_end(tmp_path: Path) -> None:
    output = tmp_path / "gpu_stack.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DG_", "PYTEST"))}
    env.update({"DG_BENCH_PG_ADMIN_URL": PG_ADMIN_URL, "OMP_NUM_THREADS": "1"})
    argv = [sys.executable, "-m", "bench.gpu_stack", "--tiny", "--cpu", "--t2i", "2", "--edits", "1",
            "--batch-jobs", "1", "--offload-t2i", "1", "--output", str(output)]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    text = output.read_text()
    assert "NOT yet run on a GPU" in text
    assert "python -m bench.gpu_stack --tiny --cpu" in text  # the command
    for section in SECTIONS:
        assert f"## {section}" in text, section
    records = _records(text)
    assert set(records) == set(SECTIONS)

    direct = records["1b. t2i queued against direct"]
    for key in ("ratio", "direct_seconds_per_job", "queued_seconds_per_job"):
        assert isinstance(direct[key], float) and direct[key] > 0, (key, direct)
    assert records["1a. t2i through the worker"]["jobs"] == 2
    assert records["2. Two-image edits through the worker"]["seconds_per_job"] > 0
    batch = records["3. num_images_per_prompt 4 against 1 (through the worker)"]
    assert batch["images_per_second_n1"] > 0 and batch["images_per_second_n4"] > 0

    memory = records["4. Accelerator memory: /metrics against torch.cuda.max_memory_allocated"]
    # Scraped from the worker's /metrics: warm-up (3 jobs) + 2 t2i + 1 edit + 1 + 1 batch jobs.
    assert memory["jobs_succeeded"] == 8.0
    assert isinstance(memory["steps_per_second"], float) and memory["steps_per_second"] > 0
    assert memory["model_loads"] == 1.0
    # On a CPU the accelerator gauges are absent by design (docs/operations.md), so no ratio.
    assert memory["accelerator_max_allocated_bytes"] is None and memory["metric_over_direct"] is None

    offload = records["5. Stage offload on against off (through the worker)"]
    assert offload["offload"] is True and offload["seconds_per_job"] > 0
    assert isinstance(offload["offload_over_resident"], float)
    assert offload["pinned_memory"].startswith("not done")
