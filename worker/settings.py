"""Every `DG_*` job-system setting, read once from the environment into a frozen dataclass.

Each value is validated with an error that names the variable, and the relationships the
lifecycle depends on are enforced here (see docs/jobs.md for the table):
visibility timeout > hard time limit > soft time limit, and heartbeat < lease.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from worker.redact import redact_url

DEFAULT_WORKER_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_HOME = "~/.diffgentor"
SQLITE_FILE_NAME = "jobs.sqlite3"
ARTIFACTS_DIR_NAME = "artifacts"
ANY_BUCKET = "*"

T = TypeVar("T")


class SettingsError(ValueError):
    """A DG_* variable is missing, malformed or inconsistent with another one."""


@dataclass(frozen=True)
class Settings:
    database_url: str
    broker_url: str | None  # None: producers run jobs in-process (embedded mode)
    storage_url: str
    s3_endpoint_url: str | None
    s3_public_endpoint_url: str | None
    home: Path
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    sweep_interval_seconds: float = 30.0
    # [issue 11 retention] docs/retention.md: the sweeper prunes jobs finished more than this many
    # days ago, with their artifact rows and objects (DG_RETENTION_DAYS); None: off.
    retention_days: float | None = None
    publish_grace_seconds: float = 30.0
    visibility_timeout_seconds: int = 7200
    # A queued job published longer ago than this is published again: its message may be gone
    # (acked after an error, or Redis lost its data); a duplicate is dropped by the claim.
    republish_stale_seconds: float = 7200.0
    soft_time_limit_seconds: float = 3300.0
    hard_time_limit_seconds: float = 3600.0
    unacked_restore_interval_seconds: float = 10.0
    unacked_restore_throttle: int = 10
    max_attempts: int = 3
    # Infrastructure faults (docs/jobs.md, "Transient faults"): retried in place this long, then the
    # job is handed back to the queue after requeue_delay x 2^n seconds (at most 600), at most
    # max_requeues times, before it fails with error class "transient".
    transient_retry_seconds: float = 30.0
    max_requeues: int = 10
    requeue_delay_seconds: float = 15.0
    soft_shutdown_timeout_seconds: float = 30.0
    progress_interval_seconds: float = 0.5
    # [issue 13] docs/jobs.md, "Overlapped finish": a Celery worker encodes, uploads and completes
    # job N on a background thread while job N+1 generates (at most one finish pending); each
    # finish gets finish_timeout_seconds before its lease is let go (the sweeper then re-runs it).
    overlap_finish: bool = True
    finish_timeout_seconds: float = 600.0
    input_max_bytes: int = 32 * 1024 * 1024
    input_timeout_seconds: float = 30.0
    input_max_pixels: int = 40_000_000
    allow_local_inputs: bool = False
    input_allow_private_networks: bool = False
    # Buckets s3:// edit inputs may name (DG_INPUT_S3_BUCKETS); None: the artifact bucket of
    # storage_url when it is s3://, else none. ("*",): any bucket the credentials reach.
    input_s3_buckets: tuple[str, ...] | None = None
    # [issue 11] Job events (docs/events.md): Redis pub/sub hints after each fenced change; waiters
    # re-read the table at least every events_fallback_seconds.
    events: bool = True
    events_fallback_seconds: float = 5.0
    # [issue 11] Signed webhooks from the outbox (worker/webhooks.py); the secret is never printed.
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_allow_private_networks: bool = False
    webhook_timeout_seconds: float = 10.0
    webhook_max_attempts: int = 12
    webhook_retry_seconds: float = 10.0
    webhook_max_age_seconds: float = 86400.0
    webhook_poll_seconds: float = 1.0

    @property
    def embedded(self) -> bool:
        return self.broker_url is None

    @property
    def allowed_input_s3_buckets(self) -> frozenset[str]:
        """The buckets an s3:// edit input may name; contains ``"*"`` when any bucket is allowed."""
        if self.input_s3_buckets is not None:
            return frozenset(self.input_s3_buckets)
        parts = urlsplit(self.storage_url)
        return frozenset({parts.netloc}) if parts.scheme.lower() == "s3" and parts.netloc else frozenset()

    @property
    def worker_broker_url(self) -> str:
        """Workers always need a broker; they default to a local Redis."""
        return self.broker_url or DEFAULT_WORKER_BROKER_URL

    def __post_init__(self) -> None:
        if not self.heartbeat_seconds < self.lease_seconds:
            raise SettingsError(
                f"DG_HEARTBEAT_SECONDS ({self.heartbeat_seconds}) must be smaller than "
                f"DG_LEASE_SECONDS ({self.lease_seconds}), or a live worker would lose its lease"
            )
        if not self.soft_time_limit_seconds < self.hard_time_limit_seconds:
            raise SettingsError(
                f"DG_SOFT_TIME_LIMIT_SECONDS ({self.soft_time_limit_seconds}) must be smaller than "
                f"DG_HARD_TIME_LIMIT_SECONDS ({self.hard_time_limit_seconds})"
            )
        if not self.hard_time_limit_seconds < self.visibility_timeout_seconds:
            raise SettingsError(
                f"DG_VISIBILITY_TIMEOUT_SECONDS ({self.visibility_timeout_seconds}) must be larger than "
                f"DG_HARD_TIME_LIMIT_SECONDS ({self.hard_time_limit_seconds}), or Redis redelivers running jobs"
            )


def _read(env: Mapping[str, str], name: str, parse: Callable[[str], T], default: T, check: str = "") -> T:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = parse(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a valid {parse.__name__} value") from None
    if check == "positive" and not value > 0:  # type: ignore[operator]
        raise SettingsError(f"{name}={raw!r} must be greater than 0")
    if check == "non-negative" and not value >= 0:  # type: ignore[operator]
        raise SettingsError(f"{name}={raw!r} must be 0 or greater")
    return value


# The words every boolean variable accepts (DG_* here, DG_DEEPGEN_*, DG_SKIP_PREFLIGHT), in any case.
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
BOOLEAN_WORDS_HELP = "1/0, true/false, yes/no, on/off"


def parse_bool(raw: str) -> bool:
    """A boolean variable's value (`TRUE_WORDS` / `FALSE_WORDS`, any case, spaces ignored); else ValueError."""
    lowered = raw.strip().lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise ValueError(raw)


def _bool(raw: str) -> bool:
    return parse_bool(raw)


_bool.__name__ = "boolean"  # _read's message: "... is not a valid boolean value"


def _url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not raw.startswith(schemes):
        raise SettingsError(f"{name}={redact_url(raw)!r} must start with one of {', '.join(schemes)}")
    return raw


def _bucket_list(raw: str) -> tuple[str, ...]:
    """Comma-separated bucket names, or ``*``; a name with a slash, colon or @ is a URL, not a bucket."""
    names = tuple(dict.fromkeys(name.strip() for name in raw.split(",") if name.strip()))
    for name in names:
        if name != ANY_BUCKET and not all(c.isalnum() or c in "._-" for c in name):
            raise ValueError(name)
    return names


_bucket_list.__name__ = "comma-separated bucket name list"


def _days(raw: str) -> float:  # [issue 11 retention]
    """A finite number of days, at most a hundred years (DG_RETENTION_DAYS)."""
    value = float(raw)
    if value != value or value > 36_500:  # NaN, inf, a typo
        raise ValueError(raw)
    return value


_days.__name__ = "number of days (at most 36500)"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    home = Path(env.get("DG_HOME", "").strip() or DEFAULT_HOME).expanduser()
    broker_url = _url(env, "DG_BROKER_URL", ("redis://", "rediss://", "redis+socket://", "memory://"))
    if (
        broker_url is not None
        and not broker_url.startswith("memory://")
        and not env.get("DG_DATABASE_URL", "").strip()
    ):
        # The default job table is a SQLite file on this host: a producer would write jobs that
        # workers elsewhere never see, and a worker would wait on a table no producer writes.
        raise SettingsError(
            f"DG_BROKER_URL is set but DG_DATABASE_URL is not: the job table would default to the SQLite file "
            f"{home / SQLITE_FILE_NAME} on this host, which workers (and producers) on other hosts can never see, "
            "so jobs would wait forever. Set DG_DATABASE_URL to the shared job database "
            "(postgresql+psycopg://user:pass@host/db; an explicit sqlite:///PATH is accepted for a single host), "
            "or unset DG_BROKER_URL to run jobs in this process (embedded mode)"
        )
    database_url = env.get("DG_DATABASE_URL", "").strip() or f"sqlite:///{home / SQLITE_FILE_NAME}"
    if not database_url.startswith(("sqlite", "postgresql")):
        raise SettingsError(
            f"DG_DATABASE_URL={redact_url(database_url)!r} must be a sqlite:// or postgresql:// URL"
        )
    storage_url = _url(env, "DG_STORAGE_URL", ("s3://", "file://")) or (home / ARTIFACTS_DIR_NAME).as_uri()
    pos, nonneg = "positive", "non-negative"
    visibility_timeout = _read(env, "DG_VISIBILITY_TIMEOUT_SECONDS", int, 7200, pos)
    return Settings(
        database_url=database_url,
        broker_url=broker_url,
        storage_url=storage_url,
        s3_endpoint_url=_url(env, "DG_S3_ENDPOINT_URL", ("http://", "https://")),
        s3_public_endpoint_url=_url(env, "DG_S3_PUBLIC_ENDPOINT_URL", ("http://", "https://")),
        home=home,
        lease_seconds=_read(env, "DG_LEASE_SECONDS", float, 60.0, pos),
        heartbeat_seconds=_read(env, "DG_HEARTBEAT_SECONDS", float, 10.0, pos),
        sweep_interval_seconds=_read(env, "DG_SWEEP_INTERVAL_SECONDS", float, 30.0, pos),
        # [issue 11 retention] unset: off; fractions allowed (0.5 = 12 h); 0 refused (a job would
        # be deleted before its client fetched the images).
        retention_days=_read(env, "DG_RETENTION_DAYS", _days, None, pos),
        publish_grace_seconds=_read(env, "DG_PUBLISH_GRACE_SECONDS", float, 30.0, nonneg),
        visibility_timeout_seconds=visibility_timeout,
        republish_stale_seconds=_read(
            env, "DG_REPUBLISH_STALE_SECONDS", float, float(visibility_timeout), pos
        ),
        soft_time_limit_seconds=_read(env, "DG_SOFT_TIME_LIMIT_SECONDS", float, 3300.0, pos),
        hard_time_limit_seconds=_read(env, "DG_HARD_TIME_LIMIT_SECONDS", float, 3600.0, pos),
        unacked_restore_interval_seconds=_read(env, "DG_UNACKED_RESTORE_INTERVAL_SECONDS", float, 10.0, pos),
        unacked_restore_throttle=_read(env, "DG_UNACKED_RESTORE_THROTTLE", int, 10, pos),
        max_attempts=_read(env, "DG_MAX_ATTEMPTS", int, 3, pos),
        transient_retry_seconds=_read(env, "DG_TRANSIENT_RETRY_SECONDS", float, 30.0, nonneg),
        max_requeues=_read(env, "DG_MAX_REQUEUES", int, 10, nonneg),
        requeue_delay_seconds=_read(env, "DG_REQUEUE_DELAY_SECONDS", float, 15.0, nonneg),
        soft_shutdown_timeout_seconds=_read(env, "DG_SOFT_SHUTDOWN_TIMEOUT_SECONDS", float, 30.0, nonneg),
        progress_interval_seconds=_read(env, "DG_PROGRESS_INTERVAL_SECONDS", float, 0.5, nonneg),
        # [issue 13] overlapped finish (Celery workers only; embedded mode always finishes in line)
        overlap_finish=_read(env, "DG_OVERLAP_FINISH", _bool, True),
        finish_timeout_seconds=_read(env, "DG_FINISH_TIMEOUT_SECONDS", float, 600.0, pos),
        input_max_bytes=_read(env, "DG_INPUT_MAX_BYTES", int, 32 * 1024 * 1024, pos),
        input_timeout_seconds=_read(env, "DG_INPUT_TIMEOUT_SECONDS", float, 30.0, pos),
        input_max_pixels=_read(env, "DG_INPUT_MAX_PIXELS", int, 40_000_000, pos),
        # Local paths are the producer's own files in embedded mode; a shared worker must refuse them.
        allow_local_inputs=_read(env, "DG_ALLOW_LOCAL_INPUTS", _bool, broker_url is None),
        # SSRF guard: a shared worker must not fetch URLs that reach its own network (metadata service,
        # databases); in embedded mode the URLs are the user's own and reach only what the user can.
        input_allow_private_networks=_read(env, "DG_INPUT_ALLOW_PRIVATE_NETWORKS", _bool, broker_url is None),
        # A job spec must not make a worker read every bucket its credentials reach.
        input_s3_buckets=_read(env, "DG_INPUT_S3_BUCKETS", _bucket_list, None),
        # [issue 11] events (docs/events.md)
        events=_read(env, "DG_EVENTS", _bool, True),
        events_fallback_seconds=_read(env, "DG_EVENTS_FALLBACK_SECONDS", float, 5.0, pos),
        # [issue 11] webhooks
        webhook_secret=_webhook_secret(env),
        # As for inputs: embedded webhooks are the user's own (a local receiver is the usual case).
        webhook_allow_private_networks=_read(
            env, "DG_WEBHOOK_ALLOW_PRIVATE_NETWORKS", _bool, broker_url is None
        ),
        webhook_timeout_seconds=_read(env, "DG_WEBHOOK_TIMEOUT_SECONDS", float, 10.0, pos),
        webhook_max_attempts=_read(env, "DG_WEBHOOK_MAX_ATTEMPTS", int, 12, pos),
        webhook_retry_seconds=_read(env, "DG_WEBHOOK_RETRY_SECONDS", float, 10.0, pos),
        webhook_max_age_seconds=_read(env, "DG_WEBHOOK_MAX_AGE_SECONDS", float, 86400.0, pos),
        webhook_poll_seconds=_read(env, "DG_WEBHOOK_POLL_SECONDS", float, 1.0, pos),
    )


MIN_WEBHOOK_SECRET_CHARS = 16  # [issue 11]


def _webhook_secret(env: Mapping[str, str]) -> str | None:
    """[issue 11] DG_WEBHOOK_SECRET: the HMAC-SHA256 key webhooks are signed with (never logged)."""
    raw = env.get("DG_WEBHOOK_SECRET", "")
    if not raw.strip():
        return None
    if len(raw) < MIN_WEBHOOK_SECRET_CHARS:
        raise SettingsError(
            f"DG_WEBHOOK_SECRET must be at least {MIN_WEBHOOK_SECRET_CHARS} characters long "
            f"(it has {len(raw)}); e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`"
        )
    return raw
