"""Reading the CLI's input files: t2i prompt files and edit CSVs (the DeepGen CLI formats).

Prompt files: ``.jsonl`` (one object with ``prompt`` and optional ``index`` per line, or a bare JSON
string), ``.json`` (an array of such objects or strings), ``.txt`` (one prompt per non-empty line) and
``.csv`` (a ``prompt`` column, optional ``index``). Without ``index`` an entry's index is its 0-based
position among the file's entries.

Edit CSV: ``input_images`` (a JSON list, a comma-separated list or one path/URL; relative paths are
resolved against the CSV's folder), the instruction column (``instruction`` or ``--instruction_key``)
and an optional integer ``index`` (default: the 0-based row number). Every problem is reported before
anything is submitted, naming the file, the row and the column or path at fault.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api_client.errors import InputFileError

PROMPT_FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".csv")
REMOTE_SCHEMES = ("http://", "https://", "s3://")


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
    return reference.lower().startswith(REMOTE_SCHEMES)


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
        entries = [(f"line {n}", line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
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


def _jsonl_entries(path: Path, text: str) -> list[tuple[str, Any]]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise InputFileError(f"{path} line {number} is not valid JSON: {exc.msg}") from None
    return entries


def _json_entries(path: Path, text: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(data, list):
        raise InputFileError(f"{path} must hold a JSON array of prompts or {{'prompt': ...}} objects")
    return [(f"item {n}", item) for n, item in enumerate(data)]


def _csv_prompt_entries(path: Path, text: str) -> list[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    _require_columns(path, reader.fieldnames, ["prompt"], hint="")
    return [(f"row {n} (line {reader.line_num})", dict(row)) for n, row in enumerate(reader)]


def _prompt_row(path: Path, where: str, entry: Any, position: int) -> PromptRow:
    if isinstance(entry, str):
        prompt, index = entry, None
    elif isinstance(entry, dict):
        if "prompt" not in entry:
            raise InputFileError(f"{path} {where} has no 'prompt' field")
        prompt, index = entry["prompt"], entry.get("index")
    else:
        raise InputFileError(f"{path} {where} must be a string or an object with 'prompt'")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputFileError(f"{path} {where} has an empty prompt")
    return PromptRow(index=_parse_index(path, where, index, position), prompt=prompt)


# --------------------------------------------------------------------------------------------- edit CSV


def load_edit_rows(path: str | Path, instruction_key: str = "instruction") -> list[EditRow]:
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"edit input {path} does not exist")
    if path.suffix.lower() != ".csv":
        raise InputFileError(f"edit input {path} must be a .csv file (parquet input is not supported)")
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    hint = (
        "; pass --instruction_key to name the instruction column" if instruction_key == "instruction" else ""
    )
    _require_columns(path, reader.fieldnames, ["input_images", instruction_key], hint=hint)
    rows: list[EditRow] = []
    for number, raw in enumerate(reader):
        line = reader.line_num
        fields = {key: (value or "") for key, value in raw.items() if key is not None}
        where = f"row {number} (line {line})"
        instruction = fields[instruction_key]
        if not instruction.strip():
            raise InputFileError(f"{path} {where} has an empty '{instruction_key}'")
        index = _parse_index(path, where, fields.get("index") or None, number)
        images = parse_input_images(fields["input_images"])
        if not images:
            raise InputFileError(f"{path} {where} has no input_images")
        resolved = tuple(_resolve_image(path, where, image) for image in images)
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


def _resolve_image(csv_path: Path, where: str, reference: str) -> str:
    if is_remote(reference):
        return reference
    candidate = Path(reference).expanduser()
    if not candidate.is_absolute():
        candidate = csv_path.parent / candidate
    if not candidate.is_file():
        raise InputFileError(
            f"{csv_path} {where}: input image {reference} not found (looked at {candidate.absolute()})"
        )
    return str(candidate.resolve())


# --------------------------------------------------------------------------------------------- shared


def _require_columns(path: Path, present: Iterable[str] | None, required: list[str], hint: str) -> None:
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
