"""[issue 11] Webhooks on the command line (docs/events.md):

* ``--webhook_url URL`` / ``--webhook_events succeeded,failed`` on `t2i` and `edit`: every job of
  the run gets that webhook; the URL is checked before anything is read or submitted (exit 4, one line:
  not http(s), a private/loopback/link-local host, or DG_WEBHOOK_SECRET unset).
* ``diffgentor webhooks deliver [--loop] [--interval S]``: deliver due outbox rows (once, or until
  SIGTERM); `diffgentor sweep --loop` does the same beside its sweeps.
* ``diffgentor webhooks show JOB``: a job's webhook events (id, type, status, attempts, last error).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from datetime import datetime, timezone
from typing import Any

from api_client.errors import ConfigurationError, ExitCode, UsageError
from schemas.specs import WEBHOOK_EVENTS


def add_webhook_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--webhook_url",
        metavar="URL",
        help="POST each job, signed with DG_WEBHOOK_SECRET, to this http(s) URL when it ends (docs/events.md)",
    )
    parser.add_argument(
        "--webhook_events",
        metavar="LIST",
        help=f"only for these, comma-separated (default: {','.join(WEBHOOK_EVENTS)})",
    )


def apply_webhook_flags(client: Any, args: argparse.Namespace) -> None:
    """The run's webhook becomes the client's default for every spec; refused now when it cannot be sent."""
    url = getattr(args, "webhook_url", None)
    events_text = getattr(args, "webhook_events", None)
    if url is None:
        if events_text is not None:
            raise UsageError("--webhook_events needs --webhook_url")
        return
    events = None
    if events_text is not None:
        events = [event.strip() for event in events_text.split(",") if event.strip()]
        unknown = [event for event in events if event not in WEBHOOK_EVENTS]
        if unknown or not events:
            raise UsageError(
                f"--webhook_events: unknown event(s) {', '.join(unknown) or '(none given)'}; "
                f"choose from {', '.join(WEBHOOK_EVENTS)}"
            )
    from schemas.specs import webhook_url_problem

    problem = webhook_url_problem(url)
    if problem is not None:
        raise ConfigurationError(problem)
    client.check_webhook(url)
    client.webhook_url, client.webhook_events = url, events


def add_webhook_commands(commands: Any) -> None:
    webhooks = commands.add_parser("webhooks", help="deliver webhooks from the outbox, or show a job's")
    actions = webhooks.add_subparsers(dest="webhooks_command", metavar="ACTION", required=True)
    deliver = actions.add_parser("deliver", help="POST due webhook events (once, or --loop)")
    deliver.add_argument("--loop", action="store_true", help="keep delivering until SIGTERM")
    deliver.add_argument(
        "--interval", type=float, help="seconds between passes (default DG_WEBHOOK_POLL_SECONDS)"
    )
    deliver.set_defaults(handler=cmd_deliver)
    show = actions.add_parser("show", help="a job's webhook events and their delivery")
    show.add_argument(
        "job_id", metavar="JOB", help="job id, or a unique prefix of one (at least 4 characters)"
    )
    show.add_argument("--json", action="store_true", help="one JSON object per event")
    show.set_defaults(handler=cmd_show)


def _deliverer(client: Any) -> Any:
    from worker.webhooks import WebhookDeliverer

    if not client.settings.webhook_secret:
        from worker.webhooks import WebhooksUnsigned

        raise ConfigurationError(str(WebhooksUnsigned("`diffgentor webhooks deliver`")))
    return WebhookDeliverer(client.settings, client.store)


def cmd_deliver(args: argparse.Namespace) -> int:
    from api_client.client import DiffgentorClient
    from worker.webhooks import DeliveryReport, run_loop

    client = DiffgentorClient.from_env()
    try:
        deliverer = _deliverer(client)

        def show(report: DeliveryReport) -> None:
            stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
            print(
                f"{stamp} webhooks: {report.delivered} delivered, {report.retried} to retry, {report.dead} dead",
                flush=True,
            )

        if args.loop:
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            run_loop(deliverer, stop=stop, interval_seconds=args.interval, on_report=show)
        else:
            show(deliverer.deliver_due())
    finally:
        client.close()
    return int(ExitCode.OK)


def cmd_show(args: argparse.Namespace) -> int:
    from api_client.client import DiffgentorClient
    from worker.webhooks import WebhookDeliverer

    with DiffgentorClient.from_env() as client:
        job_id = client.resolve_job_id(args.job_id)
        client.get(job_id)  # an unknown job: exit 6
        rows = WebhookDeliverer(client.settings, client.store).rows_for_job(job_id)
    if args.json:
        for row in rows:
            print(json.dumps(row, default=str))
        return int(ExitCode.OK)
    if not rows:
        print(f"job {job_id} has no webhook events", file=sys.stderr)
    for row in rows:
        error = f"  {row['last_error']}" if row["last_error"] else ""
        print(f"{row['id']}  {row['event_type']:<9}  {row['status']:<9}  attempts {row['attempts']}{error}")
    return int(ExitCode.OK)
