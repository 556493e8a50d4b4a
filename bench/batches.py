"""(i) Batches: what `diffgentor batches` / `batch show|wait` cost on a 100,000-job batch (PostgreSQL).

    .venv/bin/python -m bench.batches --explain

One throw-away database migrated by `worker.db.upgrade`, filled with INSERT ... SELECT FROM
generate_series (then VACUUM ANALYZE and a CHECKPOINT):

* the batch under test, `--batch` rows (100,000): 60 % succeeded and 3 % failed (finished over the
  last 30 minutes, so the 10-minute throughput window holds about a third of them), 1 % cancelled,
  16 running, the rest queued; 5 % of its rows were retried once, so the table also holds their
  superseded failed first jobs (5,000 rows the counts must leave out);
* `--other-batches` batches of `--other-size` rows (20 x 10,000) and `--unbatched` jobs submitted
  alone (300,000), so the batch's index ranges sit among other rows.

Each statement is called through `worker.batches.BatchStore` (what the client and the CLI call)
`--n` times after 5 warm-up calls, timed with `perf_counter` around the call. The counts are an
index-only scan: a row on a heap page changed since the last VACUUM (not all-visible in the
visibility map) costs a heap visit, so they are timed in three states:

* vacuumed: every page all-visible (a finished or idle batch, or one autovacuum just passed);
* 10,000 rows finished since the last VACUUM, a contiguous index range (workers take a batch in
  order): the state `batch wait` polls in while the batch runs;
* the worst case: a row on every heap page of the batch changed since the last VACUUM (20 % of
  the rows, spread over all of them).

The target: counts per status of the 100,000-job batch <= 50 ms (median), in the first two
states. `--explain` prints `EXPLAIN (ANALYZE, BUFFERS)` of the counts statement in each state.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import sqlalchemy as sa

from bench.harness import Report, pg_database
from bench.scale import Capture, Statement, Timing, explain, measure, settle, t2i_spec, uptime

COUNTS_TARGET_MS = 50.0
BATCH_ID = "b0000000-0000-4000-8000-000000000000"
RETRIED_SHARE = 0.05

_FILL_BATCHES = """
INSERT INTO batches (id, name, owner, model_name, created_at, job_count)
SELECT CASE WHEN g = 0 THEN :batch_id ELSE gen_random_uuid()::text END,
       CASE WHEN g = 0 THEN 'bench 100k' ELSE 'other ' || g END,
       'bench', :model, :now - (g + 1) * interval '1 minute',
       CASE WHEN g = 0 THEN :batch ELSE :other_size END
FROM generate_series(0, :other_batches) AS g
"""

# One row per (batch, index): the batch under test gets the mix above, the others all succeeded.
_FILL_JOBS = """
INSERT INTO jobs (id, kind, model_name, status, spec, seed, priority, attempts, max_attempts, worker_id,
                  lease_expires_at, progress_step, progress_total, cancel_requested, error_type, error_message,
                  created_at, published_at, started_at, finished_at, batch_id, batch_index, superseded)
SELECT gen_random_uuid()::text, 't2i', :model, s.status,
       jsonb_set(CAST(:spec AS jsonb), '{prompt}', to_jsonb('prompt ' || s.i))::json,
       (random() * 4294967295)::bigint, 0,
       CASE WHEN s.status IN ('queued', 'cancelled') THEN 0 ELSE 1 END, 3,
       CASE WHEN s.status IN ('succeeded', 'failed', 'running') THEN 'gpu-' || (s.i % 16) || ':1:bench' END,
       CASE WHEN s.status = 'running' THEN :now + interval '1 minute' END,
       CASE WHEN s.status = 'succeeded' THEN 50 ELSE 0 END, 50,
       s.status = 'cancelled',
       CASE WHEN s.status = 'failed' THEN 'OutOfMemoryError' END,
       CASE WHEN s.status = 'failed' THEN 'CUDA out of memory' END,
       :now - interval '40 minutes', :now - interval '40 minutes',
       CASE WHEN s.status IN ('succeeded', 'failed', 'running') THEN s.finished_at - interval '10 seconds' END,
       CASE WHEN s.status IN ('succeeded', 'failed', 'cancelled') THEN s.finished_at END,
       s.batch_id, s.i, false
FROM (
    SELECT b.id AS batch_id, g.i,
           CASE WHEN b.id <> :batch_id THEN 'succeeded'
                WHEN g.i % 100 < 60 THEN 'succeeded'
                WHEN g.i % 100 < 63 THEN 'failed'
                WHEN g.i % 100 < 64 THEN 'cancelled'
                WHEN g.i % 100 = 64 AND g.i < 1600 THEN 'running'
                ELSE 'queued' END AS status,
           :now - random() * interval '30 minutes' AS finished_at
    FROM batches AS b, LATERAL generate_series(0, b.job_count - 1) AS g(i)
) AS s
"""

# The retried rows: their first job failed and was superseded by the row's current job.
_FILL_SUPERSEDED = """
INSERT INTO jobs (id, kind, model_name, status, spec, seed, priority, attempts, max_attempts, progress_step,
                  progress_total, cancel_requested, error_type, error_message, created_at, published_at,
                  started_at, finished_at, batch_id, batch_index, superseded)
SELECT gen_random_uuid()::text, kind, model_name, 'failed', spec, seed, 0, 1, 3, 0, 50, false,
       'OutOfMemoryError', 'CUDA out of memory', created_at, published_at, created_at, created_at + interval '20 s',
       batch_id, batch_index, true
FROM jobs WHERE batch_id = :batch_id AND batch_index % 100 >= 65 AND batch_index % 100 < 65 + :retried_percent
"""

_UNBATCHED = """
INSERT INTO jobs (id, kind, model_name, status, spec, seed, priority, attempts, max_attempts, progress_step,
                  progress_total, cancel_requested, created_at, finished_at)
SELECT gen_random_uuid()::text, 't2i', :model, 'succeeded', CAST(:spec AS json), g, 0, 1, 3, 50, 50, false,
       :now - interval '2 days', :now - interval '2 days'
FROM generate_series(1, :unbatched) AS g
"""

# Work finishing without a VACUUM afterwards: the next counts meet pages that are not all-visible
# (the index-only scan visits the heap for their rows until autovacuum has run).
_FINISH_IN_ORDER = """
UPDATE jobs SET status = 'succeeded', finished_at = :now, progress_step = 50
WHERE batch_id = :batch_id AND superseded = false AND status = 'queued'
  AND batch_index >= :first AND batch_index < :first + 10000 * 100 / 36
"""
_TOUCH_EVERY_PAGE = """
UPDATE jobs SET progress_step = progress_step + 1
WHERE batch_id = :batch_id AND superseded = false AND batch_index % 100 >= 80
"""


def fill(engine: sa.Engine, args: argparse.Namespace, spec: Any) -> dict[str, float]:
    import json

    spent: dict[str, float] = {}
    params = {
        "batch_id": BATCH_ID,
        "batch": args.batch,
        "other_batches": args.other_batches,
        "other_size": args.other_size,
        "unbatched": args.unbatched,
        "model": spec.model_name,
        "spec": json.dumps(spec.model_dump(mode="json")),
        "retried_percent": round(RETRIED_SHARE * 100),
    }
    with engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL synchronous_commit TO OFF"))
        conn.execute(sa.text("SET LOCAL maintenance_work_mem TO '256MB'"))
        params["now"] = conn.execute(sa.text("SELECT now()")).scalar_one()
        for name, statement in (
            ("batches", _FILL_BATCHES),
            ("batch_jobs", _FILL_JOBS),
            ("superseded", _FILL_SUPERSEDED),
            ("unbatched", _UNBATCHED),
        ):
            started = time.perf_counter()
            conn.execute(sa.text(statement), params)
            spent[f"insert_{name}_s"] = time.perf_counter() - started
    spent.update(settle(engine))
    started = time.perf_counter()
    spent["all_visible_fraction"] = vacuum_until_all_visible(engine)
    spent["vacuum_until_all_visible_s"] = time.perf_counter() - started
    return spent


def vacuum_until_all_visible(engine: sa.Engine, tries: int = 20) -> float:
    """VACUUM jobs until the visibility map covers >= 99 % of its pages (an autovacuum ANALYZE
    running at the same time holds a snapshot that keeps a VACUUM from marking fresh rows);
    returns the fraction reached."""
    fraction = 0.0
    for _ in range(tries):
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("VACUUM (ANALYZE) jobs"))
            pages, visible = conn.execute(
                sa.text("SELECT relpages, relallvisible FROM pg_class WHERE relname = 'jobs'")
            ).one()
        fraction = visible / pages if pages else 1.0
        if fraction >= 0.99:
            break
        time.sleep(1.0)
    return fraction


def facts(engine: sa.Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT superseded, status, count(*) FROM jobs WHERE batch_id = :b GROUP BY 1, 2 ORDER BY 1, 2"
            ),
            {"b": BATCH_ID},
        ).all()
        total = conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one()
        size = conn.execute(
            sa.text("SELECT pg_size_pretty(pg_relation_size('ix_jobs_batch_rows'))")
        ).scalar_one()
    return {
        "jobs_in_table": total,
        "batch_rows": {f"{'superseded ' if s else ''}{status}": n for s, status, n in rows},
        "ix_jobs_batch_rows_size": size,
    }


def statements(engine: sa.Engine, batches: Any, store: Any) -> list[Statement]:
    from worker.batches import BatchStore

    assert isinstance(batches, BatchStore)
    view = batches.get(BATCH_ID)
    with engine.connect() as conn:
        failed = list(
            conn.execute(
                sa.text(
                    "SELECT id FROM jobs WHERE batch_id = :b AND NOT superseded AND status = 'failed' "
                    "ORDER BY batch_index LIMIT 1000"
                ),
                {"b": BATCH_ID},
            ).scalars()
        )
    middle = view.job_count // 2

    def undo_retry(made: Any) -> None:
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM jobs WHERE id = :id"), {"id": made.id})
            conn.execute(sa.text("UPDATE jobs SET superseded = false WHERE id = :id"), {"id": made.retry_of})

    return [
        Statement("counts per status (BatchStore.counts)", lambda _: batches.counts(BATCH_ID)),
        Statement("progress: counts + throughput (BatchStore.progress)", lambda _: batches.progress(view)),
        Statement(
            "batches: list 20 newest + progress_many",
            lambda _: batches.progress_many(batches.list(limit=20)),
        ),
        Statement("jobs: first page of 500 rows", lambda _: next(batches.job_pages(BATCH_ID))),
        Statement(
            f"jobs: the page after index {middle}", lambda _: next(batches.job_pages(BATCH_ID, after=middle))
        ),
        Statement(
            "failed rows: first 50 (batch show)",
            lambda _: next(batches.job_pages(BATCH_ID, statuses=["failed", "cancelled"], page_size=50)),
        ),
        Statement(
            "retry one failed row (JobStore.retry)",
            lambda i: store.retry(failed[i % len(failed)]),
            undo=undo_retry,
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100, help="timed calls per statement")
    parser.add_argument(
        "--max-seconds", type=float, default=10.0, help="stop a statement after this (>= 20 calls)"
    )
    parser.add_argument("--batch", type=int, default=100_000, help="rows of the batch under test")
    parser.add_argument("--other-batches", type=int, default=20)
    parser.add_argument("--other-size", type=int, default=10_000)
    parser.add_argument("--unbatched", type=int, default=300_000)
    parser.add_argument("--explain", action="store_true", help="EXPLAIN (ANALYZE, BUFFERS) of the counts")
    args = parser.parse_args(argv)

    from worker.batches import BatchStore
    from worker.db import make_engine, session_factory
    from worker.jobstore import JobStore

    print(f"# load before: {uptime()}", flush=True)
    started = time.perf_counter()
    results: dict[str, Timing] = {}
    plans: dict[str, list[str]] = {}
    with pg_database() as db:
        engine = make_engine(db)
        capture = Capture(engine)
        store = JobStore(session_factory(engine))
        batches = BatchStore(store)
        spent = fill(engine, args, t2i_spec(db))
        print(f"# filled in {sum(spent.values()):.1f} s {spent}", flush=True)
        print(f"# {facts(engine)}", flush=True)
        listed = statements(engine, batches, store)
        for statement in listed:
            results[statement.name] = timing = measure(statement, args.n, args.max_seconds)
            print(
                f"#   {statement.name}: median {timing.median_ms:.3f} ms, p95 {timing.p95_ms:.3f} ms",
                flush=True,
            )
        print(f"# all-visible before the changes: {vacuum_until_all_visible(engine):.3f}", flush=True)
        if args.explain:
            plans["counts, vacuumed"] = explain(engine, capture, listed[0])
        for name, change in (
            ("counts per status, 10,000 rows finished since the last VACUUM", _FINISH_IN_ORDER),
            ("counts per status, worst case: every page changed since the last VACUUM", _TOUCH_EVERY_PAGE),
        ):
            with engine.begin() as conn:
                now = conn.execute(sa.text("SELECT now()")).scalar_one()
                params = {"now": now, "batch_id": BATCH_ID, "first": args.batch * 64 // 100}
                changed = conn.execute(sa.text(change), params).rowcount
            print(f"# {changed} rows changed, no VACUUM; {facts(engine)['batch_rows']}", flush=True)
            hot = Statement(name, listed[0].call)
            results[hot.name] = timing = measure(hot, args.n, args.max_seconds)
            print(f"#   {hot.name}: median {timing.median_ms:.3f} ms, p95 {timing.p95_ms:.3f} ms", flush=True)
            if args.explain:
                plans[name.removeprefix("counts per status, ")] = explain(engine, capture, hot)
        engine.dispose()
    print(f"# load after: {uptime()}; whole run {time.perf_counter() - started:.0f} s", flush=True)

    print()
    print(f"| statement ({args.batch:,}-job batch) | median ms | p95 ms | calls |")
    print("|---|---|---|---|")
    for name, timing in results.items():
        label = f"**{name}**" if name.startswith("counts") else name
        print(f"| {label} | {timing.median_ms:.2f} | {timing.p95_ms:.2f} | {len(timing.samples)} |")
    for name, lines in plans.items():
        print(f"\nEXPLAIN (ANALYZE, BUFFERS), {name}:")
        for line in lines:
            print(f"    {line}")
    print()
    targeted = [name for name in results if name.startswith("counts") and "worst case" not in name]
    for name, timing in results.items():
        Report(
            f"i batches, {name}",
            len(timing.samples),
            {"median_ms": timing.median_ms, "p95_ms": timing.p95_ms, "batch_rows": args.batch},
            f"<= {COUNTS_TARGET_MS:g} ms" if name in targeted else "none (reported)",
            timing.median_ms <= COUNTS_TARGET_MS if name in targeted else True,
        ).emit()
    return 0 if all(results[name].median_ms <= COUNTS_TARGET_MS for name in targeted) else 1


if __name__ == "__main__":
    raise SystemExit(main())
