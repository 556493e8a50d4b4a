"""Resume for the CLI's output folder: an index counts as done only when its PNGs were made from
the same request.

Next to the PNGs, ``OUTPUT_DIR/.diffgentor/{index:06d}.json`` records, for each index, the
fingerprint of the request that made its images (kind, model_name, every generation parameter,
the prompt or instruction and the input images, local ones by content) and the files with their
sizes. The record is written after the PNGs and removed before they are replaced, so a record
always describes complete files. A PNG with no record (an interrupted download, another tool, a
diffgentor release before records) is not known to match, so it is regenerated. docs/cli.md,
"Resume".
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from api_client.errors import InputFileError, path_problem
from api_client.inputs import is_remote
from api_client.outputs import output_names
from worker.files import write_atomically

RECORDS_FOLDER = ".diffgentor"
RECORD_VERSION = 1
_CHUNK = 1 << 20


def request_fingerprint(
    kind: str, model_name: str, params: Mapping[str, Any], request: Mapping[str, Any]
) -> str:
    """sha256 of the canonical request: ``params`` as the spec normalises them (sizes rounded),
    ``request`` the prompt or instruction and the input images (local paths by content)."""
    material = {"kind": kind, "model_name": model_name, "params": dict(params)}
    for key, value in request.items():
        material[key] = [image_identity(ref) for ref in value] if key == "images" else value
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def image_identity(reference: str) -> str:
    """A URL as given; a local file as the sha256 of its bytes (same picture, same identity)."""
    if is_remote(reference):
        return reference
    digest = hashlib.sha256()
    try:
        with open(reference, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise InputFileError(path_problem(exc, "input image")) from None
    return f"sha256:{digest.hexdigest()}"


@dataclass(frozen=True)
class ResumePlan:
    done: list[int]  # indexes whose outputs match the request: skipped
    changed: list[int]  # indexes with output files that do not match (or have no record): regenerated
    todo: list[int]  # every index to run (changed ones included)


class OutputRecords:
    """The per-index records of one output folder."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.folder = output_dir / RECORDS_FOLDER

    def path(self, index: int) -> Path:
        return self.folder / f"{index:06d}.json"

    def plan(self, requests: Sequence[tuple[int, str]], count: int) -> ResumePlan:
        """Sort ``(index, fingerprint)`` pairs into done, changed and to-do."""
        existing = self._existing_outputs()
        done: list[int] = []
        changed: list[int] = []
        todo: list[int] = []
        for index, fingerprint in requests:
            if self.matches(index, fingerprint, count):
                done.append(index)
                continue
            todo.append(index)
            if index in existing:
                changed.append(index)
        return ResumePlan(done, changed, todo)

    def matches(self, index: int, fingerprint: str, count: int) -> bool:
        record = self._read(index)
        if record is None or record.get("request") != fingerprint:
            return False
        files = record.get("files")
        if not isinstance(files, dict) or sorted(files) != output_names(index, count):
            return False
        for name, size in files.items():
            path = self.output_dir / name
            if not path.is_file() or path.stat().st_size != size:
                return False
        return True

    def forget(self, index: int) -> None:
        """Before an index's files are replaced: no record may describe half-written outputs."""
        self.path(index).unlink(missing_ok=True)

    def remember(self, index: int, fingerprint: str, job_id: str, names: Iterable[str]) -> None:
        """After every PNG of the index is in place; drops files of another image count."""
        names = list(names)
        self._remove_other_outputs(index, names)
        record = {
            "version": RECORD_VERSION,
            "request": fingerprint,
            "job_id": job_id,
            "files": {name: (self.output_dir / name).stat().st_size for name in names},
        }
        try:
            self.folder.mkdir(exist_ok=True)
            write_atomically(self.path(index), json.dumps(record, sort_keys=True).encode("utf-8"))
        except OSError as exc:
            raise InputFileError(path_problem(exc, "the resume record")) from None

    def existing_outputs(self, index: int) -> list[Path]:
        return sorted(self.output_dir.glob(f"{index:06d}*.png"))

    def _remove_other_outputs(self, index: int, keep: list[str]) -> None:
        # 000003.png after 000003_00..03.png (or the reverse): the old count's files are stale.
        for path in self.existing_outputs(index):
            if path.name not in keep and _OUTPUT_NAME.fullmatch(path.name):
                path.unlink(missing_ok=True)

    def _existing_outputs(self) -> set[int]:
        indexes: set[int] = set()
        if not self.output_dir.is_dir():
            return indexes
        for path in self.output_dir.iterdir():
            match = _OUTPUT_NAME.fullmatch(path.name)
            if match:
                indexes.add(int(match.group(1)))
        return indexes

    def _read(self, index: int) -> dict[str, Any] | None:
        try:
            record = json.loads(self.path(index).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # no record, or a damaged one: the outputs are not known to match
        return record if isinstance(record, dict) else None


_OUTPUT_NAME = re.compile(r"(\d{6,})(?:_\d{2})?\.png")
