"""The engine's specification lives in this repository: docs/engine.md.

Docstrings and comments cite it as `docs/engine.md, 'Section name'`; every cited name must be a
heading of docs/engine.md, and no file may point at documents outside the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINE_DOC = REPO_ROOT / "docs" / "engine.md"
# Where citations of docs/engine.md are expected (and checked).
CITING_ROOTS = ("worker/deepgen", "tests/engine")
CITATION = re.compile(r"docs/engine\.md,\s*((?:'[^']+'(?:\s*(?:,|and)\s*)?)+)")
QUOTED = re.compile(r"'([^']+)'")
HEADING = re.compile(r"^#{2,4}\s+(?:\d+(?:\.\d+)*\.\s+)?(.+?)\s*$")

TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".sh", ".cfg", ".ini", ".yml", ".yaml", ".json", ".mako"}
SKIPPED_DIRS = {
    ".git",
    ".venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "build",
    "dist",
    ".diffgentor",
}
# Marks of a citation of something outside the repository (spelled so that this file has none).
OUTSIDE_MARKS = ("shared" + "/reference", "deepgen-" + "architecture", "reference" + " doc", "\u00a7")


def doc_headings() -> set[str]:
    headings = set()
    for line in ENGINE_DOC.read_text(encoding="utf-8").splitlines():
        match = HEADING.match(line)
        if match:
            headings.add(match.group(1))
    return headings


def cited_sections(text: str) -> list[str]:
    """Section names cited as `docs/engine.md, 'A'` or `docs/engine.md, 'A', 'B' and 'C'`."""
    return [
        " ".join(name.split())  # a name may wrap onto the next docstring line
        for citation in CITATION.finditer(text)
        for name in QUOTED.findall(citation.group(1))
    ]


def repository_text_files() -> list[Path]:
    files = []
    for path in REPO_ROOT.rglob("*"):
        relative = path.relative_to(REPO_ROOT)
        if any(part in SKIPPED_DIRS or part.endswith(".egg-info") for part in relative.parts[:-1]):
            continue
        if path.is_file() and path.suffix in TEXT_SUFFIXES:
            files.append(path)
    return files


def test_citations_parse_names_from_one_or_several_sections() -> None:
    text = "see docs/engine.md, 'Layer picks'.\n(docs/engine.md, 'Text encoding', 'Padding\n    semantics' and 'LoRA')"
    assert cited_sections(text) == ["Layer picks", "Text encoding", "Padding semantics", "LoRA"]


def test_every_citation_names_a_section_of_docs_engine_md() -> None:
    headings = doc_headings()
    citations: dict[str, list[str]] = {}
    for root in CITING_ROOTS:
        for path in sorted((REPO_ROOT / root).rglob("*.py")):
            if path == Path(__file__).resolve():  # this file's examples are not citations
                continue
            for name in cited_sections(path.read_text(encoding="utf-8")):
                citations.setdefault(name, []).append(path.relative_to(REPO_ROOT).as_posix())
    assert citations, "no docstring cites docs/engine.md"
    unknown = {name: places for name, places in citations.items() if name not in headings}
    assert not unknown, f"citations of docs/engine.md sections that do not exist: {unknown}"


def test_the_facts_the_engine_relies_on_have_sections() -> None:
    headings = doc_headings()
    for name in (
        "Model structure",
        "Prompt templates",
        "Layer picks",
        "Connector and conditioning",
        "Sampling and CFG order",
        "Edit path",
        "Checkpoint key names",
        "Environment variables",
        "Reference defects we fix",
        "Library versions",
    ):
        assert name in headings


def test_no_file_cites_documents_outside_the_repository() -> None:
    offenders = []
    for path in repository_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{path.relative_to(REPO_ROOT)}: {mark!r}" for mark in OUTSIDE_MARKS if mark in text]
    assert not offenders, "files citing documents outside the repository: " + "; ".join(offenders)
