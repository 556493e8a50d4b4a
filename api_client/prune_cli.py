"""`diffgentor prune --older-than DAYS [--status S ...] [--batch BATCH] [--dry-run] [--json]`.

Deletes finished jobs, their artifact rows and every object under their key prefix
(`worker.retention`, docs/retention.md). `add_prune_command(commands)` registers the parser
(called from `api_client.cli.build_parser`); errors go through `api_client.cli.main`: one
`error:` line and the exit codes of docs/cli.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from datetime import timedelta
from typing import Any

from api_client.errors import ExitCode, ServiceUnreachable, UsageError

_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_EPILOG = """\
examples:
  diffgentor prune --older-than 30 --dry-run          # what would go, nothing deleted
  diffgentor prune --older-than 30                     # every finished job older than 30 days
  diffgentor prune --older-than 7 --status failed --status cancelled
  diffgentor prune --older-than 0 --batch 3f2a9c1e     # every finished job of one batch

A job's age is counted from when it finished. Queued and running jobs are never pruned. Safe to
interrupt: run the same command again to finish. DG_RETENTION_DAYS makes the sweeper prune too.
"""


def add_prune_command(commands: Any) -> None:
    prune = commands.add_parser(
        "prune",
        help="delete finished jobs older than DAYS with their images (retention)",
        description="Delete finished jobs that finished more than DAYS ago, their artifact rows and "
        "every stored object under jobs/<job_id>/.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prune.add_argument(
        "--older-than",
        dest="older_than",
        metavar="DAYS",
        help="days since the job finished (fractions allowed; or an age: 12h, 90m, 30d); 0: every finished job",
    )
    prune.add_argument(
        "--status",
        action="append",
        metavar="S",
        help="succeeded, failed or cancelled (repeatable; default: all three)",
    )
    prune.add_argument("--batch", metavar="BATCH", help="only this batch's jobs (an id or a unique prefix)")
    prune.add_argument("--dry-run", dest="dry_run", action="store_true", help="count, delete nothing")
    prune.add_argument("--json", action="store_true", help="print the report as one JSON object")
    prune.set_defaults(handler=cmd_prune)


def parse_age(text: str | None) -> timedelta:
    """``--older-than``: a number of days, or an age with a unit (s, m, h, d); UsageError otherwise."""
    from worker.retention import MAX_DAYS

    if text is None:
        raise UsageError("prune needs --older-than DAYS (e.g. --older-than 30; 0 prunes every finished job)")
    raw = text.strip()
    match = _AGE.match(raw.lower())
    try:
        days = float(match[1]) * _AGE_UNITS[match[2]] / 86400 if match else float(raw)
    except ValueError:
        raise UsageError(
            f"--older-than {text!r} is not a number of days (e.g. 30, 0.5) or an age (12h, 90m, 30d)"
        ) from None
    if not math.isfinite(days) or not 0 <= days <= MAX_DAYS:
        raise UsageError(f"--older-than must be from 0 to {MAX_DAYS:g} days, got {text!r}")
    return timedelta(days=days)


def parse_statuses(given: list[str] | None) -> tuple[str, ...]:
    from worker.retention import check_statuses

    names = [name for item in (given or []) for name in item.split(",") if name.strip()]
    try:
        return check_statuses(names)
    except ValueError as exc:
        raise UsageError(f"--status: {exc}") from None


def cmd_prune(args: argparse.Namespace) -> int:
    older_than = parse_age(args.older_than)
    statuses = parse_statuses(args.status)
    import sqlalchemy as sa

    from api_client.batches import open_batch
    from api_client.client import DiffgentorClient
    from worker.redact import redact_url
    from worker.retention import Pruner
    from worker.storage import StorageError

    with DiffgentorClient.from_env() as client:
        store, artifacts = client.store, client.artifacts  # both checked: exit 5 when unreachable
        batch_id = open_batch(client, args.batch).id if args.batch else None  # exit 6 / 2
        pruner = Pruner(store, artifacts)
        try:
            report = pruner.prune(
                older_than=older_than, statuses=statuses, batch_id=batch_id, dry_run=args.dry_run
            )
        except KeyboardInterrupt:
            print(
                "interrupted; nothing is left half-done: run the same prune again to finish",
                file=sys.stderr,
            )
            return int(ExitCode.INTERRUPTED)
        except StorageError as exc:
            raise ServiceUnreachable(
                "S3" if client.settings.storage_url.startswith("s3") else "the artifact store",
                redact_url(client.settings.storage_url),
                f"{exc}; the prune stopped part way: run it again to finish",
            ) from None
        except sa.exc.OperationalError as exc:
            reason = str(exc.orig or exc).strip().splitlines()[0] if str(exc.orig or exc).strip() else "error"
            raise ServiceUnreachable(
                "the job database",
                redact_url(client.settings.database_url),
                f"{reason}; the prune stopped part way: run it again to finish",
            ) from None
    if args.json:
        print(json.dumps(report.as_dict()))
    else:
        print(summary(report))
    return int(ExitCode.OK)


def summary(report: Any) -> str:
    """One line: what was (or would be) deleted."""
    cutoff = report.cutoff.isoformat(timespec="seconds") if report.cutoff else "?"
    scope = ", ".join(report.statuses) + (f" of batch {report.batch_id}" if report.batch_id else "")
    counts = (
        f"{report.artifact_rows} artifact row(s), {report.objects} object(s) ({human_bytes(report.bytes)})"
    )
    if report.dry_run:
        pending = (
            f"; {report.pending} interrupted prune(s) pending, finished first by a real prune"
            if report.pending
            else ""
        )
        return (
            f"dry run: would prune {report.jobs} job(s) ({scope}) finished before {cutoff}: {counts}; "
            f"nothing was deleted{pending}"
        )
    resumed = f"; finished {report.resumed} interrupted prune(s) first" if report.resumed else ""
    batches = f", {report.batches} emptied batch record(s)" if report.batches else ""
    kept = f"; left {len(report.kept)} unfinished job(s) alone" if report.kept else ""
    return f"pruned {report.jobs} job(s) ({scope}) finished before {cutoff}: {counts}{batches}{resumed}{kept}"


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"
