"""Local files written whole or not at all, with the mode of any new file.

`atomic_file` writes to a temporary file beside the target, fsyncs it and renames it over the target
only after a complete write, so an interrupted write never leaves a truncated file that a later run
would take as done. The temporary file comes from `tempfile.mkstemp` (mode 0600); before the rename
it gets the mode `open()` gives a new file (0o666 less the umask), like any file the user's tools
create. Used for `file://` artifacts (DG_HOME/artifacts in embedded mode), artifact downloads and the
CLI's output folder (`{index:06d}.png`, `results.csv`). Standard library only.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

TEMP_SUFFIX = ".tmp"
_UMASK_LOCK = threading.Lock()


def default_file_mode() -> int:
    """The mode `open()` gives a new file here: 0o666 less the umask (mkstemp's temp files are 0600)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask() can only read by setting)
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        current = os.umask(0o022)
        os.umask(current)
    return current


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Write to a temp file beside ``path``; rename it over ``path`` (umask mode) only after a complete write."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp_name, default_file_mode())
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """``data`` as the whole content of ``path`` (see `atomic_file`)."""
    with atomic_file(path) as out:
        out.write(data)
