"""(g) Scale: latency of the hot job-table statements at 1,000 and at 1,000,000 rows (PostgreSQL).

    .venv/bin/python -m bench.scale --explain

Three tables, each in its own throw-away database migrated by `worker.db.upgrade` and filled
with one INSERT ... SELECT FROM generate_series (then VACUUM ANALYZE and a CHECKPOINT):

* `1k` and `1M`, a realistic mix: the history spread over 30 days (about 94 % succeeded with one
  artifact row each, 4 % failed, 2 % cancelled), 16 running jobs, and a 5 % queued backlog
  created over the last 90 minutes and published just after its insert. Both hold the same
  small amount of sweeper work (10 queued jobs never published, 5 running jobs with an
  expired lease), so the sweep returns the same 15 rows at both sizes.
* `1M backlog`, the issue's case: the `1M` table after its 50,000 queued jobs were all created
  and published in the last 60 s (a burst, or a sweep that just re-published them) and the
  sweeper work was done: one sweep finds nothing, which is the worst case for an ordered scan.

Each statement is called through the project's public API (`worker.jobstore.JobStore`, whose
claim and finishes are `worker.claims`; the sweep scan exactly as `worker.sweeper` calls it)
`--n` times after 5 warm-up calls (at most `--max-seconds` per statement), timed with
`perf_counter` around the call (its round trips plus the Python around them), and list(status=
"succeeded") as well. Writes are undone after each timed call (outside the timing) so the table
stays the same: a claimed job is finished, then put back in the queue; submitted jobs are deleted.
Two reference rows, `SELECT 1` and a 1-row durable INSERT, show the round-trip and commit floor of
the same minutes: on a shared machine they drift, so read a ratio next to them and the EXPLAIN.

Reported: median and p95 per table, and 1M / 1k of the medians; a ratio over 2x is flagged.
`--explain` prints `EXPLAIN (ANALYZE, BUFFERS)` of the statements a flagged call sent (run in a
transaction that is rolled back) and, always, of the sweep scan on every table. The sweep's
target: <= 5 ms per scan at 1M rows with the 50k queued backlog.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from bench.harness import REDIS_BASE, Report, median, pct, pg_database

SWEEP_TARGET_MS = 5.0
RATIO_FLAG = 2.0
RECENT_SECONDS = 90 * 60  # the realistic backlog's age: younger than the republish-stale horizon (2 h)
RUNNING = 16  # jobs running at once (GPUs)
UNPUBLISHED = 10  # sweeper work in the realistic mix: queued, never published, older than the grace
EXPIRED = 5  # ... and running with an expired lease
# The sweeper's settings (`DG_PUBLISH_GRACE_SECONDS`, `DG_REPUBLISH_STALE_SECONDS`, its batch).
SWEEP_KWARGS = {"publish_grace_seconds": 30, "republish_stale_seconds": 7200, "limit": 500}
# Names the sweeper's scan has had, newest first (used when worker/sweeper.py names none the store has).
SWEEP_SCANS = ("sweep_candidates", "unpublished_or_expired")
REFERENCE = "reference: "  # rows that are not the project's statements (never flagged)

_FILL_JOBS = """
INSERT INTO jobs (id, kind, model_name, status, spec, seed, priority, idempotency_key, attempts, max_attempts,
                  worker_id, lease_expires_at, progress_step, progress_total, cancel_requested, error_type,
                  error_message, created_at, published_at, started_at, finished_at, retry_of, provenance,
                  width, height)
SELECT gen_random_uuid()::text, 't2i', :model, s.status,
       jsonb_set(CAST(:spec AS jsonb), '{prompt}', to_jsonb('a red fox in the snow, variation ' || s.g))::json,
       (s.r2 * 4294967295)::bigint,
       CASE WHEN s.r2 < 0.1 THEN 5 ELSE 0 END,
       NULL,
       CASE WHEN s.status IN ('queued', 'cancelled') THEN 0 ELSE 1 END,
       3,
       CASE WHEN s.status IN ('succeeded', 'failed', 'running')
            THEN 'gpu-' || (s.g % 8) || ':' || (4000 + s.g % 8) || ':' || 'bench' END,
       CASE WHEN s.status = 'running' THEN :now + interval '1 day' END,
       CASE s.status WHEN 'succeeded' THEN 50 WHEN 'running' THEN 20 ELSE 0 END,
       50,
       s.status = 'cancelled',
       CASE WHEN s.status = 'failed' THEN 'OutOfMemoryError' END,
       CASE WHEN s.status = 'failed' THEN 'CUDA out of memory. Tried to allocate 2.00 GiB' END,
       s.created_at,
       s.created_at + interval '3 milliseconds',
       CASE WHEN s.status IN ('succeeded', 'failed', 'running') THEN s.created_at + interval '2 seconds' END,
       CASE WHEN s.status IN ('succeeded', 'failed') THEN s.created_at + interval '14 seconds'
            WHEN s.status = 'cancelled' THEN s.created_at + interval '30 seconds' END,
       NULL,
       CASE WHEN s.status = 'succeeded'
            THEN CAST('{"config": "deepgen", "device": "cuda:0", "dtype": "bfloat16"}' AS json) END,
       512, 512
FROM (
    SELECT g, r2,
           CASE WHEN g > :n - :queued THEN 'queued'
                WHEN g > :n - :queued - :running THEN 'running'
                WHEN r < 0.04 THEN 'failed'
                WHEN r < 0.06 THEN 'cancelled'
                ELSE 'succeeded' END AS status,
           CASE WHEN g > :n - :queued - :running THEN :now - random() * :recent * interval '1 second'
                ELSE :now - interval '30 days' + (g::float8 / :n) * (interval '30 days' - interval '3 hours')
           END AS created_at
    FROM (SELECT g, random() AS r, random() AS r2 FROM generate_series(1, :n) AS g) AS x
) AS s
"""

_FILL_ARTIFACTS = """
INSERT INTO artifacts (job_id, index, uri, width, height, bytes, sha256, created_at)
SELECT id, 0, 's3://bench/deepgen/jobs/' || id || '/0.png', 512, 512, 380000 + (seed % 40000),
       md5(id) || md5(reverse(id)), finished_at
FROM jobs WHERE status = 'succeeded'
"""

# Sweeper work of the realistic mix: a producer died before publishing; a worker died mid-job.
_SWEEP_WORK = """
UPDATE jobs SET published_at = NULL, created_at = :now - interval '10 minutes'
WHERE id IN (SELECT id FROM jobs WHERE status = 'queued' ORDER BY id LIMIT :unpublished);
UPDATE jobs SET lease_expires_at = :now - interval '5 minutes', published_at = created_at
WHERE id IN (SELECT id FROM jobs WHERE status = 'running' ORDER BY id LIMIT :expired);
"""

# The case: the whole backlog created and published in the last minute, sweeper work done.
_BURST_BACKLOG = """
UPDATE jobs SET created_at = t.created_at, published_at = t.created_at + interval '2 milliseconds'
FROM (SELECT id, :now - random() * 60 * interval '1 second' AS created_at FROM jobs WHERE status = 'queued') AS t
WHERE jobs.id = t.id;
UPDATE jobs SET lease_expires_at = :now + interval '1 day', published_at = started_at WHERE status = 'running';
"""

_REQUEUE = sa.text(
    "UPDATE jobs SET status = 'queued', attempts = 0, worker_id = NULL, lease_expires_at = NULL, "
    "started_at = NULL, finished_at = NULL, progress_step = 0, "
    "provenance = NULL, error_type = NULL, error_message = NULL WHERE id = :id"
)
_DROP_ARTIFACTS = sa.text("DELETE FROM artifacts WHERE job_id = :id")
_DELETE_JOBS = sa.text("DELETE FROM jobs WHERE id = ANY(:ids)")


@dataclass
class Timing:
    samples: list[float] = field(default_factory=list)  # seconds

    @property
    def median_ms(self) -> float:
        return median(self.samples) * 1000

    @property
    def p95_ms(self) -> float:
        return pct(self.samples, 95) * 1000


@dataclass
class Statement:
    name: str
    call: Callable[[Any], Any]  # timed, given what `prepare` returned
    prepare: Callable[[int], Any] = lambda i: i  # untimed, before each call
    undo: Callable[[Any], None] = lambda _result: None  # untimed, after each call


class Capture:
    """The SQL a call sent (statement and parameters), for EXPLAIN."""

    def __init__(self, engine: sa.Engine) -> None:
        self.recording = False
        self.sent: list[tuple[str, Any]] = []
        sa.event.listen(engine, "before_cursor_execute", self._record)

    def _record(
        self, _conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, executemany: bool
    ) -> None:
        if self.recording:
            self.sent.append((statement, parameters[0] if executemany and parameters else parameters))


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def t2i_spec(database_url: str) -> Any:
    """One valid t2i spec, built by the client's spec builder (no connection is opened)."""
    from api_client.client import DiffgentorClient

    client = DiffgentorClient(database_url=database_url, broker_url=f"{REDIS_BASE}/0")
    return client.t2i_spec("a red fox in the snow", num_inference_steps=50, height=512, width=512)


def fill(engine: sa.Engine, rows: int, spec: Any) -> dict[str, float]:
    """The realistic mix, `rows` jobs, every row's spec `spec` with its own prompt; returns the
    seconds each step took. One `now` for every row (the statements take it as :now)."""
    spent: dict[str, float] = {}
    params = {
        "n": rows,
        "queued": round(rows * 0.05),
        "running": RUNNING,
        "recent": RECENT_SECONDS,
        "model": spec.model_name,
        "spec": json.dumps(spec.model_dump(mode="json")),
    }
    with engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL synchronous_commit TO OFF"))
        conn.execute(sa.text("SET LOCAL maintenance_work_mem TO '256MB'"))
        current = conn.execute(sa.text("SELECT now()")).scalar_one()
        params["now"] = current
        started = time.perf_counter()
        conn.execute(sa.text(_FILL_JOBS), params)
        spent["insert_jobs_s"] = time.perf_counter() - started
        started = time.perf_counter()
        conn.execute(sa.text(_FILL_ARTIFACTS))
        spent["insert_artifacts_s"] = time.perf_counter() - started
        for statement in _SWEEP_WORK.strip().split(";\n"):
            conn.execute(sa.text(statement), {"now": current, "unpublished": UNPUBLISHED, "expired": EXPIRED})
    spent.update(settle(engine))
    return spent


def burst_backlog(engine: sa.Engine) -> dict[str, float]:
    started = time.perf_counter()
    with engine.begin() as conn:
        current = conn.execute(sa.text("SELECT now()")).scalar_one()
        for statement in _BURST_BACKLOG.strip().split(";\n"):
            conn.execute(sa.text(statement), {"now": current})
    spent = {"update_backlog_s": time.perf_counter() - started}
    spent.update(settle(engine))
    return spent


def settle(engine: sa.Engine) -> dict[str, float]:
    """VACUUM ANALYZE (what autovacuum would have done) and a checkpoint, so the fill's writes
    do not land in the timings."""
    started = time.perf_counter()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM (ANALYZE) jobs"))
        conn.execute(sa.text("VACUUM (ANALYZE) artifacts"))
        conn.execute(sa.text("CHECKPOINT"))
    return {"vacuum_analyze_checkpoint_s": time.perf_counter() - started}


def table_facts(engine: sa.Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        counts = dict(conn.execute(sa.text("SELECT status, count(*) FROM jobs GROUP BY status")).all())
        size = conn.execute(sa.text("SELECT pg_size_pretty(pg_total_relation_size('jobs'))")).scalar_one()
        artifacts = conn.execute(sa.text("SELECT count(*) FROM artifacts")).scalar_one()
    return {
        "jobs": sum(counts.values()),
        **{f"status_{k}": v for k, v in sorted(counts.items())},
        "artifacts": artifacts,
        "jobs_total_size": size,
    }


def sweep_scan(store: Any) -> tuple[str, Callable[[], Any]]:
    """The sweeper's scan as `worker.sweeper` calls it: the JobStore method it passes
    `publish_grace_seconds=` to (or, while that file and the store disagree, the newest known
    name the store has), with the keyword arguments its current signature takes."""
    import worker.sweeper

    called = re.findall(r"store\.(\w+)\(\s*publish_grace_seconds=", inspect.getsource(worker.sweeper))
    names = [name for name in [*called, *SWEEP_SCANS] if hasattr(store, name)]
    if not names:
        raise SystemExit(f"JobStore has none of {[*called, *SWEEP_SCANS]}: update bench/scale.py")
    if called and called[0] != names[0]:
        print(
            f"# NOTE: worker/sweeper.py calls JobStore.{called[0]}, which JobStore lacks; timing {names[0]}"
        )
    method = getattr(store, names[0])
    parameters = inspect.signature(method).parameters
    kwargs = {name: value for name, value in SWEEP_KWARGS.items() if name in parameters}
    required = [
        name
        for name, p in parameters.items()
        if p.default is inspect.Parameter.empty
        and name not in kwargs
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    if required:
        raise SystemExit(f"JobStore.{names[0]} now requires {required}: update bench/scale.py")
    return f"{names[0]}({', '.join(f'{k}={v}' for k, v in kwargs.items())})", lambda: method(**kwargs)


def statements(engine: sa.Engine, store: Any, spec: Any) -> list[Statement]:
    with engine.connect() as conn:
        ids = list(conn.execute(sa.text("SELECT id FROM jobs ORDER BY random() LIMIT 5000")).scalars())
        queued = list(
            conn.execute(
                sa.text(
                    "SELECT id FROM jobs WHERE status = 'queued' AND published_at IS NOT NULL ORDER BY random() LIMIT 1000"
                )
            ).scalars()
        )
    rng = random.Random(7)
    sweep_name, sweep = sweep_scan(store)
    pid = os.getpid()
    from schemas.views import ArtifactView
    from worker.claims import ClaimedJob

    artifact = ArtifactView(
        index=0, uri="s3://bench/deepgen/jobs/x/0.png", width=512, height=512, bytes=390000, sha256="0" * 64
    )

    def claim(i: int) -> tuple[str, str]:
        job_id, worker = rng.choice(queued), f"bench:{pid}:{i}"
        outcome = store.claim_or_refusal(job_id, worker, 60)
        assert isinstance(outcome, ClaimedJob), outcome
        return job_id, worker

    def finish(owned: tuple[str, str]) -> str:
        job_id, worker = owned
        assert store.finish_succeeded(
            job_id,
            worker,
            artifacts=[artifact],
            seed=1,
            width=512,
            height=512,
            provenance={"config": "deepgen"},
        )
        return job_id

    def requeue(job_id: str) -> None:
        with engine.begin() as conn:
            conn.execute(_DROP_ARTIFACTS, {"id": job_id})
            conn.execute(_REQUEUE, {"id": job_id})

    def delete(result: list[Any]) -> None:
        with engine.begin() as conn:
            conn.execute(_DELETE_JOBS, {"ids": [s.job.id for s in result]})

    # References, not the project's code: the floor under every read (one round trip) and under
    # every durable write (one commit, fsync-bound), on the same pool and the same minutes.
    auto = engine.execution_options(isolation_level="AUTOCOMMIT")
    with auto.connect() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS bench_commit (x integer)"))

    def round_trip(_: Any) -> None:
        with auto.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def commit(_: Any) -> None:
        with auto.connect() as conn:
            conn.execute(sa.text("INSERT INTO bench_commit VALUES (1)"))

    batch = [spec] * 100
    return [
        Statement("get", store.get, lambda i: rng.choice(ids)),
        Statement("get_many x50", store.get_many, lambda i: rng.sample(ids, 50)),
        Statement("list newest, limit 50", lambda _: store.list(limit=50)),
        Statement("list status=failed, limit 50", lambda _: store.list(status="failed", limit=50)),
        Statement("list status=queued, limit 50", lambda _: store.list(status="queued", limit=50)),
        Statement("list status=succeeded, limit 50", lambda _: store.list(status="succeeded", limit=50)),
        Statement(f"sweep scan: {sweep_name}", lambda _: sweep()),
        Statement("claim (claim_or_refusal)", lambda i: claim(i), undo=lambda owned: requeue(finish(owned))),
        Statement("finish_succeeded + 1 artifact", finish, claim, requeue),
        Statement("submit 1", lambda _: store.submit([spec]), undo=delete),
        Statement("submit 100", lambda _: store.submit(batch), undo=delete),
        Statement(f"{REFERENCE}SELECT 1 (one round trip)", round_trip),
        Statement(f"{REFERENCE}1-row INSERT, durable commit", commit),
    ]


def measure(statement: Statement, n: int, max_seconds: float) -> Timing:
    timing = Timing()
    for i in range(5):
        statement.undo(statement.call(statement.prepare(-1 - i)))
    deadline = time.monotonic() + max_seconds
    for i in range(n):
        given = statement.prepare(i)
        started = time.perf_counter()
        result = statement.call(given)
        timing.samples.append(time.perf_counter() - started)
        statement.undo(result)
        if time.monotonic() > deadline and i >= 20:
            break
    return timing


def explain(engine: sa.Engine, capture: Capture, statement: Statement) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) of every statement one call sends, each rolled back."""
    given = statement.prepare(10**6)
    capture.sent.clear()
    capture.recording = True
    try:
        result = statement.call(given)
    finally:
        capture.recording = False
    sent = list(capture.sent)
    statement.undo(result)
    lines: list[str] = []
    for sql, parameters in sent:
        if not sql.lstrip().upper().startswith(("SELECT", "UPDATE", "INSERT", "DELETE", "WITH")):
            continue
        with engine.connect() as conn:
            transaction = conn.begin()
            try:
                plan = (
                    conn.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", parameters or None)
                    .scalars()
                    .all()
                )
            finally:
                transaction.rollback()
        lines.append(
            "-- " + " ".join(sql.split())[:160] + (" ..." if len(" ".join(sql.split())) > 160 else "")
        )
        lines.extend(plan)
    return lines


def run_table(
    label: str,
    rows: int,
    args: argparse.Namespace,
    results: dict[str, dict[str, Timing]],
    plans: dict[tuple[str, str], list[str]],
    facts: dict[str, Any],
) -> None:
    from worker.db import make_engine, session_factory
    from worker.jobstore import JobStore

    with pg_database() as db:
        engine = make_engine(db)
        capture = Capture(engine)
        store = JobStore(session_factory(engine))
        spec = t2i_spec(db)
        spent = fill(engine, rows, spec)
        print(f"# {label}: filled {rows} jobs in {sum(spent.values()):.1f} s {spent}", flush=True)
        tables = [(label, None)]
        if rows >= args.large:
            tables.append((f"{label} backlog", burst_backlog))
        for name, prepare in tables:
            if prepare is not None:
                spent = prepare(engine)
                print(f"# {name}: {spent}", flush=True)
            facts[name] = {**table_facts(engine), "load": uptime()}
            print(f"# {name}: {facts[name]}", flush=True)
            results[name] = {}
            for statement in statements(engine, store, spec):
                timing = measure(statement, args.n, args.max_seconds)
                results[name][statement.name] = timing
                base = results.get(args.small_label, {}).get(statement.name)
                ratio = timing.median_ms / base.median_ms if base and name != args.small_label else None
                is_sweep = statement.name.startswith("sweep")
                print(
                    f"#   {statement.name}: median {timing.median_ms:.3f} ms, p95 {timing.p95_ms:.3f} ms"
                    + (f", {ratio:.2f}x 1k" if ratio else ""),
                    flush=True,
                )
                flagged = (
                    ratio is not None and ratio > RATIO_FLAG and not statement.name.startswith(REFERENCE)
                )
                if args.explain and (is_sweep or flagged):
                    plans[(name, statement.name)] = explain(engine, capture, statement)
        engine.dispose()


def fmt(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def mark(ratio: float, name: str) -> str:
    over = ratio > RATIO_FLAG and not name.startswith(REFERENCE)
    return f"**{ratio:.2f}x** (> {RATIO_FLAG:.0f}x)" if over else f"{ratio:.2f}x"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200, help="timed calls per statement and table")
    parser.add_argument(
        "--max-seconds", type=float, default=10.0, help="stop a statement after this (>= 20 calls)"
    )
    parser.add_argument("--small", type=int, default=1_000, help="jobs in the small table")
    parser.add_argument("--large", type=int, default=1_000_000, help="jobs in the large table")
    parser.add_argument(
        "--explain",
        action="store_true",
        help="EXPLAIN (ANALYZE, BUFFERS) of statements over 2x and of every sweep scan",
    )
    args = parser.parse_args(argv)
    args.small_label = "1k" if args.small == 1000 else f"{args.small}"
    large_label = "1M" if args.large == 1_000_000 else f"{args.large}"

    print(f"# load before: {uptime()}", flush=True)
    started = time.perf_counter()
    results: dict[str, dict[str, Timing]] = {}
    plans: dict[tuple[str, str], list[str]] = {}
    facts: dict[str, Any] = {}
    run_table(args.small_label, args.small, args, results, plans, facts)
    run_table(large_label, args.large, args, results, plans, facts)
    backlog_label = f"{large_label} backlog"
    print(f"# load after: {uptime()}; whole run {time.perf_counter() - started:.0f} s", flush=True)

    small, large, backlog = results[args.small_label], results[large_label], results[backlog_label]
    print()
    print(
        f"| statement | {args.small_label} median / p95 ms | {large_label} median / p95 ms | "
        f"{large_label} / {args.small_label} | {backlog_label} median / p95 ms | backlog / {args.small_label} |"
    )
    print("|---|---|---|---|---|---|")
    flagged: list[str] = []
    for name, base in small.items():
        big, burst = large[name], backlog[name]
        ratio, burst_ratio = big.median_ms / base.median_ms, burst.median_ms / base.median_ms
        over = [label for label, r in ((large_label, ratio), (backlog_label, burst_ratio)) if r > RATIO_FLAG]
        if over and not name.startswith(REFERENCE):
            flagged.append(f"{name} ({', '.join(over)})")
        label = f"**{name}**" if name.startswith("sweep") else name
        print(
            f"| {label} | {fmt(base.median_ms)} / {fmt(base.p95_ms)} | {fmt(big.median_ms)} / {fmt(big.p95_ms)} | "
            f"{mark(ratio, name)} | {fmt(burst.median_ms)} / {fmt(burst.p95_ms)} | {mark(burst_ratio, name)} |"
        )
    print()
    sweep_name = next(name for name in small if name.startswith("sweep"))
    sweep_ms = backlog[sweep_name].median_ms
    print(
        f"Sweep scan at {backlog_label}: median {sweep_ms:.2f} ms, p95 {backlog[sweep_name].p95_ms:.2f} ms "
        f"(target <= {SWEEP_TARGET_MS:g} ms): {'met' if sweep_ms <= SWEEP_TARGET_MS else 'MISSED'}"
    )
    print(f"Over {RATIO_FLAG:.0f}x: {'; '.join(flagged) if flagged else 'none'}")
    for (table, name), lines in plans.items():
        print(f"\nEXPLAIN (ANALYZE, BUFFERS), {table}, {name}:")
        for line in lines:
            print(f"    {line}")
    print()
    for name, base in small.items():
        figures: dict[str, Any] = {}
        for label, table in ((args.small_label, small), (large_label, large), (backlog_label, backlog)):
            key = label.replace(" ", "_")
            figures[f"{key}_median_ms"] = table[name].median_ms
            figures[f"{key}_p95_ms"] = table[name].p95_ms
        figures["ratio"] = large[name].median_ms / base.median_ms
        figures["backlog_ratio"] = backlog[name].median_ms / base.median_ms
        if name.startswith(REFERENCE):
            Report(f"g scale, {name}", len(large[name].samples), figures, "none (the floor)", True).emit()
        elif name == sweep_name:
            Report(
                f"g scale, {name}",
                len(backlog[name].samples),
                figures,
                f"<= {SWEEP_TARGET_MS:g} ms at {backlog_label}",
                sweep_ms <= SWEEP_TARGET_MS,
            ).emit()
        else:
            Report(
                f"g scale, {name}",
                len(large[name].samples),
                figures,
                f"{large_label} / 1k <= {RATIO_FLAG:g}x",
                max(figures["ratio"], figures["backlog_ratio"]) <= RATIO_FLAG,
            ).emit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
