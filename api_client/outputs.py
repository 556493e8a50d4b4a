"""The CLI's output folder: ``{index:06d}.png`` files (``{index:06d}_{j:02d}.png`` when a row makes
several images) and ``results.csv``.

Files are written to a temporary name and renamed, so an interrupted run never leaves a truncated PNG;
they get the mode of any new file (0o666 less the umask), not the temporary file's 0600 (`worker.files`,
which the artifact stores' downloads use too). Which indexes are already done is `api_client.resume`'s
business.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# default_file_mode is re-exported: callers and tests check written modes against it.
from worker.files import default_file_mode as default_file_mode
from worker.files import write_atomically

RESULT_COLUMNS = ("output_image", "job_id", "seed", "status", "error")
IMAGE_INDEX_COLUMN = "image_index"  # only when a row made several images: j of {index:06d}_{j:02d}.png


def output_name(index: int) -> str:
    return f"{index:06d}.png"


def output_names(index: int, count: int) -> list[str]:
    """``{index:06d}.png`` for one image, ``{index:06d}_{j:02d}.png`` for several (the reference tool's)."""
    if count == 1:
        return [output_name(index)]
    return [f"{index:06d}_{j:02d}.png" for j in range(count)]


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
    image_index: int | None = None  # j, when the row made several images (one CSV row each)

    def as_csv_row(self) -> dict[str, str]:
        row = dict(self.fields)
        row["index"] = str(self.index)  # the index used, also when the CSV cell was empty
        if self.image_index is not None:
            row[IMAGE_INDEX_COLUMN] = str(self.image_index)
        row.update(
            output_image=self.output_image,
            job_id=self.job_id,
            seed="" if self.seed is None else str(self.seed),
            status=self.status,
            error=self.error,
        )
        return row


def write_results_csv(path: Path, records: Iterable[ResultRecord]) -> None:
    """Write results.csv, keeping earlier rows for indices this run did not touch (resume); an index
    this run wrote replaces all of its earlier rows (one per image)."""
    merged: dict[str, list[dict[str, str]]] = {}
    for row in read_results_csv(path):
        merged.setdefault(row.get("index", ""), []).append(row)
    fresh: set[str] = set()
    for record in records:
        key = str(record.index)
        if key not in fresh:
            merged[key] = []
            fresh.add(key)
        merged[key].append(record.as_csv_row())
    ordered = sorted(
        (row for rows in merged.values() for row in rows),
        key=lambda row: (
            _index_sort_key(row.get("index", "")),
            _index_sort_key(row.get(IMAGE_INDEX_COLUMN, "")),
        ),
    )
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
            if key not in columns and key not in RESULT_COLUMNS and key != IMAGE_INDEX_COLUMN:
                columns.append(key)
    several = any(row.get(IMAGE_INDEX_COLUMN) for row in rows)
    return columns + ([IMAGE_INDEX_COLUMN] if several else []) + list(RESULT_COLUMNS)


def _index_sort_key(value: str) -> tuple[int, str]:
    try:
        return (int(value), "")
    except ValueError:
        return (1 << 62, value)
