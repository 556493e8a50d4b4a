"""`diffgentor workers` and `diffgentor health`: is each worker alive AND consuming, and does
a sweeper sweep?

A worker is judged from its registry row (see worker/registry.py) and the job table:

- gone:  its heartbeat is older than `stale_seconds` (default 3 x DG_HEARTBEAT_SECONDS, at
  least 15 s). The process died, hung hard, or lost the database.
- replaced: it would be gone, but another row of the same Celery node (`workers.node`) has a
  fresh heartbeat: Celery replaced a killed prefork child and the node consumes again. Not
  unhealthy. (The new child also deletes such rows when it registers, so this is mostly
  seen for rows of a dead child whose pid is still in use, or of another host.) Rows
  without a node (workers of an older release) are judged alone, as before.
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

A node whose every process is gone is reported gone (each of its rows).

A sweeper (a row with role "sweeper", written by `WorkerRegistry.record_sweep` after each
finished sweep) is:

- stalled: its last finished sweep is older than `max(3 x its interval, 15 s)`: dead, hung,
  or failing every sweep.
- replaced: stalled, but a sweeper that started after that last sweep finishes sweeps now
  (a restarted sweeper under a new id). Not unhealthy; the live one deletes the row later.
- ok otherwise.

No sweeper row at all is a warning line, not a failure (the sweeper may run elsewhere, or
not be deployed yet). So is this host's clock running more than 2 s ahead of or behind the job
database's (leases use the database's clock; heartbeats and sweeps each host's own).

Exit codes of `health` (in the CLI's numbering, api_client/errors.py): 0 all selected workers
ok, busy or replaced and no sweeper stalled; 1 any worker gone or stuck, or any sweeper
stalled; 6 (not found) no registered worker matches the selection (a crashed worker's row
expires after DG_WORKER_EXPIRE_SECONDS, after which "no worker" is what a monitor sees; with
`--worker ID` a sweeper id also matches); 5 (unreachable) when the CLI cannot reach the job
database. The sweepers are checked unless `--worker` names a worker.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from typing import Any, Literal

from schemas.tables import utcnow
from worker.registry import MIN_STALE_SECONDS, WorkerRegistry, WorkerView, stale_after

State = Literal["ok", "busy", "gone", "stuck", "replaced", "stalled"]
HEALTHY_STATES = ("ok", "busy", "replaced")
EXIT_UNHEALTHY = 1
EXIT_UNREACHABLE = 5  # the CLI's UNREACHABLE
EXIT_NO_WORKER = 6  # the CLI's NOT_FOUND
DEFAULT_STUCK_SECONDS = 60.0
NO_SWEEPER_WARNING = (
    "warning: no sweeper has reported; run `diffgentor sweep --loop` or a worker with --sweeper --beat"
)
# Leases are judged on the database's clock (worker.claims.db_now_plus); heartbeats, sweeps and
# this report still use each host's clock, so a host this far off its database is worth a line.
CLOCK_SKEW_WARN_SECONDS = 2.0


@dataclass(frozen=True)
class WorkerHealth:
    worker: WorkerView
    state: State
    reason: str

    @property
    def healthy(self) -> bool:
        return self.state in HEALTHY_STATES


@dataclass(frozen=True)
class Report:
    workers: list[WorkerHealth]
    sweepers: list[WorkerHealth]
    sweepers_checked: bool  # False when `--worker` named a worker: no sweeper verdict, no warning

    @property
    def unhealthy(self) -> list[WorkerHealth]:
        return [r for r in (*self.workers, *self.sweepers) if not r.healthy]


def assess(
    worker: WorkerView,
    oldest_waiting: datetime | None,
    now: datetime,
    *,
    stale_seconds: float,
    stuck_seconds: float,
) -> WorkerHealth:
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
            return WorkerHealth(
                worker,
                "stuck",
                (
                    f"idle for {idle_with_work:.0f}s while a job published at {oldest_waiting.isoformat()} "
                    f"is still queued for {worker.model_name!r} (limit {stuck_seconds:.0f}s): alive but not consuming"
                ),
            )
    return WorkerHealth(worker, "ok", "idle" if oldest_waiting is None else "idle, work just arrived")


def check(
    registry: WorkerRegistry,
    *,
    worker_id: str | None = None,
    model_name: str | None = None,
    stale_seconds: float,
    stuck_seconds: float,
    now: datetime | None = None,
) -> list[WorkerHealth]:
    """The selected worker rows (never sweepers), judged; a gone row of a live node is replaced."""
    workers = registry.list(model_name=model_name, worker_id=worker_id)
    waiting = registry.oldest_waiting(sorted({w.model_name for w in workers}))
    now = now or utcnow()
    results = [
        assess(w, waiting.get(w.model_name), now, stale_seconds=stale_seconds, stuck_seconds=stuck_seconds)
        for w in workers
    ]
    gone_nodes = sorted({r.worker.node for r in results if r.state == "gone" and r.worker.node})
    if not gone_nodes:
        return results
    live: dict[str, WorkerView] = {}
    for w in registry.list(nodes=gone_nodes):  # the node's other rows, whatever the selection
        if (now - w.heartbeat_at).total_seconds() <= stale_seconds:
            live.setdefault(w.node or "", w)
    return [
        replace(
            r,
            state="replaced",
            reason=(f"{r.reason}; node {r.worker.node} consumes again as {live[r.worker.node].worker_id}"),
        )
        if r.state == "gone" and r.worker.node in live
        else r
        for r in results
    ]


def assess_sweeper(sweeper: WorkerView, now: datetime, *, live_since: datetime | None = None) -> WorkerHealth:
    """`live_since`: the latest start among the sweepers that are not stalled, if any."""
    interval = sweeper.sweep_interval_seconds or 0.0
    limit = stale_after(interval)
    silent = (now - sweeper.heartbeat_at).total_seconds()
    last = f"last finished a sweep {silent:.0f}s ago, at {sweeper.heartbeat_at.isoformat()}"
    if silent <= limit:
        return WorkerHealth(sweeper, "ok", f"{last} (every {interval:g}s)")
    reason = f"{last} (expected every {interval:g}s, limit {limit:.0f}s)"
    if live_since is not None and live_since > sweeper.heartbeat_at:
        return WorkerHealth(sweeper, "replaced", f"{reason}; a sweeper started since then sweeps")
    return WorkerHealth(sweeper, "stalled", reason)


def check_sweepers(
    registry: WorkerRegistry, *, sweeper_id: str | None = None, now: datetime | None = None
) -> list[WorkerHealth]:
    now = now or utcnow()
    every = registry.sweepers()
    live = [s for s in every if assess_sweeper(s, now).state == "ok"]
    live_since = max((s.started_at for s in live), default=None)
    return [
        assess_sweeper(s, now, live_since=live_since)
        for s in every
        if sweeper_id is None or s.worker_id == sweeper_id
    ]


def report(
    registry: WorkerRegistry,
    *,
    worker_id: str | None = None,
    model_name: str | None = None,
    stale_seconds: float,
    stuck_seconds: float,
    now: datetime | None = None,
) -> Report:
    """Workers and sweepers; `worker_id` may name either (a worker: no sweeper verdict)."""
    now = now or utcnow()
    workers = check(
        registry,
        worker_id=worker_id,
        model_name=model_name,
        stale_seconds=stale_seconds,
        stuck_seconds=stuck_seconds,
        now=now,
    )
    if worker_id is None:
        return Report(workers, check_sweepers(registry, now=now), sweepers_checked=True)
    if workers:  # one worker: no sweeper verdict
        return Report(workers, [], sweepers_checked=False)
    sweepers = check_sweepers(registry, sweeper_id=worker_id, now=now)
    return Report(workers, sweepers, sweepers_checked=bool(sweepers))


def clock_skew_seconds(sessions: Any) -> float:
    """This host's clock minus the job database's, in seconds (positive: this host runs ahead).

    One read of the database's clock, compared with the middle of the host's clock before and
    after it, so the round trip does not count as skew. Always about 0 on SQLite (in-process).
    """
    import sqlalchemy as sa

    from worker.claims import db_now_plus

    with sessions() as session:
        before = utcnow()
        database_now = session.execute(sa.select(db_now_plus(0))).scalar_one()
        after = utcnow()
    return (before + (after - before) / 2 - database_now).total_seconds()


def clock_skew_warning(skew_seconds: float, limit_seconds: float = CLOCK_SKEW_WARN_SECONDS) -> str | None:
    if abs(skew_seconds) <= limit_seconds:
        return None
    direction = "ahead of" if skew_seconds > 0 else "behind"
    return (
        f"warning: this host's clock is {abs(skew_seconds):.1f}s {direction} the job database's "
        f"(more than {limit_seconds:g}s): leases are judged on the database's clock, but heartbeats, "
        "sweeps and this report use each host's own; keep every host in sync (NTP, chrony)"
    )


# ---- CLI ------------------------------------------------------------------------------------


def add_arguments(workers: argparse.ArgumentParser, health: argparse.ArgumentParser) -> None:
    """Options of the two sub-commands (the parsers are created by api_client.cli)."""
    for parser in (workers, health):
        parser.add_argument("--model_name", help="only workers of this model (sweepers are listed too)")
        parser.add_argument(
            "--stale_seconds",
            type=float,
            help="heartbeat age that counts as gone (default 3 x DG_HEARTBEAT_SECONDS, >= 15)",
        )
        parser.add_argument(
            "--stuck_seconds",
            type=float,
            default=DEFAULT_STUCK_SECONDS,
            help="how long an idle worker may leave a published job queued (default 60)",
        )
        parser.add_argument("--json", action="store_true", help="one JSON object per worker or sweeper")
    health.add_argument(
        "--worker",
        dest="worker_id",
        help="only this worker (or sweeper) id, as `diffgentor workers` shows it",
    )


def _registry() -> tuple[WorkerRegistry, Any, Any]:
    from worker.db import make_engine, session_factory
    from worker.settings import load_settings

    settings = load_settings()
    sessions = session_factory(make_engine(settings.database_url))
    return WorkerRegistry(sessions), settings, sessions


def _results(args: argparse.Namespace) -> Report | None:
    """None (after a message on stderr) when the job database cannot be reached."""
    from sqlalchemy.exc import DBAPIError

    registry, settings, sessions = _registry()
    stale = args.stale_seconds or max(MIN_STALE_SECONDS, 3 * settings.heartbeat_seconds)
    try:
        results = report(
            registry,
            worker_id=getattr(args, "worker_id", None),
            model_name=args.model_name,
            stale_seconds=stale,
            stuck_seconds=args.stuck_seconds,
        )
        skew = clock_skew_warning(clock_skew_seconds(sessions))
        if skew is not None:
            print(skew, file=sys.stderr)
        return results
    except DBAPIError as exc:
        reason = str(exc.orig or exc).strip().splitlines()[0]
        print(f"unhealthy: cannot read the job database: {reason}", file=sys.stderr)
        return None


def _ago(now: datetime, when: datetime | None) -> str:
    return f"{(now - when).total_seconds():.0f}s" if when else "-"


def _print(results: Report, as_json: bool) -> None:
    if as_json:
        for r in (*results.workers, *results.sweepers):
            print(json.dumps({**asdict(r.worker), "state": r.state, "reason": r.reason}, default=str))
        return
    now = utcnow()
    if results.workers:
        print(
            f"{'WORKER':<44} {'NODE':<32} {'MODEL':<16} {'STATE':<8} {'BEAT':>6} {'DONE':>6} {'LAST JOB':>9}"
            "  CURRENT / REASON"
        )
    for r in results.workers:
        w = r.worker
        detail = w.current_job_id if r.state == "busy" else r.reason
        print(
            f"{w.worker_id:<44} {w.node or '-':<32} {w.model_name:<16} {r.state:<8} "
            f"{_ago(now, w.heartbeat_at):>6} {w.jobs_done:>6} {_ago(now, w.last_job_at):>9}  {detail}"
        )
    if results.sweepers:
        if results.workers:
            print()
        print(f"{'SWEEPER':<44} {'HOST':<32} {'STATE':<8} {'LAST SWEEP':>10} {'EVERY':>6}  REASON")
    for r in results.sweepers:
        w = r.worker
        every = f"{w.sweep_interval_seconds:g}s" if w.sweep_interval_seconds is not None else "-"
        print(
            f"{w.worker_id:<44} {w.hostname:<32} {r.state:<8} {_ago(now, w.heartbeat_at):>10} {every:>6}  "
            f"{r.reason}"
        )


def _warn_without_sweeper(results: Report) -> None:
    if results.sweepers_checked and not results.sweepers:
        print(NO_SWEEPER_WARNING, file=sys.stderr)


def cmd_workers(args: argparse.Namespace) -> int:
    """List registered workers and sweepers with their state; always exits 0 (use `health` for alerts)."""
    results = _results(args)
    if results is None:
        return EXIT_UNREACHABLE
    if results.workers or results.sweepers or args.json:
        _print(results, args.json)
    if not results.workers and not args.json:
        print("no registered workers")
    _warn_without_sweeper(results)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    results = _results(args)
    if results is None:
        return EXIT_UNREACHABLE
    worker_id = getattr(args, "worker_id", None)
    _print(results, args.json)
    _warn_without_sweeper(results)
    bad = results.unhealthy
    for r in bad:
        print(f"unhealthy: {r.worker.worker_id} is {r.state}: {r.reason}", file=sys.stderr)
    if not results.workers and not (worker_id and results.sweepers):
        what = worker_id or args.model_name or "any model"
        print(f"unhealthy: no registered worker for {what}", file=sys.stderr)
        return EXIT_NO_WORKER
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
