"""Resume records: an index is done only when its PNGs were made from the same request."""

from __future__ import annotations

from pathlib import Path

from api_client.resume import RECORDS_FOLDER, OutputRecords, request_fingerprint
from tests.support import solid_png

PARAMS = {"guidance_scale": 4.0, "num_inference_steps": 2, "height": 64, "width": 64, "seed": 1}


def fingerprint(prompt: str = "a cat", **changes: object) -> str:
    return request_fingerprint("t2i", "deepgen", {**PARAMS, **changes}, {"prompt": prompt})


def test_every_part_of_the_request_changes_the_fingerprint(tmp_path: Path) -> None:
    base = fingerprint()
    assert fingerprint() == base
    assert fingerprint("a dog") != base
    assert fingerprint(seed=2) != base and fingerprint(num_images_per_prompt=2) != base
    assert request_fingerprint("t2i", "other", PARAMS, {"prompt": "a cat"}) != base
    assert request_fingerprint("edit", "deepgen", PARAMS, {"prompt": "a cat"}) != base
    image = tmp_path / "in.png"
    image.write_bytes(solid_png(color=(1, 2, 3)))
    edit = request_fingerprint("edit", "deepgen", PARAMS, {"instruction": "x", "images": [str(image)]})
    moved = tmp_path / "moved.png"
    moved.write_bytes(image.read_bytes())
    # A local input counts by content: moving it keeps the request, new pixels change it.
    assert (
        request_fingerprint("edit", "deepgen", PARAMS, {"instruction": "x", "images": [str(moved)]}) == edit
    )
    image.write_bytes(solid_png(color=(9, 9, 9)))
    assert (
        request_fingerprint("edit", "deepgen", PARAMS, {"instruction": "x", "images": [str(image)]}) != edit
    )
    url = request_fingerprint("edit", "deepgen", PARAMS, {"instruction": "x", "images": ["s3://b/k.png"]})
    assert url != edit


def test_plan_sorts_done_changed_and_new(tmp_path: Path) -> None:
    records = OutputRecords(tmp_path)
    same, other = fingerprint(), fingerprint("another prompt")
    for index in (0, 1, 2):
        (tmp_path / f"{index:06d}.png").write_bytes(solid_png(color=(index, 0, 0)))
    records.remember(0, same, "job-0", ["000000.png"])
    records.remember(1, other, "job-1", ["000001.png"])
    # index 2 has a PNG but no record (another tool, an older release); index 3 has nothing.
    plan = records.plan([(0, same), (1, same), (2, same), (3, same)], count=1)
    assert plan.done == [0] and plan.changed == [1, 2] and plan.todo == [1, 2, 3]
    # A file replaced by hand (another size), or gone, is not done either.
    (tmp_path / "000000.png").write_bytes(b"not the recorded image")
    assert not records.matches(0, same, 1)
    (tmp_path / "000000.png").unlink()
    assert not records.matches(0, same, 1)
    assert records.plan([(0, same)], count=1).changed == []  # nothing there to replace
    # A damaged record is no record.
    (tmp_path / RECORDS_FOLDER / "000001.json").write_text("{not json")
    assert not records.matches(1, other, 1)


def test_image_count_is_part_of_done_and_the_old_count_files_go(tmp_path: Path) -> None:
    records = OutputRecords(tmp_path)
    four = fingerprint(num_images_per_prompt=4)
    names = [f"000005_{j:02d}.png" for j in range(4)]
    for name in names:
        (tmp_path / name).write_bytes(solid_png(color=(5, 5, 5)))
    records.remember(5, four, "job", names)
    assert records.matches(5, four, 4) and not records.matches(5, four, 1)
    (tmp_path / "000005_03.png").unlink()  # one of the four is missing: not done
    assert not records.matches(5, four, 4)
    (tmp_path / "000005.png").write_bytes(solid_png(color=(1, 1, 1)))
    (tmp_path / "000005_notes.png").write_bytes(b"a user's file")
    records.remember(5, fingerprint(), "job-b", ["000005.png"])
    assert sorted(path.name for path in tmp_path.glob("000005*.png")) == ["000005.png", "000005_notes.png"]
    records.forget(5)
    assert not records.matches(5, fingerprint(), 1)
