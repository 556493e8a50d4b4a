"""Deployment bootstrap: wait for the object store, then create the DG_STORAGE_URL bucket if missing.

Run as ``python -m worker.storage_init`` by the compose ``create-bucket`` one-shot service.
"""

from __future__ import annotations

import os
import sys
import time

from worker.storage import S3ArtifactStore, StorageError, open_store

DEFAULT_WAIT_SECONDS = 60.0


def init_storage(
    storage_url: str, *, wait_seconds: float = DEFAULT_WAIT_SECONDS, poll_seconds: float = 1.0
) -> str:
    """Make ``storage_url`` usable; return a one-line report. Retries while the endpoint is starting."""
    store = open_store(storage_url)
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            if isinstance(store, S3ArtifactStore):
                created = store.ensure_bucket()
                return f"bucket {store.bucket!r} {'created' if created else 'already exists'}"
            store.check_reachable()
            return f"storage {storage_url} is ready"
        except StorageError as exc:
            if "unreachable" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(poll_seconds)


def main() -> int:
    storage_url = os.environ.get("DG_STORAGE_URL", "").strip()
    if not storage_url:
        print("DG_STORAGE_URL is not set; nothing to initialise", file=sys.stderr)
        return 2
    try:
        print(init_storage(storage_url))
    except StorageError as exc:
        print(f"storage init failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
