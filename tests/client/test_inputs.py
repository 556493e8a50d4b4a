"""Prompt files and edit CSVs in every accepted form, and the errors that name what to fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api_client.errors import ExitCode, InputFileError
from api_client.inputs import load_edit_rows, load_prompts, parse_input_images


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_objects_strings_and_explicit_index(tmp_path: Path) -> None:
    path = write(tmp_path / "p.jsonl", '{"prompt": "a cat", "index": 7}\n\n"a dog"\n{"prompt": "a fox"}\n')
    rows = load_prompts(path)
    assert [(r.index, r.prompt) for r in rows] == [(7, "a cat"), (1, "a dog"), (2, "a fox")]


def test_json_array(tmp_path: Path) -> None:
    path = write(tmp_path / "p.json", json.dumps(["one", {"prompt": "two", "index": 5}]))
    assert [(r.index, r.prompt) for r in load_prompts(path)] == [(0, "one"), (5, "two")]


def test_txt_skips_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "p.txt", "first\n\n  second  \n")
    assert [(r.index, r.prompt) for r in load_prompts(path)] == [(0, "first"), (1, "second")]


def test_csv_with_and_without_index(tmp_path: Path) -> None:
    path = write(tmp_path / "p.csv", 'prompt,index\n"a, quoted, prompt",3\nplain,\n')
    assert [(r.index, r.prompt) for r in load_prompts(path)] == [(3, "a, quoted, prompt"), (1, "plain")]


@pytest.mark.parametrize(
    ("name", "text", "fragment"),
    [
        ("p.csv", "text\nhello\n", "has no 'prompt' column (columns: text)"),
        ("p.jsonl", '{"prompt": "x"}\n{oops\n', "line 2 is not valid JSON"),
        ("p.jsonl", '{"text": "x"}\n', "line 1 has no 'prompt' field"),
        ("p.json", '{"prompt": "x"}', "must hold a JSON array"),
        ("p.txt", "\n\n", "contains no prompts"),
        ("p.yaml", "- x\n", "unsupported extension .yaml"),
        ("p.jsonl", '{"prompt": "a", "index": 1}\n{"prompt": "b", "index": 1}\n', "index 1 is used twice"),
        ("p.jsonl", '{"prompt": "a", "index": "x1"}\n', "index 'x1' is not an integer"),
        ("p.json", '[{"prompt": "  "}]', "item 0 has an empty prompt"),
    ],
)
def test_prompt_file_errors_name_the_problem(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(InputFileError) as info:
        load_prompts(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)
    assert info.value.exit_code == ExitCode.INPUT_FILE


def test_missing_prompts_file(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="does not exist"):
        load_prompts(tmp_path / "nope.txt")


def test_parse_input_images_forms() -> None:
    assert parse_input_images('["a.png", "https://x/b.jpg"]') == ["a.png", "https://x/b.jpg"]
    assert parse_input_images("a.png, b.png") == ["a.png", "b.png"]
    assert parse_input_images(" s3://bucket/k.png ") == ["s3://bucket/k.png"]
    assert parse_input_images("") == []


def test_edit_csv_forms_resolve_relative_to_csv_folder(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("a.png", "b.png"):
        (images / name).write_bytes(b"png")
    absolute = str(images / "a.png")
    csv_path = write(
        tmp_path / "data.csv",
        "input_images,instruction,index,extra\n"
        '"[""imgs/a.png"", ""imgs/b.png""]",make it red,4,x\n'
        '"imgs/a.png,imgs/b.png",make it blue,,y\n'
        f"{absolute},make it green,,z\n"
        "https://example.com/c.jpg,make it gold,,w\n",
    )
    rows = load_edit_rows(csv_path)
    assert [r.index for r in rows] == [4, 1, 2, 3]
    assert rows[0].images == (str((images / "a.png").resolve()), str((images / "b.png").resolve()))
    assert rows[1].images == rows[0].images
    assert rows[2].images == (absolute,)
    assert rows[3].images == ("https://example.com/c.jpg",)
    assert rows[0].instruction == "make it red"
    assert rows[0].fields["extra"] == "x"


def test_edit_csv_instruction_key(tmp_path: Path) -> None:
    csv_path = write(tmp_path / "d.csv", "input_images,prompt\nhttps://e.com/a.png,do it\n")
    assert load_edit_rows(csv_path, instruction_key="prompt")[0].instruction == "do it"
    with pytest.raises(InputFileError) as info:
        load_edit_rows(csv_path)
    assert "has no 'instruction' column (columns: input_images, prompt)" in str(info.value)
    assert "--instruction_key" in str(info.value)


def test_edit_csv_missing_images_column(tmp_path: Path) -> None:
    csv_path = write(tmp_path / "d.csv", "image,instruction\na.png,do it\n")
    with pytest.raises(InputFileError, match="has no 'input_images' column"):
        load_edit_rows(csv_path)


def test_edit_csv_missing_image_names_row_and_path(tmp_path: Path) -> None:
    csv_path = write(
        tmp_path / "d.csv", "input_images,instruction\nhttps://e.com/a.png,ok\nmissing/x.png,do it\n"
    )
    with pytest.raises(InputFileError) as info:
        load_edit_rows(csv_path)
    message = str(info.value)
    assert "row 1 (line 3)" in message
    assert "missing/x.png" in message
    assert str(tmp_path / "missing" / "x.png") in message
