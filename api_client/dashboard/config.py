"""What the dashboard was started with, and the rules on binding and on the token."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass

from api_client.errors import ConfigurationError

TOKEN_ENV = "DG_DASHBOARD_TOKEN"
MIN_TOKEN_LENGTH = 16
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True for loopback addresses (127.0.0.0/8, ::1) and the name localhost; False for anything
    else, wildcards (0.0.0.0, ::) and other host names included."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class DashboardConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = None  # DG_DASHBOARD_TOKEN: when set, every page needs it (login or Bearer)
    allow_actions: bool = False  # cancel / retry of jobs and batches (needs the token)
    poll_seconds: float = 2.0  # how often open pages ask for fresh progress
    image_max_bytes: int = 64 * 1024 * 1024  # a full image larger than this is not proxied
    thumbnail_cache_bytes: int = 32 * 1024 * 1024  # thumbnails made here for jobs stored without one

    @property
    def requires_login(self) -> bool:
        return self.token is not None

    def check(self) -> DashboardConfig:
        """Raise `ConfigurationError` (exit 4) for a setting that would expose the dashboard."""
        if self.token is not None and len(self.token) < MIN_TOKEN_LENGTH:
            raise ConfigurationError(
                f"{TOKEN_ENV} is {len(self.token)} characters; use at least {MIN_TOKEN_LENGTH} "
                '(e.g. python -c "import secrets; print(secrets.token_urlsafe(24))")'
            )
        if self.token is None and not is_loopback(self.host):
            raise ConfigurationError(
                f"refusing to serve the dashboard on {self.host}, which is not a loopback address, "
                f"without a token: set {TOKEN_ENV} (at least {MIN_TOKEN_LENGTH} characters), or use "
                f"--host {DEFAULT_HOST}"
            )
        if self.allow_actions and self.token is None:
            raise ConfigurationError(
                f"--allow-actions needs a token: set {TOKEN_ENV} (at least {MIN_TOKEN_LENGTH} characters); "
                "cancel and retry are then offered to whoever logs in with it"
            )
        if not 1 <= self.port <= 65535 and self.port != 0:
            raise ConfigurationError(f"--port must be 1-65535 (or 0 for any free port), got {self.port}")
        return self


def token_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    value = (os.environ if environ is None else environ).get(TOKEN_ENV, "").strip()
    return value or None
