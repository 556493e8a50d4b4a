"""Notice that the broker lost its data (Redis restarted without persistence, flushed, failed over
to an empty replica), so the sweeper can re-publish queued jobs within one sweep.

A sentinel key lives in the broker's database beside the queues. It is written with SET NX:
when the write succeeds, the key was missing, so whatever the broker held before is gone
with it: every message of a job that is still `queued` was lost. Redis restarted *with* its
data keeps the key and the messages alike, and nothing is re-published. The first sweep
against a new broker also finds no key; re-publishing then costs duplicates only, which the
claim drops (docs/jobs.md, "Broker data loss").

The broker must not evict keys (`maxmemory-policy noeviction`, as Celery requires anyway).
"""

from __future__ import annotations

import socket
import time
import uuid
from typing import Any

SENTINEL_KEY = "diffgentor:broker-epoch"
SOCKET_TIMEOUT_SECONDS = 5.0


class BrokerEpoch:
    """Watches one Redis broker URL; `lost()` is True once per loss of its data."""

    def __init__(self, broker_url: str) -> None:
        import redis

        self._client: Any = redis.Redis.from_url(
            broker_url, socket_timeout=SOCKET_TIMEOUT_SECONDS, socket_connect_timeout=SOCKET_TIMEOUT_SECONDS
        )

    def lost(self) -> bool:
        """True if the sentinel was missing (and is now set): the broker's data is gone.

        Several sweepers may check at once; SET NX lets exactly one of them see the loss.
        Raises the client's connection error while the broker is down.
        """
        marker = f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}:{time.time():.0f}"
        return bool(self._client.set(SENTINEL_KEY, marker, nx=True))

    def forget(self) -> None:
        """Remove the sentinel, so the next `lost()` reports the loss again (its handling failed)."""
        self._client.delete(SENTINEL_KEY)

    def close(self) -> None:
        self._client.close()


def watches(broker_url: str | None) -> bool:
    """Only Redis brokers are watched (embedded mode has none; `memory://` lives in one process)."""
    return bool(broker_url) and str(broker_url).startswith(("redis://", "rediss://"))
