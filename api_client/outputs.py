"""The CLI's output folder: ``{index:06d}.png`` files, ``results.csv`` and resume.

A rerun skips every index whose PNG already exists. Files are written to a temporary name and renamed,
so an interrupted run never leaves a truncated PNG that a later run would take as done; they get the
mode of any new file (0o666 less the umask), not the temporary file's 0600 (`worker.files`, which the
artifact stores' downloads use too).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

# default_file_mode is re-exported: callers and tests check written modes against it.
from worker.files import default_file_mode as default_file_mode
from worker.files import write_atomically

RESULT_COLUMNS = ("output_image", "job_id", "seed", "status", "error")


class _Indexed(Protocol):
    @property
    def index(self) -> int: ...


Row = TypeVar("Row", bound=_Indexed)


def output_name(index: int) -> str:
    return f"{index:06d}.png"


def output_path(output_dir: Path, index: int) -> Path:
    return output_dir / output_name(index)


def pending_rows(rows: Sequence[Row], output_dir: Path) -> list[Row]:
    """The rows whose output PNG is not there yet (resume)."""
    return [row for row in rows if not output_path(output_dir, row.index).is_file()]


@dataclass(frozen=True)
class ResultRecord:
    """One results.csv row: the input row's fields plus what happened to its job."""

    index: int
    fields: dict[str, str]
    output_image: str  # file name inside the output folder, empty when there is no image
    job_id: str
    seed: int | None
    status: str
    error: str

    def as_csv_row(self) -> dict[str, str]:
        row = dict(self.fields)
        row["index"] = str(self.index)  # the index used, also when the CSV cell was empty
        row.update(
            output_image=self.output_image,
            job_id=self.job_id,
            seed="" if self.seed is None else str(self.seed),
            status=self.status,
            error=self.error,
        )
        return row


def write_results_csv(path: Path, records: Iterable[ResultRecord]) -> None:
    """Write results.csv, keeping earlier rows for indices this run did not touch (resume)."""
    merged: dict[str, dict[str, str]] = {row.get("index", ""): row for row in read_results_csv(path)}
    for record in records:
        merged[str(record.index)] = record.as_csv_row()
    ordered = sorted(merged.values(), key=lambda row: _index_sort_key(row.get("index", "")))
    columns = _columns(ordered)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in ordered:
        writer.writerow({column: row.get(column, "") for column in columns})
    write_atomically(path, buffer.getvalue().encode("utf-8"))


def read_results_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return [{k: v or "" for k, v in row.items() if k is not None} for row in csv.DictReader(handle)]


def _columns(rows: list[dict[str, str]]) -> list[str]:
    # Input columns first in first-seen order, then our result columns at the end.
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns and key not in RESULT_COLUMNS:
                columns.append(key)
    return columns + list(RESULT_COLUMNS)


def _index_sort_key(value: str) -> tuple[int, str]:
    try:
        return (int(value), "")
    except ValueError:
        return (1 << 62, value)
