"""`diffgentor workers` and `diffgentor health`: is each worker alive AND consuming?

A worker is judged from its registry row (see worker/registry.py) and the job table:

- gone:  its heartbeat is older than `stale_seconds` (default 3 x DG_HEARTBEAT_SECONDS, at
  least 15 s). The process died, hung hard, or lost the database.
- stuck: it is alive and idle (no current job), and the oldest job of its model that is
  `queued` and was published (`published_at` set) has been waiting since `t_p`, while the
  worker's last handled delivery (or its start, if none) was at `t_w`; if
  `now - max(t_p, t_w) > stuck_seconds` (default 60 s) it is stuck. Reason: with prefetch 1
  an idle, consuming worker takes a waiting message within milliseconds, either when the
  message arrives (t_p) or when the worker becomes free (t_w), whichever is later. Idle long
  past that point while the job is still queued = a live process that consumes nothing,
  the stuck-after-Redis-reconnect failure. A worker with a current job is busy and never
  stuck (time limits and leases cover hung jobs); unpublished jobs are the sweeper's business
  and are ignored. A job whose message was lost from Redis also trips the rule: that job will
  not run either, and `diffgentor sweep` cannot see it, so an alert is wanted there too.
- ok / busy otherwise.

Exit codes of `health` (in the CLI's numbering, api_client/errors.py): 0 all selected workers
ok or busy; 1 any gone or stuck; 6 (not found) no registered worker matches the selection (a
crashed worker's row expires after DG_WORKER_EXPIRE_SECONDS, after which "no worker" is what a
monitor sees); 5 (unreachable) when the CLI cannot reach the job database.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

from schemas.tables import utcnow
from worker.registry import WorkerRegistry, WorkerView

State = Literal["ok", "busy", "gone", "stuck"]
EXIT_UNHEALTHY = 1
EXIT_UNREACHABLE = 5  # the CLI's UNREACHABLE
EXIT_NO_WORKER = 6  # the CLI's NOT_FOUND
DEFAULT_STUCK_SECONDS = 60.0
MIN_STALE_SECONDS = 15.0


@dataclass(frozen=True)
class WorkerHealth:
    worker: WorkerView
    state: State
    reason: str

    @property
    def healthy(self) -> bool:
        return self.state in ("ok", "busy")


def assess(worker: WorkerView, oldest_waiting: datetime | None, now: datetime, *, stale_seconds: float,
           stuck_seconds: float) -> WorkerHealth:
    silent = (now - worker.heartbeat_at).total_seconds()
    if silent > stale_seconds:
        return WorkerHealth(worker, "gone", f"no heartbeat for {silent:.0f}s (limit {stale_seconds:.0f}s)")
    if worker.current_job_id is not None:
        return WorkerHealth(worker, "busy", f"running job {worker.current_job_id}")
    if oldest_waiting is not None:
        last_activity = worker.last_job_at or worker.started_at
        should_have_taken_at = max(oldest_waiting, last_activity)
        idle_with_work = (now - should_have_taken_at).total_seconds()
        if idle_with_work > stuck_seconds:
            return WorkerHealth(worker, "stuck", (
                f"idle for {idle_with_work:.0f}s while a job published at {oldest_waiting.isoformat()} "
                f"is still queued for {worker.model_name!r} (limit {stuck_seconds:.0f}s): alive but not consuming"))
    return WorkerHealth(worker, "ok", "idle" if oldest_waiting is None else "idle, work just arrived")


def check(registry: WorkerRegistry, *, worker_id: str | None = None, model_name: str | None = None,
          stale_seconds: float, stuck_seconds: float, now: datetime | None = None) -> list[WorkerHealth]:
    workers = registry.list(model_name=model_name, worker_id=worker_id)
    waiting = registry.oldest_waiting(sorted({w.model_name for w in workers}))
    now = now or utcnow()
    return [assess(w, waiting.get(w.model_name), now, stale_seconds=stale_seconds, stuck_seconds=stuck_seconds)
            for w in workers]


# ---- CLI ------------------------------------------------------------------------------------

def add_arguments(workers: argparse.ArgumentParser, health: argparse.ArgumentParser) -> None:
    """Options of the two sub-commands (the parsers are created by api_client.cli)."""
    for parser in (workers, health):
        parser.add_argument("--model_name", help="only workers of this model")
        parser.add_argument("--stale_seconds", type=float,
                            help="heartbeat age that counts as gone (default 3 x DG_HEARTBEAT_SECONDS, >= 15)")
        parser.add_argument("--stuck_seconds", type=float, default=DEFAULT_STUCK_SECONDS,
                            help="how long an idle worker may leave a published job queued (default 60)")
        parser.add_argument("--json", action="store_true", help="one JSON object per worker")
    health.add_argument("--worker", dest="worker_id", help="only this worker id (as `diffgentor workers` shows)")


def _registry() -> tuple[WorkerRegistry, Any]:
    from worker.db import make_engine, session_factory
    from worker.settings import load_settings

    settings = load_settings()
    return WorkerRegistry(session_factory(make_engine(settings.database_url))), settings


def _results(args: argparse.Namespace) -> list[WorkerHealth] | None:
    """None (after a message on stderr) when the job database cannot be reached."""
    from sqlalchemy.exc import DBAPIError

    registry, settings = _registry()
    stale = args.stale_seconds or max(MIN_STALE_SECONDS, 3 * settings.heartbeat_seconds)
    try:
        return check(registry, worker_id=getattr(args, "worker_id", None), model_name=args.model_name,
                     stale_seconds=stale, stuck_seconds=args.stuck_seconds)
    except DBAPIError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        print(f"unhealthy: cannot read the job database: {reason}", file=sys.stderr)
        return None


def _print(results: Sequence[WorkerHealth], as_json: bool) -> None:
    if as_json:
        for r in results:
            print(json.dumps({**asdict(r.worker), "state": r.state, "reason": r.reason}, default=str))
        return
    now = utcnow()
    print(f"{'WORKER':<44} {'MODEL':<16} {'STATE':<6} {'BEAT':>6} {'DONE':>6} {'LAST JOB':>9}  CURRENT / REASON")
    for r in results:
        w = r.worker
        beat = f"{(now - w.heartbeat_at).total_seconds():.0f}s"
        last = f"{(now - w.last_job_at).total_seconds():.0f}s" if w.last_job_at else "-"
        detail = w.current_job_id if r.state == "busy" else r.reason
        print(f"{w.worker_id:<44} {w.model_name:<16} {r.state:<6} {beat:>6} {w.jobs_done:>6} {last:>9}  {detail}")


def cmd_workers(args: argparse.Namespace) -> int:
    """List registered workers with their state; always exits 0 (use `health` for alerts)."""
    results = _results(args)
    if results is None:
        return EXIT_UNREACHABLE
    if results or args.json:
        _print(results, args.json)
    else:
        print("no registered workers")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    results = _results(args)
    if results is None:
        return EXIT_UNREACHABLE
    if not results:
        what = args.worker_id or args.model_name or "any model"
        print(f"unhealthy: no registered worker for {what}", file=sys.stderr)
        return EXIT_NO_WORKER
    _print(results, args.json)
    bad = [r for r in results if not r.healthy]
    for r in bad:
        print(f"unhealthy: {r.worker.worker_id} is {r.state}: {r.reason}", file=sys.stderr)
    return EXIT_UNHEALTHY if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m worker.health {workers,health} ...` until the diffgentor CLI carries the commands."""
    parser = argparse.ArgumentParser(prog="python -m worker.health")
    commands = parser.add_subparsers(dest="command", required=True)
    workers = commands.add_parser("workers", help="list registered workers")
    health = commands.add_parser("health", help="exit non-zero when a worker is gone or not consuming")
    add_arguments(workers, health)
    workers.set_defaults(handler=cmd_workers)
    health.set_defaults(handler=cmd_health)
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
