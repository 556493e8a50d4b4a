"""Resume cannot return stale images: the CLI end to end on the embedded default (tiny model)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from api_client.resume import RECORDS_FOLDER
from tests.support import run_cli, write_png

pytestmark = pytest.mark.integration  # `diffgentor` subprocesses run the tiny model end to end

FAST = ["--num_inference_steps", "2", "--height", "64", "--width", "64"]


def t2i(out: Path, prompt: str, *extra: str) -> list[str]:
    return ["t2i", "--prompt", prompt, "--output_dir", str(out), *FAST, *extra]


def job_of(out: Path, index: int) -> str:
    return str(json.loads((out / RECORDS_FOLDER / f"{index:06d}.json").read_text())["job_id"])


def test_a_rerun_with_another_request_regenerates_or_refuses(
    embedded_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = run_cli(t2i(out, "a cat", "--seed", "1"), embedded_env)
    assert first.code == 0, first.stderr
    cat_job, cat_bytes = job_of(out, 0), (out / "000000.png").read_bytes()

    # Invalid flags fail exactly as in a fresh folder, before the resume check.
    fresh = run_cli(t2i(tmp_path / "fresh", "a cat", "--height", "-5"), embedded_env)
    rerun = run_cli(t2i(out, "a cat", "--height", "-5"), embedded_env)
    assert rerun.code == fresh.code == 4 and rerun.stderr == fresh.stderr
    assert "height must be between" in rerun.stderr
    blank = run_cli(t2i(out, "   "), embedded_env)  # a row the spec refuses, also when index 0 exists
    assert blank.code == 4 and "prompt must not be empty" in blank.stderr

    refused = run_cli(t2i(out, "a different prompt", "--seed", "1", "--no_overwrite"), embedded_env)
    assert refused.code == 3 and "index(es) 0" in refused.stderr and "--no_overwrite" in refused.stderr
    assert (out / "000000.png").read_bytes() == cat_bytes

    changed = run_cli(t2i(out, "a different prompt", "--seed", "1"), embedded_env)
    assert changed.code == 0, changed.stderr
    assert "regenerating 1 row(s)" in changed.stderr and "nothing to do" not in changed.stdout
    assert job_of(out, 0) != cat_job

    same = run_cli(t2i(out, "a different prompt", "--seed", "1"), embedded_env)
    assert same.code == 0 and "nothing to do" in same.stdout

    several = run_cli(
        t2i(out, "a different prompt", "--seed", "1", "--num_images_per_prompt", "3"), embedded_env
    )
    assert several.code == 0, several.stderr
    assert sorted(path.name for path in out.glob("*.png")) == [
        "000000_00.png",
        "000000_01.png",
        "000000_02.png",
    ]
    images = [(out / f"000000_0{j}.png").read_bytes() for j in range(3)]
    assert len(set(images)) == 3 and all(
        Image.open(out / f"000000_0{j}.png").size == (64, 64) for j in range(3)
    )

    out_of_range = run_cli(t2i(out, "x", "--num_images_per_prompt", "9"), embedded_env)
    assert out_of_range.code == 2 and "between 1 and 8" in out_of_range.stderr


def test_edit_with_several_images_lists_them_and_a_new_input_regenerates(
    embedded_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**embedded_env, "DG_DEEPGEN_IMAGE_RESIZE_MODE": "dynamic"}
    photo = write_png(tmp_path / "photo.png", color=(10, 200, 10))
    table = tmp_path / "edits.csv"
    table.write_text("instruction,input_images\nmake it red,photo.png\n")
    out = tmp_path / "out"
    args = ["edit", "--input", str(table), "--output_dir", str(out), "--num_inference_steps", "2"]
    first = run_cli([*args, "--num_images_per_prompt", "2", "--seed", "4"], env)
    assert first.code == 0, first.stderr
    with (out / "results.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["index"], row["image_index"], row["output_image"]) for row in rows] == [
        ("0", "0", "000000_00.png"),
        ("0", "1", "000000_01.png"),
    ]
    assert rows[0]["job_id"] == rows[1]["job_id"] and rows[0]["seed"] == "4"

    write_png(photo, color=(200, 10, 10))  # same path, new pixels: a new request
    again = run_cli([*args, "--num_images_per_prompt", "2", "--seed", "4"], env)
    assert again.code == 0, again.stderr
    assert "regenerating 1 row(s)" in again.stderr
    with (out / "results.csv").open(newline="") as handle:
        assert {row["job_id"] for row in csv.DictReader(handle)} != {rows[0]["job_id"]}
