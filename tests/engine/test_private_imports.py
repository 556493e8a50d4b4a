"""Every import of a model library's internals still resolves with the installed version.

The engine reaches below the top-level API of transformers, diffusers and peft in a few places
(`transformers.models.qwen2_5_vl.modeling_qwen2_5_vl`, `diffusers.models.attention_processor`, ...).
Those layouts move between releases without notice. The list below is not maintained by hand: it is
derived by parsing the project's own source with `ast`, so a new private import is covered the
moment it is written. When one stops resolving, the failure names the import, where it is used and
the installed library version (docs/engine.md, 'Library versions').
"""

from __future__ import annotations

import ast
import importlib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# First-party packages whose source is scanned (worker/ holds the engine in worker/deepgen/).
SCANNED_PACKAGES = ("worker", "api_client", "schemas")
LIBRARIES = ("transformers", "diffusers", "peft")


@dataclass(frozen=True)
class LibraryImport:
    """One `import a.b.c` (name None) or `from a.b import name`, with the places that use it."""

    module: str
    name: str | None
    places: tuple[str, ...] = field(default=(), compare=False)

    @property
    def library(self) -> str:
        return self.module.split(".", 1)[0]

    @property
    def statement(self) -> str:
        return f"import {self.module}" if self.name is None else f"from {self.module} import {self.name}"

    @property
    def is_private(self) -> bool:
        """Below the library's top-level namespace, or any underscore-prefixed part."""
        parts = [*self.module.split("."), *([self.name] if self.name else [])]
        return "." in self.module or any(part.startswith("_") for part in parts)


def library_imports_in_source(source: str, place: str) -> list[LibraryImport]:
    """The absolute imports of transformers / diffusers / peft in one module's source."""
    found: list[LibraryImport] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".", 1)[0] in LIBRARIES:
                    found.append(LibraryImport(alias.name, None, (f"{place}:{node.lineno}",)))
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and node.module
            and node.module.split(".", 1)[0] in LIBRARIES
        ):
            found.extend(
                LibraryImport(node.module, alias.name, (f"{place}:{node.lineno}",)) for alias in node.names
            )
    return found


def scanned_files() -> list[Path]:
    return sorted(path for package in SCANNED_PACKAGES for path in (REPO_ROOT / package).rglob("*.py"))


def private_library_imports() -> list[LibraryImport]:
    """Every private import in the scanned packages, one entry per import with all its places."""
    merged: dict[tuple[str, str | None], list[str]] = {}
    for path in scanned_files():
        place = path.relative_to(REPO_ROOT).as_posix()
        for entry in library_imports_in_source(path.read_text(encoding="utf-8"), place):
            if entry.is_private:
                merged.setdefault((entry.module, entry.name), []).extend(entry.places)
    return [
        LibraryImport(module, name, tuple(places))
        for (module, name), places in sorted(merged.items(), key=str)
    ]


def library_version(library: str) -> str:
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return "not installed"


def import_problem(entry: LibraryImport) -> str | None:
    """None when the import resolves; otherwise a message naming it, its places and the version."""
    where = ", ".join(entry.places) or "(no place recorded)"
    header = (
        f"`{entry.statement}` (used at {where}) no longer resolves with "
        f"{entry.library} {library_version(entry.library)}"
    )
    advice = (
        "the library moved an internal: adapt the import (or narrow the version range in "
        "pyproject.toml) and record it in docs/engine.md, 'Library versions'"
    )
    # The libraries' lazy modules wrap a failed inner import in RuntimeError: catch any exception.
    try:
        module = importlib.import_module(entry.module)
    except Exception as error:
        return (
            f"{header}: module {entry.module} cannot be imported ({type(error).__name__}: {error}); {advice}"
        )
    if entry.name is None:
        return None
    try:
        getattr(module, entry.name)
        return None
    except AttributeError:
        pass
    except Exception as error:
        return (
            f"{header}: {entry.module}.{entry.name} fails to load ({type(error).__name__}: {error}); {advice}"
        )
    try:  # `from package import submodule` also names a module
        importlib.import_module(f"{entry.module}.{entry.name}")
    except ImportError:
        return f"{header}: {entry.module} has no attribute or submodule {entry.name!r}; {advice}"
    except Exception as error:
        return (
            f"{header}: {entry.module}.{entry.name} fails to load ({type(error).__name__}: {error}); {advice}"
        )
    return None


PRIVATE_IMPORTS = private_library_imports()


@pytest.mark.parametrize("entry", PRIVATE_IMPORTS, ids=lambda entry: entry.statement)
def test_private_import_resolves(entry: LibraryImport) -> None:
    problem = import_problem(entry)
    if problem is not None:
        pytest.fail(problem, pytrace=False)


def test_scan_finds_the_engine_private_imports() -> None:
    """The scan is not vacuous: the engine's known internals are in the table."""
    statements = {entry.statement for entry in PRIVATE_IMPORTS}
    assert (
        "from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import eager_attention_forward" in statements
    )
    assert "from diffusers.models.attention_processor import Attention" in statements
    assert all(entry.places for entry in PRIVATE_IMPORTS)


def test_scan_classifies_public_and_private_imports() -> None:
    source = (
        "import torch\n"
        "import transformers\n"
        "import diffusers.utils.logging\n"
        "from transformers import AutoTokenizer, _private_helper\n"
        "from diffusers.models.transformers import SD3Transformer2DModel\n"
        "from peft.tuners.lora import LoraModel\n"
        "from . import sibling\n"
        "def later():\n"
        "    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl\n"
    )
    entries = library_imports_in_source(source, "example.py")
    private = {entry.statement for entry in entries if entry.is_private}
    public = {entry.statement for entry in entries if not entry.is_private}
    assert public == {"import transformers", "from transformers import AutoTokenizer"}
    assert private == {
        "import diffusers.utils.logging",
        "from transformers import _private_helper",
        "from diffusers.models.transformers import SD3Transformer2DModel",
        "from peft.tuners.lora import LoraModel",
        "from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl",
    }


def test_a_moved_import_fails_naming_the_import_and_the_installed_version() -> None:
    version = metadata.version("transformers")
    moved_module = LibraryImport("transformers.models.no_such_model.modeling", "Thing", ("worker/x.py:3",))
    problem = import_problem(moved_module)
    assert problem is not None
    assert "from transformers.models.no_such_model.modeling import Thing" in problem
    assert f"transformers {version}" in problem and "worker/x.py:3" in problem

    moved_name = LibraryImport("transformers.activations", "NO_SUCH_TABLE", ("worker/y.py:7",))
    problem = import_problem(moved_name)
    assert problem is not None
    assert "NO_SUCH_TABLE" in problem and f"transformers {version}" in problem

    assert import_problem(LibraryImport("transformers.models.qwen2_5_vl", "modeling_qwen2_5_vl")) is None
