"""`diffgentor batches` and `diffgentor batch show|wait|cancel|retry-failed|fetch|export BATCH`.

`add_batch_commands(commands)` registers the parsers (called from `api_client.cli.build_parser`);
errors go through `api_client.cli.main` like every other command's (one `error:` line, the exit
codes of docs/cli.md; a closed stdout ends quietly).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from api_client.errors import ExitCode, UsageError

WINDOW_SECONDS = 600.0  # throughput and ETA over the last 10 minutes
_BATCH_HELP = "batch id, or a unique prefix of one (at least 4 characters)"


def add_batch_commands(commands: Any) -> None:
    """The `batches` and `batch ...` parsers, on the main parser's subcommands."""
    from api_client.cli import _seconds

    listing = commands.add_parser(
        "batches", help="list batches newest first, with progress, throughput and ETA"
    )
    listing.add_argument("--limit", type=int, default=20, help="how many, 1-1000 (default 20)")
    listing.add_argument("--offset", type=int, default=0, help="skip this many batches (next page)")
    listing.add_argument("--owner", help="only this owner's batches (DG_USER or the OS user at submit)")
    listing.add_argument("--json", action="store_true", help="one JSON object per batch")
    listing.set_defaults(handler=cmd_batches)

    batch = commands.add_parser("batch", help="show, wait for, cancel, retry, fetch or export one batch")
    actions = batch.add_subparsers(title="batch commands", metavar="BATCH_COMMAND")
    batch.set_defaults(handler=lambda _args: _usage(batch))

    show = actions.add_parser("show", help="progress of one batch and its failed rows")
    show.add_argument("batch", metavar="BATCH", help=_BATCH_HELP)
    show.add_argument("--limit", type=int, default=50, help="failed rows shown (default 50)")
    show.add_argument("--json", action="store_true", help="one JSON object: the batch, counts, failed rows")
    show.set_defaults(handler=cmd_show)

    wait = actions.add_parser("wait", help="wait until every row finished (exit 0 ok, 1 failures, 7 timeout)")
    wait.add_argument("batch", metavar="BATCH", help=_BATCH_HELP)
    wait.add_argument("--timeout", type=_seconds, help="give up after this many seconds (exit 7)")
    wait.add_argument("--no-progress", action="store_true", help="no progress display")
    wait.set_defaults(handler=cmd_wait)

    cancel = actions.add_parser("cancel", help="cancel every unfinished row")
    cancel.add_argument("batch", metavar="BATCH", help=_BATCH_HELP)
    cancel.set_defaults(handler=cmd_cancel)

    retry = actions.add_parser("retry-failed", help="new linked jobs for the failed and cancelled rows")
    retry.add_argument("batch", metavar="BATCH", help=_BATCH_HELP)
    retry.set_defaults(handler=cmd_retry_failed)

    fetch = actions.add_parser("fetch", help="download every image as {index:06d}.png (or _{j:02d} for N)")
    fetch.add_argument("batch", metavar="BATCH", help=_BATCH_HELP)
    fetch.add_argument("-o", "--output_dir", type=Path, required=True, help="folder for the PNGs")
    fetch.set_defaults(handler=cmd_fetch)

    export = actions.add_parser("export", help="one record per row to CSV or JSON lines")
    export.add_argument("batch", metavar="BATCH", help=_BATCH_HELP)
    export.add_argument("-o", "--output", type=Path, required=True, help="file to write (.csv or .jsonl)")
    export.add_argument("--format", choices=("csv", "jsonl"), help="default: from the file's suffix")
    export.set_defaults(handler=cmd_export)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return int(ExitCode.USAGE)


def _client() -> Any:
    from api_client.client import DiffgentorClient

    return DiffgentorClient.from_env()


# ------------------------------------------------------------------------------------ commands


def cmd_batches(args: argparse.Namespace) -> int:
    from api_client.batches import progress_of

    with _client() as client:
        batches = client.batches(limit=args.limit, offset=args.offset, owner=args.owner)
        for progress in progress_of(client, batches, WINDOW_SECONDS):
            print(_json(progress) if args.json else _line(progress))
        if not args.json and not batches:
            print("no batches" + (f" of owner {args.owner!r}" if args.owner else ""), file=sys.stderr)
        elif not args.json and len(batches) == args.limit:
            print(f"(more may exist: --offset {args.offset + args.limit})", file=sys.stderr)
    return int(ExitCode.OK)


def cmd_show(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise UsageError(f"--limit must be 0 or greater, got {args.limit}")
    with _client() as client:
        batch = client.batch(args.batch)
        progress = batch.progress(WINDOW_SECONDS)
        failed: list[Any] = []
        for job in batch.failed_jobs():
            if len(failed) >= args.limit:
                break
            failed.append(job)
        unsuccessful = progress.counts.unsuccessful
        if args.json:
            record = json.loads(_json(progress))
            record["failed_rows"] = [_failed_record(job) for job in failed]
            print(json.dumps(record))
            return int(ExitCode.OK)
        print(_line(progress))
        for job in failed:
            print(_failed_line(job))
        if unsuccessful > len(failed):
            print(
                f"({unsuccessful - len(failed)} more failed/cancelled row(s): "
                f"`diffgentor batch export {batch.id} -o FILE` lists every row)",
                file=sys.stderr,
            )
    return int(ExitCode.OK)


def cmd_wait(args: argparse.Namespace) -> int:
    from api_client.cli import _quiet_job_logs

    _quiet_job_logs()
    with _client() as client:
        batch = client.batch(args.batch)
        try:
            counts = batch.wait(timeout=args.timeout, progress=not args.no_progress)
        except KeyboardInterrupt:
            client.detach()
            print(
                f"interrupted; the jobs stay queued. Reattach with: diffgentor batch wait {batch.id}",
                file=sys.stderr,
            )
            return int(ExitCode.INTERRUPTED)
        print(_line(batch.progress(WINDOW_SECONDS)))
    unsuccessful = counts["failed"] + counts["cancelled"]
    if unsuccessful:
        print(
            f"{unsuccessful} row(s) failed or were cancelled: `diffgentor batch show {batch.id}` lists them, "
            f"`diffgentor batch retry-failed {batch.id}` runs them again",
            file=sys.stderr,
        )
        return int(ExitCode.JOBS_FAILED)
    return int(ExitCode.OK)


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client() as client:
        batch = client.batch(args.batch)
        result = batch.cancel()
        print(
            f"batch {batch.id}: {result.cancelled} job(s) cancelled, "
            f"{result.stopping} running job(s) stop at their next step"
        )
    return int(ExitCode.OK)


def cmd_retry_failed(args: argparse.Namespace) -> int:
    from api_client.cli import _quiet_job_logs

    _quiet_job_logs()
    with _client() as client:
        batch = client.batch(args.batch)
        made = batch.retry_failed()
        if not made:
            print(f"batch {batch.id}: no failed or cancelled rows to retry")
        else:
            print(
                f"batch {batch.id}: {len(made)} row(s) retried as new jobs; "
                f"follow with: diffgentor batch wait {batch.id}"
            )
    return int(ExitCode.OK)


def cmd_fetch(args: argparse.Namespace) -> int:
    with _client() as client:
        batch = client.batch(args.batch)
        paths = batch.fetch(args.output_dir)
        for path in paths:
            print(path)
        counts = batch.progress(WINDOW_SECONDS).counts
        missing = counts.total - counts.succeeded
        if missing:
            print(
                f"{missing} row(s) have no images yet ({counts.failed} failed, {counts.cancelled} cancelled, "
                f"{counts.unfinished} unfinished)",
                file=sys.stderr,
            )
    return int(ExitCode.OK)


def cmd_export(args: argparse.Namespace) -> int:
    with _client() as client:
        batch = client.batch(args.batch)
        written = batch.export(args.output, format=args.format)
        print(f"wrote {written} row(s) of batch {batch.id} to {args.output}")
    return int(ExitCode.OK)


# ------------------------------------------------------------------------------------ printing


def _line(progress: Any) -> str:
    from api_client.batches import progress_text

    batch = progress.batch
    created = batch.created_at.isoformat(timespec="seconds")
    return (
        f"{batch.id}  {batch.name}  {batch.owner}  {batch.model_name}  {created}  {progress_text(progress)}"
    )


def _json(progress: Any) -> str:
    record = progress.batch.model_dump(mode="json")
    record.update(
        counts=progress.counts.as_dict(),
        window_seconds=progress.window_seconds,
        finished_in_window=progress.finished_in_window,
        per_minute=round(progress.per_minute, 3),
        eta_seconds=None if progress.eta_seconds is None else round(progress.eta_seconds, 1),
    )
    return json.dumps(record)


def _failed_record(job: Any) -> dict[str, Any]:
    return {
        "index": job.batch_index,
        "job_id": job.id,
        "status": job.status.value,
        "error_type": job.error_type,
        "error_message": job.error_message,
    }


def _failed_line(job: Any) -> str:
    error = f"  {job.error_type}: {job.error_message}" if job.error_type else ""
    return f"  index {job.batch_index}  job {job.id}  {job.status.value}{error}"
