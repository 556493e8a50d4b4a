"""Output naming, resume and results.csv merging."""

from __future__ import annotations

from pathlib import Path

from api_client.outputs import (
    ResultRecord,
    output_name,
    output_names,
    read_results_csv,
    write_atomically,
    write_results_csv,
)


def test_output_name_is_zero_padded() -> None:
    assert output_name(7) == "000007.png"
    assert output_name(1234567) == "1234567.png"


def test_several_images_per_row_use_the_reference_names() -> None:
    assert output_names(7, 1) == ["000007.png"]
    assert output_names(7, 3) == ["000007_00.png", "000007_01.png", "000007_02.png"]


def test_results_csv_has_a_row_per_image_and_a_rerun_replaces_an_index_whole(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    fields = {"instruction": "red", "input_images": "a.png"}
    several = [
        ResultRecord(0, fields, f"000000_0{j}.png", "j0", 5, "succeeded", "", image_index=j) for j in range(3)
    ]
    write_results_csv(path, [*several, ResultRecord(1, fields, "000001.png", "j1", 6, "succeeded", "")])
    rows = read_results_csv(path)
    assert [(r["index"], r["image_index"], r["output_image"]) for r in rows] == [
        ("0", "0", "000000_00.png"),
        ("0", "1", "000000_01.png"),
        ("0", "2", "000000_02.png"),
        ("1", "", "000001.png"),
    ]
    assert path.read_text().splitlines()[0].endswith("image_index,output_image,job_id,seed,status,error")
    write_results_csv(path, [ResultRecord(0, fields, "000000.png", "j0b", 7, "succeeded", "")])  # now N=1
    rows = read_results_csv(path)
    assert [(r["index"], r["output_image"], r["job_id"]) for r in rows] == [
        ("0", "000000.png", "j0b"),
        ("1", "000001.png", "j1"),
    ]
    assert "image_index" not in path.read_text().splitlines()[0]  # no row has several images any more


def test_results_csv_keeps_rows_of_earlier_runs(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    first = ResultRecord(
        2, {"instruction": "red", "input_images": "a.png"}, "000002.png", "j2", 11, "succeeded", ""
    )
    failed = ResultRecord(
        0, {"instruction": "blue", "input_images": "b.png"}, "", "j0", None, "failed", "boom"
    )
    write_results_csv(path, [first, failed])
    retried = ResultRecord(
        0, {"instruction": "blue", "input_images": "b.png"}, "000000.png", "j0b", 5, "succeeded", ""
    )
    write_results_csv(path, [retried])
    rows = read_results_csv(path)
    assert [r["index"] for r in rows] == ["0", "2"]
    assert rows[0]["job_id"] == "j0b" and rows[0]["seed"] == "5" and rows[0]["error"] == ""
    assert rows[1]["output_image"] == "000002.png" and rows[1]["seed"] == "11"
    header = path.read_text().splitlines()[0].split(",")
    assert header[-5:] == ["output_image", "job_id", "seed", "status", "error"]
    assert set(header[:3]) == {"instruction", "input_images", "index"}


def test_written_files_get_the_umask_mode_not_0600(tmp_path: Path) -> None:
    import os

    from api_client.outputs import default_file_mode

    previous = os.umask(0o022)
    try:
        assert default_file_mode() == 0o644
        write_atomically(tmp_path / "a.png", b"x")
        write_results_csv(tmp_path / "results.csv", [ResultRecord(0, {}, "", "j", None, "failed", "e")])
        os.umask(0o002)
        assert default_file_mode() == 0o664
        write_atomically(tmp_path / "b.png", b"x")
    finally:
        os.umask(previous)
    modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in ("a.png", "results.csv", "b.png")}
    assert modes == {"a.png": 0o644, "results.csv": 0o644, "b.png": 0o664}


def test_file_artifacts_and_downloads_get_the_umask_mode_not_0600(tmp_path: Path) -> None:
    """DG_HOME/artifacts (embedded mode) and downloads from it are written like the outputs above."""
    import os

    from worker.storage import FileArtifactStore

    store = FileArtifactStore((tmp_path / "artifacts").as_uri())
    previous = os.umask(0o027)
    try:
        uri = store.put_bytes("jobs/j1/1/0.png", b"png")
        store.download(uri, tmp_path / "out" / "0.png")
    finally:
        os.umask(previous)
    assert (tmp_path / "artifacts" / "jobs" / "j1" / "1" / "0.png").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "out" / "0.png").stat().st_mode & 0o777 == 0o640
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["0.png"]  # no temporary file left
