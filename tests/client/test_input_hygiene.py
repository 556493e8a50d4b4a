"""Input hygiene at submit: NUL characters, NaN/inf parameters, decompression bombs, broken CSV quoting,
empty CSVs and bad JSONL are refused before anything is submitted, with one `error:` line naming what
to fix and exit code 3 (input file) or 4 (job parameters), never 70 (internal error)."""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import ValidationError

from api_client.cli import main
from api_client.errors import ConfigurationError, ExitCode, InputFileError
from api_client.inputs import load_edit_rows, load_prompts, local_image_problem
from schemas.specs import EditSpec, GenerationParams, T2ISpec, parse_job_spec
from tests.support import base_env, run_cli, write_png

EDIT_HEADER = "input_images,instruction\n"


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@dataclass
class Case:
    """One CLI run: files to write (text, or bytes for images), the arguments, the expected outcome."""

    args: list[str]
    code: ExitCode
    fragments: list[str]
    files: dict[str, str | bytes] = field(default_factory=dict)
    absent: list[str] = field(default_factory=list)  # must not appear in the message
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None


def _png(path: Path) -> None:
    write_png(path)  # 64x64


def _t2i_file(name: str) -> list[str]:
    return ["t2i", "--prompts_file", name]


def _edit(name: str = "edit.csv") -> list[str]:
    return ["edit", "--input", name]


CASES = {
    # 1. NUL characters in prompts / instructions (the job spec is PostgreSQL JSON: no \u0000).
    "nul-in-txt-prompt": Case(
        _t2i_file("p.txt"),
        ExitCode.INPUT_FILE,
        ["p.txt line 2: the prompt must not contain NUL characters (\\x00)"],
        files={"p.txt": "a red fox\na blue\x00 bird\n"},
    ),
    "nul-escaped-in-jsonl": Case(
        _t2i_file("p.jsonl"),
        ExitCode.INPUT_FILE,
        ["p.jsonl line 1: the prompt must not contain NUL characters"],
        files={"p.jsonl": '{"prompt": "a \\u0000 fox"}\n'},
    ),
    "nul-in-prompt-csv": Case(
        _t2i_file("p.csv"),
        ExitCode.INPUT_FILE,
        ["p.csv row 1 (line 3): the prompt must not contain NUL"],
        files={"p.csv": "prompt\nfine\nnot\x00fine\n"},
    ),
    "nul-in-edit-instruction": Case(
        _edit(),
        ExitCode.INPUT_FILE,
        ["edit.csv row 0 (line 2): the 'instruction' must not contain NUL"],
        files={"edit.csv": EDIT_HEADER + "https://e.com/a.png,make\x00 it red\n"},
    ),
    "lone-surrogate-in-jsonl": Case(
        _t2i_file("p.jsonl"),
        ExitCode.INPUT_FILE,
        ["p.jsonl line 1: the prompt is not valid Unicode text"],
        files={"p.jsonl": '{"prompt": "a \\ud800 fox"}\n'},
    ),
    # 2. NaN / infinite guidance_scale: "must be a finite number", not "less than or equal to 30".
    "nan-guidance-t2i": Case(
        ["t2i", "--prompt", "a cat", "--guidance_scale", "nan"],
        ExitCode.CONFIGURATION,
        ["invalid job parameters: guidance_scale: guidance_scale must be a finite number, got nan"],
        absent=["less than or equal"],
    ),
    "inf-guidance-t2i": Case(
        ["t2i", "--prompt", "a cat", "--guidance_scale", "inf"],
        ExitCode.CONFIGURATION,
        ["guidance_scale must be a finite number, got inf"],
        absent=["less than or equal"],
    ),
    "minus-inf-guidance-edit": Case(
        [*_edit(), "--guidance_scale=-inf"],
        ExitCode.CONFIGURATION,
        ["guidance_scale must be a finite number, got -inf"],
        absent=["greater than or equal"],
        files={"edit.csv": EDIT_HEADER + "https://e.com/a.png,red\n"},
    ),
    "nan-guidance-before-the-file-is-read": Case(
        [*_t2i_file("missing.txt"), "--guidance_scale", "NaN"],
        ExitCode.CONFIGURATION,
        ["guidance_scale must be a finite number"],
    ),
    # 3. Decompression bombs among the edit inputs: named, with the pixel limit (DG_INPUT_MAX_PIXELS).
    "bomb-over-pil-hard-limit": Case(
        _edit(),
        ExitCode.INPUT_FILE,
        [
            "edit.csv row 0 (line 2): input image bomb.png: refused as a possible decompression bomb",
            "400000000 pixels",
            "over the limit of 40000000 pixels (DG_INPUT_MAX_PIXELS)",
        ],
        files={"edit.csv": EDIT_HEADER + "bomb.png,make it red\n", "bomb.png": bomb_png(20_000, 20_000)},
        absent=["DecompressionBombError", "internal error"],
    ),
    "bomb-in-pil-warning-range": Case(
        _edit(),
        ExitCode.INPUT_FILE,
        ["input image big.png: refused as a possible decompression bomb", "(DG_INPUT_MAX_PIXELS)"],
        files={
            "edit.csv": EDIT_HEADER + '"[""ok.png"", ""big.png""]",red\n',
            "big.png": bomb_png(10_000, 10_000),
        },
        setup=lambda d: _png(d / "ok.png"),
    ),
    "bomb-under-pil-limit-over-ours": Case(
        _edit(),
        ExitCode.INPUT_FILE,
        [
            "input image wide.png: 8000x8000 = 64000000 pixels is over the limit of 40000000 pixels",
            "DG_INPUT_MAX_PIXELS",
        ],
        files={"edit.csv": EDIT_HEADER + "wide.png,red\n", "wide.png": bomb_png(8000, 8000)},
    ),
    "pixel-limit-from-the-setting": Case(
        _edit(),
        ExitCode.INPUT_FILE,
        [
            "row 0 (line 2): input image small.png: 64x64 = 4096 pixels is over the limit of 1000 pixels "
            "(DG_INPUT_MAX_PIXELS"
        ],
        files={"edit.csv": EDIT_HEADER + "small.png,red\n"},
        env={"DG_INPUT_MAX_PIXELS": "1000"},
        setup=lambda d: _png(d / "small.png"),
    ),
    # 4. Broken CSV quoting: named by line, never silently merged into other prompts.
    "prompt-csv-unterminated-quote": Case(
        _t2i_file("p.csv"),
        ExitCode.INPUT_FILE,
        ["p.csv line 3: a quoted field that starts on this row never ends"],
        files={"p.csv": 'prompt\na red fox\n"a blue bird\na green frog\nmore\n'},
    ),
    "prompt-csv-text-after-closing-quote": Case(
        _t2i_file("p.csv"),
        ExitCode.INPUT_FILE,
        ["p.csv line 2: broken CSV quoting", "expected after"],
        files={"p.csv": 'prompt\n"a blue" bird\n'},
    ),
    "prompt-csv-stray-quote-closed-later": Case(
        _t2i_file("p.csv"),
        ExitCode.INPUT_FILE,
        ["p.csv line 2: broken CSV quoting", "(noticed on line 4)"],
        files={"p.csv": 'prompt\n"a red fox\na blue bird\n"a green" frog\n'},
    ),
    "prompt-csv-unquoted-comma": Case(
        _t2i_file("p.csv"),
        ExitCode.INPUT_FILE,
        ["p.csv line 2 has 3 values but the header has 2 columns", "double quotes"],
        files={"p.csv": "prompt,index\na red fox, in snow,4\n"},
    ),
    "edit-csv-unterminated-quote": Case(
        _edit(),
        ExitCode.INPUT_FILE,
        ["edit.csv line 3: a quoted field that starts on this row never ends"],
        files={"edit.csv": EDIT_HEADER + 'https://e.com/a.png,red\n"https://e.com/b.png,blue\n'},
    ),
    # 5. An empty edit CSV names the missing column, not --instruction_key.
    "empty-edit-csv": Case(
        _edit(),
        ExitCode.INPUT_FILE,
        ["edit input edit.csv is empty", "input_images and instruction"],
        absent=["--instruction_key"],
        files={"edit.csv": ""},
    ),
    "blank-lines-edit-csv": Case(
        _edit(),
        ExitCode.INPUT_FILE,
        ["edit.csv is empty", "input_images"],
        absent=["--instruction_key"],
        files={"edit.csv": "\n\n"},
    ),
    "edit-csv-without-images-column": Case(
        _edit(),
        ExitCode.INPUT_FILE,
        ["has no 'input_images' column (columns: instruction)"],
        absent=["--instruction_key"],
        files={"edit.csv": "instruction\nred\n"},
    ),
    "empty-edit-csv-custom-key": Case(
        [*_edit(), "--instruction_key", "edit_prompt"],
        ExitCode.INPUT_FILE,
        ["is empty", "input_images and edit_prompt"],
        absent=["--instruction_key"],
        files={"edit.csv": ""},
    ),
    "empty-prompts-csv": Case(
        _t2i_file("p.csv"),
        ExitCode.INPUT_FILE,
        ["prompts file p.csv is empty", "'prompt' column"],
        files={"p.csv": ""},
    ),
    # 6. Bad JSONL: the whole decoder message, with the line and column.
    "jsonl-unterminated-string": Case(
        _t2i_file("p.jsonl"),
        ExitCode.INPUT_FILE,
        [
            "p.jsonl line 2 is not valid JSON (Unterminated string starting at: column 12)",
            'each line must be one JSON object like {"prompt": "..."}',
        ],
        files={"p.jsonl": '{"prompt": "a cat"}\n{"prompt": "a dog\n'},
    ),
    "jsonl-extra-data": Case(
        _t2i_file("p.jsonl"),
        ExitCode.INPUT_FILE,
        ["p.jsonl line 1 is not valid JSON (Extra data: column 21)"],
        files={"p.jsonl": '{"prompt": "a cat"} {"prompt": "a dog"}\n'},
    ),
    "json-array-cut-off": Case(
        _t2i_file("p.json"),
        ExitCode.INPUT_FILE,
        ["p.json is not valid JSON (Expecting value: line 3 column 1)"],
        files={"p.json": '["a cat",\n"a dog",\n'},
    ),
    "jsonl-prompt-not-a-string": Case(
        _t2i_file("p.jsonl"),
        ExitCode.INPUT_FILE,
        ["p.jsonl line 1: the prompt must be a string, not float"],
        files={"p.jsonl": '{"prompt": NaN}\n'},
    ),
}


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input_is_refused_at_submit(
    case: Case,
    clean_env: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for name, content in case.files.items():
        if isinstance(content, bytes):
            (data / name).write_bytes(content)
        else:
            (data / name).write_text(content, encoding="utf-8", newline="")
    if case.setup:
        case.setup(data)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(data)  # messages name the files as given on the command line
    out = tmp_path / "out"
    code, err = run_main([*case.args, "--output_dir", str(out)], capsys)
    assert code != ExitCode.INTERNAL, err
    assert code == case.code, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for fragment in case.fragments:
        assert fragment in errors[0]
    for fragment in case.absent:
        assert fragment not in errors[0]
    assert not out.exists()  # refused before anything was submitted or written


def test_the_console_script_refuses_a_bomb_with_exit_3(tmp_path: Path) -> None:
    """The real `diffgentor` entry point, in a subprocess, server-style (local files are uploaded)."""
    (tmp_path / "bomb.png").write_bytes(bomb_png(20_000, 20_000))
    (tmp_path / "edit.csv").write_text(EDIT_HEADER + "bomb.png,make it red\n")
    env = base_env(tmp_path / "home")
    env["DG_ALLOW_LOCAL_INPUTS"] = "0"  # the client would read and upload the file
    result = run_cli(["edit", "--input", "edit.csv", "--output_dir", "out"], env, cwd=tmp_path)
    assert result.code == ExitCode.INPUT_FILE, result.stderr
    assert "input image bomb.png: refused as a possible decompression bomb" in result.stderr
    assert "DG_INPUT_MAX_PIXELS" in result.stderr and "internal error" not in result.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------- loaders


def test_jsonl_and_txt_split_only_at_line_ends(tmp_path: Path) -> None:
    # U+2028 is legal unescaped inside a JSON string; str.splitlines() used to cut the line there.
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat\u2028on a mat"}\r\n"a dog\x85barking"\n', encoding="utf-8")
    assert [row.prompt for row in load_prompts(jsonl)] == ["a cat\u2028on a mat", "a dog\x85barking"]
    txt = tmp_path / "p.txt"
    txt.write_text("one\u2028still one\rtwo\r\nthree\n", encoding="utf-8", newline="")
    assert [row.prompt for row in load_prompts(txt)] == ["one\u2028still one", "two", "three"]


def test_valid_csv_forms_still_load(tmp_path: Path) -> None:
    csv_path = tmp_path / "p.csv"
    # Quoted commas, doubled quotes, a multi-line quoted prompt, blank lines, empty trailing cells.
    csv_path.write_text(
        'prompt,index\n"a fox, in snow",3\n"say ""hi""",\n\n"two\nlines",,\n', encoding="utf-8", newline=""
    )
    rows = load_prompts(csv_path)
    assert [(row.index, row.prompt) for row in rows] == [
        (3, "a fox, in snow"),
        (1, 'say "hi"'),
        (2, "two\nlines"),
    ]


def test_edit_rows_keep_their_first_line(tmp_path: Path) -> None:
    csv_path = _write(
        tmp_path / "e.csv", EDIT_HEADER + '"https://e.com/a.png","two\nlines"\nhttps://e.com/b.png,x\n'
    )
    assert [row.line for row in load_edit_rows(csv_path)] == [2, 4]


def test_edit_rows_pixel_limit_is_a_parameter(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", size=(40, 30))
    csv_path = _write(tmp_path / "e.csv", EDIT_HEADER + "a.png,red\n")
    assert len(load_edit_rows(csv_path)) == 1  # default limit: DG_INPUT_MAX_PIXELS's default
    assert len(load_edit_rows(csv_path, max_pixels=1200)) == 1
    message = _input_error(lambda: load_edit_rows(csv_path, max_pixels=1199))
    assert "input image a.png: 40x30 = 1200 pixels is over the limit of 1199 pixels" in message


def test_local_image_problem_reads_only_the_header(tmp_path: Path) -> None:
    assert "decompression bomb" in (local_image_problem(bomb_png(20_000, 20_000)) or "")
    path = tmp_path / "wide.png"
    path.write_bytes(bomb_png(8000, 8000))
    assert "64000000 pixels is over the limit of 40000000" in (local_image_problem(path) or "")
    assert local_image_problem(b"not an image") is None  # decoding reports unreadable images


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


def _input_error(call: Callable[[], object]) -> str:
    with pytest.raises(InputFileError) as info:
        call()
    assert info.value.exit_code == ExitCode.INPUT_FILE
    return str(info.value)


# ----------------------------------------------------------------------------------- schema / client


@pytest.mark.parametrize(
    ("build", "field_name", "text"),
    [
        (lambda: T2ISpec(prompt="a\x00b"), "prompt", "prompt must not contain NUL characters"),
        (
            lambda: EditSpec(instruction="x\x00", images=["s3://b/k.png"]),
            "instruction",
            "must not contain NUL",
        ),
        (lambda: GenerationParams(negative_prompt="blur\x00"), "negative_prompt", "must not contain NUL"),
        (lambda: T2ISpec(prompt="a", idempotency_key="k\x00"), "idempotency_key", "must not contain NUL"),
        (
            lambda: EditSpec(instruction="x", images=["s3://b/k\x00.png"]),
            "images",
            "not a valid image reference",
        ),
        (lambda: T2ISpec(prompt="a \udcff"), "prompt", "valid string"),  # pydantic's own check
        (
            lambda: GenerationParams(guidance_scale=math.nan),
            "guidance_scale",
            "guidance_scale must be a finite number",
        ),
        (
            lambda: GenerationParams(guidance_scale=math.inf),
            "guidance_scale",
            "must be a finite number, got inf",
        ),
        (lambda: GenerationParams(guidance_scale="-Infinity"), "guidance_scale", "must be a finite number"),
        (lambda: GenerationParams(guidance_scale="1e999"), "guidance_scale", "must be a finite number"),
        (
            lambda: parse_job_spec('{"kind": "t2i", "prompt": "a", "params": {"guidance_scale": NaN}}'),
            "guidance_scale",
            "must be a finite number",
        ),
        (lambda: parse_job_spec({"kind": "t2i", "prompt": "a\u0000"}), "prompt", "must not contain NUL"),
    ],
)
def test_schema_refuses_unstorable_text_and_non_finite_numbers(
    build: Callable[[], object], field_name: str, text: str
) -> None:
    with pytest.raises(ValidationError) as info:
        build()
    message = str(info.value)
    assert field_name in message and text in message
    assert "less than or equal" not in message


def test_schema_still_accepts_ordinary_values() -> None:
    params = GenerationParams(guidance_scale="7.5", negative_prompt="blurry, low quality")
    assert params.guidance_scale == 7.5
    assert T2ISpec(prompt="a cat\u2028on a mat \U0001f408").prompt.endswith("\U0001f408")


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (
            lambda c: c.t2i_spec("a cat", guidance_scale=math.nan),
            "guidance_scale must be a finite number, got nan",
        ),
        (lambda c: c.t2i_spec("a\x00cat"), "prompt must not contain NUL characters"),
        (lambda c: c.t2i_spec("a cat", negative_prompt="\x00"), "negative_prompt must not contain NUL"),
        (lambda c: c.edit_spec("x\x00", ["https://e.com/a.png"]), "instruction must not contain NUL"),
        (
            lambda c: c.edit_spec("x", ["https://e.com/a.png"], guidance_scale=-math.inf),
            "must be a finite number",
        ),
    ],
)
def test_python_client_refuses_before_submitting(
    call: Callable[[object], object], fragment: str, clean_env: Path
) -> None:
    from api_client.client import DiffgentorClient

    with DiffgentorClient.from_env() as client, pytest.raises(ConfigurationError) as info:
        call(client)
    assert info.value.exit_code == ExitCode.CONFIGURATION
    assert fragment in str(info.value)


def test_python_client_refuses_a_bomb_given_as_bytes(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from api_client.client import DiffgentorClient

    monkeypatch.setenv("DG_ALLOW_LOCAL_INPUTS", "0")
    with DiffgentorClient.from_env() as client, pytest.raises(InputFileError, match="DG_INPUT_MAX_PIXELS"):
        client.edit_spec("make it red", [bomb_png(20_000, 20_000)])
