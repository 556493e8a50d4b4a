"""Reading the CLI's input files: t2i prompt files and edit CSVs (the DeepGen CLI formats).

Prompt files: ``.jsonl`` (one object with ``prompt`` and optional ``index`` per line, or a bare JSON
string), ``.json`` (an array of such objects or strings), ``.txt`` (one prompt per non-empty line) and
``.csv`` (a ``prompt`` column, optional ``index``). Without ``index`` an entry's index is its 0-based
position among the file's entries.

Edit CSV: ``input_images`` (a JSON list, a comma-separated list or one path/URL; relative paths are
resolved against the CSV's folder), the instruction column (``instruction`` or ``--instruction_key``)
and an optional integer ``index`` (default: the 0-based row number). Every problem is reported before
anything is submitted, naming the file, the row and the column or path at fault.

Hygiene: CSVs are read strictly (a broken quote is an error naming its line, not prompts silently
merged or split), a row with more values than the header has columns is refused, lines end only at
CR/LF (not at U+2028 and the other breaks str.splitlines() knows), and text a job cannot store (NUL
characters, lone surrogates) is refused with its line. Local edit images over DG_INPUT_MAX_PIXELS
are refused from their header, by the worker's own check (``worker.inputs.pixel_limit_problem``).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api_client.errors import InputFileError
from schemas.specs import is_remote_reference, text_problem

PROMPT_FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".csv")


@dataclass(frozen=True)
class PromptRow:
    index: int
    prompt: str


@dataclass(frozen=True)
class EditRow:
    index: int
    instruction: str
    images: tuple[str, ...]  # absolute local paths or remote URLs, in CSV order
    fields: dict[str, str] = field(default_factory=dict)  # the row as read, for results.csv
    line: int = 0  # 1-based CSV line (header is line 1), for messages


def is_remote(reference: str) -> bool:
    """An s3:// or http(s):// reference (any case) that the worker fetches, not a local file."""
    return is_remote_reference(reference)


# --------------------------------------------------------------------------------------------- prompts


def load_prompts(path: str | Path) -> list[PromptRow]:
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"prompts file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in PROMPT_FILE_SUFFIXES:
        raise InputFileError(
            f"prompts file {path} has an unsupported extension {suffix or '(none)'}; "
            f"use one of {', '.join(PROMPT_FILE_SUFFIXES)}"
        )
    text = _read_text(path)
    if suffix == ".jsonl":
        entries = _jsonl_entries(path, text)
    elif suffix == ".json":
        entries = _json_entries(path, text)
    elif suffix == ".txt":
        entries = [(f"line {n}", line.strip()) for n, line in enumerate(_lines(text), 1) if line.strip()]
    else:
        entries = _csv_prompt_entries(path, text)
    rows = [_prompt_row(path, where, entry, position) for position, (where, entry) in enumerate(entries)]
    if not rows:
        raise InputFileError(f"prompts file {path} contains no prompts")
    _check_unique_indices(path, [(row.index, where) for row, (where, _) in zip(rows, entries, strict=True)])
    return rows


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise InputFileError(f"cannot read {path}: {exc.strerror}") from None


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _lines(text: str) -> list[str]:
    """Split at line ends only: str.splitlines() also splits at U+2028, U+0085, form feeds and more,
    which may stand inside a prompt (and unescaped inside a JSON string)."""
    return _LINE_BREAK.split(text)


def _jsonl_entries(path: Path, text: str) -> list[tuple[str, Any]]:
    entries = []
    for number, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            entries.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise InputFileError(
                f"{path} line {number} is not valid JSON ({exc.msg}: column {exc.colno}); "
                'each line must be one JSON object like {"prompt": "..."} or one JSON string'
            ) from None
    return entries


def _json_entries(path: Path, text: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(
            f"{path} is not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})"
        ) from None
    if not isinstance(data, list):
        raise InputFileError(f"{path} must hold a JSON array of prompts or {{'prompt': ...}} objects")
    return [(f"item {n}", item) for n, item in enumerate(data)]


def _csv_prompt_entries(path: Path, text: str) -> list[tuple[str, Any]]:
    header, rows = _read_csv(path, text)
    if not header:
        raise InputFileError(
            f"prompts file {path} is empty: its first line must be a header with a 'prompt' column"
        )
    _require_columns(path, header, ["prompt"])
    return [(f"row {n} (line {line})", fields) for n, (line, fields) in enumerate(rows)]


def _prompt_row(path: Path, where: str, entry: Any, position: int) -> PromptRow:
    if isinstance(entry, str):
        prompt, index = entry, None
    elif isinstance(entry, dict):
        if "prompt" not in entry:
            raise InputFileError(f"{path} {where} has no 'prompt' field")
        prompt, index = entry["prompt"], entry.get("index")
    else:
        raise InputFileError(f"{path} {where} must be a string or an object with 'prompt'")
    if prompt is not None and not isinstance(prompt, str):
        raise InputFileError(f"{path} {where}: the prompt must be a string, not {type(prompt).__name__}")
    if not prompt or not prompt.strip():
        raise InputFileError(f"{path} {where} has an empty prompt")
    _check_text(path, where, "prompt", prompt)
    return PromptRow(index=_parse_index(path, where, index, position), prompt=prompt)


# --------------------------------------------------------------------------------------------- edit CSV


def load_edit_rows(
    path: str | Path, instruction_key: str = "instruction", max_pixels: int | None = None
) -> list[EditRow]:
    """``max_pixels``: refuse local images over this many pixels (default: DG_INPUT_MAX_PIXELS's default)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"edit input {path} does not exist")
    if path.suffix.lower() != ".csv":
        raise InputFileError(f"edit input {path} must be a .csv file (parquet input is not supported)")
    header, csv_rows = _read_csv(path, _read_text(path))
    if not header:
        raise InputFileError(
            f"edit input {path} is empty: its first line must be a header with the columns "
            f"input_images and {instruction_key}"
        )
    _require_columns(path, header, ["input_images"])
    hint = (
        "; pass --instruction_key to name the instruction column" if instruction_key == "instruction" else ""
    )
    _require_columns(path, header, [instruction_key], hint=hint)
    rows: list[EditRow] = []
    for number, (line, fields) in enumerate(csv_rows):
        where = f"row {number} (line {line})"
        instruction = fields[instruction_key]
        if not instruction.strip():
            raise InputFileError(f"{path} {where} has an empty '{instruction_key}'")
        _check_text(path, where, f"'{instruction_key}'", instruction)
        index = _parse_index(path, where, fields.get("index") or None, number)
        images = parse_input_images(fields["input_images"])
        if not images:
            raise InputFileError(f"{path} {where} has no input_images")
        resolved = tuple(_resolve_image(path, where, image, max_pixels) for image in images)
        rows.append(EditRow(index=index, instruction=instruction, images=resolved, fields=fields, line=line))
    if not rows:
        raise InputFileError(f"edit input {path} has a header but no rows")
    _check_unique_indices(path, [(row.index, f"line {row.line}") for row in rows])
    return rows


def parse_input_images(cell: str) -> list[str]:
    """One ``input_images`` cell -> references: JSON list, comma list, or a single path/URL."""
    cell = cell.strip()
    if cell.startswith("["):
        try:
            items = json.loads(cell)
        except json.JSONDecodeError:
            items = None
        if isinstance(items, list):
            return [str(item).strip() for item in items if str(item).strip()]
    if "," in cell:
        return [part.strip() for part in cell.split(",") if part.strip()]
    return [cell] if cell else []


def _resolve_image(csv_path: Path, where: str, reference: str, max_pixels: int | None = None) -> str:
    if is_remote(reference):
        return reference
    candidate = Path(reference).expanduser()
    if not candidate.is_absolute():
        candidate = csv_path.parent / candidate
    if not candidate.is_file():
        raise InputFileError(
            f"{csv_path} {where}: input image {reference} not found (looked at {candidate.absolute()})"
        )
    problem = local_image_problem(candidate, max_pixels)
    if problem:
        raise InputFileError(f"{csv_path} {where}: input image {reference}: {problem}")
    return str(candidate.resolve())


def local_image_problem(source: bytes | str | Path, max_pixels: int | None = None) -> str | None:
    """Why a local image (a file or its bytes) would be refused for its pixel count, or None.

    The worker's own decompression-bomb check (header only), so a bomb is refused at submit, naming
    DG_INPUT_MAX_PIXELS, instead of being uploaded. ``max_pixels`` None: the setting's default.
    """
    from worker.inputs import InputLimits, pixel_limit_problem

    limit = InputLimits().max_pixels if max_pixels is None else max_pixels
    return pixel_limit_problem(source, limit)


# --------------------------------------------------------------------------------------------- shared


def _read_csv(path: Path, text: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and each non-blank row as (its first line, {column: value}), read strictly.

    A broken quote (a quoted field that never ends, or text after a closing quote) is an error naming
    the row's first line instead of rows silently merged; so is a row with more values than the
    header has columns (an unquoted comma). Missing trailing values read as "".
    """
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, str]]] = []
    while True:
        first_line = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise InputFileError(_broken_csv_message(path, first_line, reader.line_num, exc)) from None
        if not values:  # a blank line
            continue
        if header is None:
            header = values
            continue
        if any(value.strip() for value in values[len(header) :]):  # empty trailing cells are harmless
            raise InputFileError(
                f"{path} line {first_line} has {len(values)} values but the header has {len(header)} "
                "columns; put a value that contains commas in double quotes"
            )
        rows.append(
            (first_line, {name: (values[i] if i < len(values) else "") for i, name in enumerate(header)})
        )
    return header or [], rows


def _broken_csv_message(path: Path, first_line: int, last_line: int, exc: csv.Error) -> str:
    if "unexpected end of data" in str(exc):
        problem = "a quoted field that starts on this row never ends (the file ends inside it)"
    else:
        seen = "" if last_line <= first_line else f" (noticed on line {last_line})"
        problem = f"broken CSV quoting: {exc}{seen}"
    return (
        f"{path} line {first_line}: {problem}; a field that starts with a double quote must end with one, "
        'and a quote inside a quoted field is written twice ("")'
    )


def _check_text(path: Path, where: str, what: str, value: str) -> None:
    problem = text_problem(value)
    if problem:
        raise InputFileError(f"{path} {where}: the {what} {problem}")


def _require_columns(path: Path, present: Iterable[str] | None, required: list[str], hint: str = "") -> None:
    columns = [c for c in (present or []) if c is not None]
    for column in required:
        if column not in columns:
            shown = ", ".join(columns) if columns else "none"
            raise InputFileError(f"{path} has no '{column}' column (columns: {shown}){hint}")


def _parse_index(path: Path, where: str, value: Any, default: int) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        index = int(str(value).strip())
    except ValueError:
        raise InputFileError(f"{path} {where}: index {value!r} is not an integer") from None
    if index < 0:
        raise InputFileError(f"{path} {where}: index {index} is negative")
    return index


def _check_unique_indices(path: Path, indexed: list[tuple[int, str]]) -> None:
    seen: dict[int, str] = {}
    for index, where in indexed:
        if index in seen:
            raise InputFileError(f"{path}: index {index} is used twice ({seen[index]} and {where})")
        seen[index] = where
