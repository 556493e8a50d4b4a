"""Dashboard: server-side render time of its pages on PostgreSQL with 1,000 batches and a 10,000-job batch.

    .venv/bin/python -m bench.dashboard

One throw-away PostgreSQL database (migrated by `worker.db.upgrade`), filled with one
INSERT ... SELECT FROM generate_series per table, then VACUUM ANALYZE and a CHECKPOINT:

* 1,000 batches of 100 jobs each, created over the last 30 days, one per 43 minutes: the
  newest 10 still have queued and running jobs (some finished in the last 10 minutes, so
  throughput and ETA are computed), the rest are finished (about 94 % succeeded, 4 % failed,
  2 % cancelled). Every succeeded job has one artifact row with its thumbnail recorded.
* One batch of 10,000 jobs, the newest: 9,000 succeeded, 300 failed, 100 cancelled, 16
  running, the rest queued, plus 100 superseded rows (failed jobs that were retried: the
  gallery must skip them).
* 100,000 jobs submitted alone (no batch) over the same 30 days, so the batch indexes hold
  only part of the table.

Every figure is a full request through the app (`starlette.testclient.TestClient`, in this
process: routing, the middleware, the queries, Jinja2 rendering and the response), `--n` times
after 5 warm-up calls: median and p95 of the server-side time (an ASGI wrapper around the app:
from the request reaching it to its last body byte sent), with the database's share of it
(SQLAlchemy's `before/after_cursor_execute` around each statement) and the test client's whole
round trip (which adds its own work on a 1 MB page) beside it. The app is built and its heap
settled (`api_client.dashboard.command.settle_heap`) as `diffgentor dashboard` does before serving. Targets (issue 12): the gallery page of 100 tiles from the 10,000-job batch
and the batches page for 1,000 batches, each <= 200 ms.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.harness import pg_database

TARGET_MS = 200.0
SMALL_BATCHES = 1000
SMALL_SIZE = 100
LARGE_SIZE = 10_000
LOOSE_JOBS = 100_000
LIVE_BATCHES = 10  # the newest small batches still have queued and running jobs

_COLUMNS = """id, kind, model_name, status, spec, seed, priority, idempotency_key, attempts, max_attempts,
worker_id, lease_expires_at, progress_step, progress_total, cancel_requested, error_type, error_message,
created_at, published_at, started_at, finished_at, retry_of, provenance, width, height,
batch_id, batch_index, superseded"""

# One row per job. :batch_id / :batch_index come from the FROM clause of each fill below.
_JOB_VALUES = """
SELECT gen_random_uuid()::text, 't2i', :model, s.status,
       jsonb_set(CAST(:spec AS jsonb), '{prompt}', to_jsonb('a red fox in the snow, variation ' || s.g))::json,
       (s.r2 * 4294967295)::bigint, 0, NULL,
       CASE WHEN s.status IN ('queued', 'cancelled') THEN 0 ELSE 1 END, 3,
       CASE WHEN s.status IN ('succeeded', 'failed', 'running') THEN 'gpu-' || (s.g % 8) || ':4000:bench' END,
       CASE WHEN s.status = 'running' THEN :now + interval '1 day' END,
       CASE s.status WHEN 'succeeded' THEN 50 WHEN 'running' THEN (s.g % 49) + 1 ELSE 0 END,
       50,
       s.status = 'cancelled',
       CASE WHEN s.status = 'failed' THEN 'OutOfMemoryError' END,
       CASE WHEN s.status = 'failed' THEN 'CUDA out of memory. Tried to allocate 2.00 GiB' END,
       s.created_at,
       s.created_at + interval '3 milliseconds',
       CASE WHEN s.status IN ('succeeded', 'failed', 'running') THEN s.created_at + interval '2 seconds' END,
       CASE WHEN s.status IN ('succeeded', 'failed', 'cancelled') THEN s.finished_at END,
       NULL,
       CASE WHEN s.status = 'succeeded'
            THEN CAST('{"config": "deepgen", "device": "cuda:0", "dtype": "bfloat16"}' AS json) END,
       512, 512, s.batch_id, s.batch_index, s.superseded
"""

# A status from one random number: (queued | running | finished mix) by the row's position.
_STATUS = """CASE WHEN {live} AND r < 0.30 THEN 'queued'
                  WHEN {live} AND r < 0.33 THEN 'running'
                  WHEN r < 0.37 THEN 'failed'
                  WHEN r < 0.39 THEN 'cancelled'
                  ELSE 'succeeded' END"""

_FILL_BATCHES = """
INSERT INTO batches (id, name, owner, model_name, created_at, job_count)
SELECT gen_random_uuid()::text, 'prompts-' || lpad(b::text, 4, '0') || '.jsonl',
       (ARRAY['alice', 'bob', 'carol', 'dave'])[1 + b % 4], :model,
       :now - interval '30 days' + (b::float8 / :batches) * interval '30 days' - interval '1 hour', :size
FROM generate_series(1, :batches) AS b
"""

_FILL_SMALL = f"""
INSERT INTO jobs ({_COLUMNS})
{_JOB_VALUES}
FROM (
    SELECT g, r2, x.batch_id, x.batch_index, false AS superseded,
           {_STATUS.format(live="x.live")} AS status,
           x.created_at + (x.batch_index * interval '14 seconds') AS created_at,
           CASE WHEN x.live THEN :now - random() * interval '20 minutes'
                ELSE x.created_at + (x.batch_index + 1) * interval '14 seconds' END AS finished_at
    FROM (
        SELECT row_number() OVER () AS g, random() AS r, random() AS r2, b.id AS batch_id,
               i AS batch_index, b.created_at,
               b.created_at > (SELECT created_at FROM batches WHERE job_count = :size
                               ORDER BY created_at DESC OFFSET :live LIMIT 1) AS live
        FROM batches AS b CROSS JOIN generate_series(0, :size - 1) AS i
        WHERE b.job_count = :size
    ) AS x
) AS s
"""

_FILL_LARGE = f"""
INSERT INTO jobs ({_COLUMNS})
{_JOB_VALUES}
FROM (
    SELECT g, random() AS r2, CAST(:batch_id AS varchar) AS batch_id,
           CASE WHEN g > :size THEN g - :size - 1 ELSE g - 1 END AS batch_index,
           g > :size AS superseded,
           CASE WHEN g > :size THEN 'failed'
                WHEN g <= 9000 THEN 'succeeded'
                WHEN g <= 9300 THEN 'failed'
                WHEN g <= 9400 THEN 'cancelled'
                WHEN g <= 9416 THEN 'running'
                ELSE 'queued' END AS status,
           :now - interval '50 minutes' + g * interval '250 milliseconds' AS created_at,
           CASE WHEN g <= 8900 THEN :now - interval '50 minutes' + g * interval '300 milliseconds'
                ELSE :now - random() * interval '10 minutes' END AS finished_at
    FROM generate_series(1, :size + 100) AS g
) AS s
"""

_FILL_LOOSE = f"""
INSERT INTO jobs ({_COLUMNS})
{_JOB_VALUES}
FROM (
    SELECT g, random() AS r2, NULL AS batch_id, NULL::bigint AS batch_index, false AS superseded,
           {_STATUS.format(live="false")} AS status,
           :now - interval '30 days' + (g::float8 / :n) * interval '30 days' AS created_at,
           :now - interval '30 days' + (g::float8 / :n) * interval '30 days' + interval '14 seconds'
               AS finished_at
    FROM (SELECT g, random() AS r FROM generate_series(1, :n) AS g) AS x
) AS s
"""

_FILL_ARTIFACTS = """
INSERT INTO artifacts (job_id, index, uri, width, height, bytes, sha256, created_at{thumb_column})
SELECT id, 0, 's3://bench/deepgen/jobs/' || id || '/1/0.png', 512, 512, 380000 + (seed % 40000),
       md5(id) || md5(reverse(id)), finished_at{thumb_value}
FROM jobs WHERE status = 'succeeded'
"""


@dataclass
class Timing:
    samples: list[float] = field(default_factory=list)  # seconds, server side (ServerClock)
    round_trip: list[float] = field(default_factory=list)  # seconds, the test client's whole call
    database: list[float] = field(default_factory=list)  # seconds inside the database, same request

    @staticmethod
    def _pick(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000

    def median_ms(self) -> float:
        return self._pick(self.samples, 0.5)

    def p95_ms(self) -> float:
        return self._pick(self.samples, 0.95)

    def db_median_ms(self) -> float:
        return self._pick(self.database, 0.5)

    def round_trip_median_ms(self) -> float:
        return self._pick(self.round_trip, 0.5)


class StatementClock:
    """Seconds spent inside the database (cursor execute), summed until read."""

    def __init__(self, engine: sa.Engine) -> None:
        self.spent = 0.0
        self._started: dict[int, float] = {}
        sa.event.listen(engine, "before_cursor_execute", self._before)
        sa.event.listen(engine, "after_cursor_execute", self._after)

    def _before(self, _conn: Any, cursor: Any, *_args: Any) -> None:
        self._started[id(cursor)] = time.perf_counter()

    def _after(self, _conn: Any, cursor: Any, *_args: Any) -> None:
        started = self._started.pop(id(cursor), None)
        if started is not None:
            self.spent += time.perf_counter() - started


class ServerClock:
    """ASGI middleware: seconds from the request reaching the app to its last body byte sent (the
    server-side render time, without the test client's own work on either side)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.last = 0.0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = time.perf_counter()

        async def timed(message: Any) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.last = time.perf_counter() - started

        await self.app(scope, receive, timed)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def fill(engine: sa.Engine, spec: Any) -> dict[str, Any]:
    spent: dict[str, Any] = {}
    with engine.begin() as conn:
        conn.execute(sa.text("SET LOCAL synchronous_commit TO OFF"))
        now = conn.execute(sa.text("SELECT now()")).scalar_one()
        common = {"model": spec.model_name, "spec": json.dumps(spec.model_dump(mode="json")), "now": now}
        started = time.perf_counter()
        conn.execute(sa.text(_FILL_BATCHES), {**common, "batches": SMALL_BATCHES, "size": SMALL_SIZE})
        conn.execute(sa.text(_FILL_SMALL), {**common, "size": SMALL_SIZE, "live": LIVE_BATCHES})
        spent["small_batches_s"] = round(time.perf_counter() - started, 1)
        large_id = conn.execute(sa.text("SELECT gen_random_uuid()::text")).scalar_one()
        conn.execute(
            sa.text(
                "INSERT INTO batches (id, name, owner, model_name, created_at, job_count) "
                "VALUES (:id, 'catalogue-10k.csv', 'erin', :model, :now - interval '51 minutes', :size)"
            ),
            {**common, "id": large_id, "size": LARGE_SIZE},
        )
        started = time.perf_counter()
        conn.execute(sa.text(_FILL_LARGE), {**common, "batch_id": large_id, "size": LARGE_SIZE})
        spent["large_batch_s"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        conn.execute(sa.text(_FILL_LOOSE), {**common, "n": LOOSE_JOBS})
        spent["loose_jobs_s"] = round(time.perf_counter() - started, 1)
        has_thumbs = "thumbnail_uri" in {c["name"] for c in sa.inspect(conn).get_columns("artifacts")}
        started = time.perf_counter()
        conn.execute(
            sa.text(
                _FILL_ARTIFACTS.format(
                    thumb_column=", thumbnail_uri" if has_thumbs else "",
                    thumb_value=", 's3://bench/deepgen/jobs/' || id || '/1/0.thumb.webp'"
                    if has_thumbs
                    else "",
                )
            )
        )
        spent["artifacts_s"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in ("batches", "jobs", "artifacts"):
            conn.execute(sa.text(f"VACUUM (ANALYZE) {table}"))
        conn.execute(sa.text("CHECKPOINT"))
    spent["vacuum_analyze_checkpoint_s"] = round(time.perf_counter() - started, 1)
    spent["large_batch_id"] = large_id
    return spent


def facts(engine: sa.Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return {
            "batches": conn.execute(sa.text("SELECT count(*) FROM batches")).scalar_one(),
            "jobs": conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one(),
            "batch_jobs": conn.execute(
                sa.text("SELECT count(*) FROM jobs WHERE batch_id IS NOT NULL")
            ).scalar_one(),
            "artifacts": conn.execute(sa.text("SELECT count(*) FROM artifacts")).scalar_one(),
            "jobs_total_size": conn.execute(
                sa.text("SELECT pg_size_pretty(pg_total_relation_size('jobs'))")
            ).scalar_one(),
        }


def measure(
    client: Any, server: ServerClock, clock: StatementClock, path: str, n: int, expect: str | None
) -> Timing:
    timing = Timing()
    for _ in range(5):
        response = client.get(path)
        assert response.status_code == 200, (path, response.status_code, response.text[:300])
        if expect is not None:
            assert expect in response.text, (path, expect)
    for _ in range(n):
        clock.spent = 0.0
        started = time.perf_counter()
        response = client.get(path)
        timing.round_trip.append(time.perf_counter() - started)
        timing.samples.append(server.last)
        timing.database.append(clock.spent)
        assert response.status_code == 200
    return timing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100, help="timed requests per page")
    args = parser.parse_args(argv)

    from starlette.testclient import TestClient

    from api_client.dashboard.app import Services, create_app
    from api_client.dashboard.command import settle_heap
    from api_client.dashboard.config import DashboardConfig
    from bench.scale import t2i_spec
    from worker.db import make_engine, session_factory
    from worker.jobstore import JobStore
    from worker.settings import load_settings
    from worker.storage import open_store

    print(f"# load before: {uptime()}", flush=True)
    whole = time.perf_counter()
    with pg_database() as url, tempfile.TemporaryDirectory() as home:
        engine = make_engine(url)
        spec = t2i_spec(url)
        spent = fill(engine, spec)
        large = spent.pop("large_batch_id")
        print(f"# filled in {spent}; {facts(engine)}", flush=True)
        clock = StatementClock(engine)
        settings = load_settings(
            {"DG_DATABASE_URL": url, "DG_BROKER_URL": "redis://127.0.0.1:6379/14", "DG_HOME": home}
        )
        store = JobStore(session_factory(engine))
        services = Services(settings, store, open_store(f"file://{Path(home) / 'artifacts'}"))
        server = ServerClock(create_app(DashboardConfig(), services))
        settle_heap()  # as `diffgentor dashboard` does before it serves
        client = TestClient(server, base_url="http://127.0.0.1:8765")
        with engine.connect() as conn:
            newest = list(
                conn.execute(sa.text("SELECT id FROM batches ORDER BY created_at DESC LIMIT 1000")).scalars()
            )
            some_job = conn.execute(
                sa.text("SELECT id FROM jobs WHERE batch_id = :b AND status = 'succeeded' LIMIT 1"),
                {"b": large},
            ).scalar_one()
            page_jobs = list(
                conn.execute(
                    sa.text(
                        "SELECT id FROM jobs WHERE batch_id = :b AND NOT superseded ORDER BY batch_index LIMIT 100"
                    ),
                    {"b": large},
                ).scalars()
            )
        pages = [
            ("gallery: 10,000-job batch, page 1 (100 tiles)", f"/batches/{large}", "#99"),
            ("gallery: 10,000-job batch, page 100 (last 100 tiles)", f"/batches/{large}?page=100", "#9999"),
            (
                "gallery: 10,000-job batch, status=failed, page 3",
                f"/batches/{large}?status=failed&page=3",
                "failed",
            ),
            ("gallery: 10,000-job batch, 500 tiles on a page", f"/batches/{large}?per_page=500", "#499"),
            ("batches page, 1,001 batches, default 50 per page", "/batches", "catalogue-10k.csv"),
            (
                "batches page, 1,000 batches on one page (per_page=1000)",
                "/batches?per_page=1000",
                "prompts-0002",
            ),
            ("job page", f"/jobs/{some_job}", "num_inference_steps"),
            ("live update: /api/batches, 1,000 ids", "/api/batches?ids=" + ",".join(newest), None),
            ("live update: /api/jobs, 100 ids", "/api/jobs?ids=" + ",".join(page_jobs), None),
            ("workers page", "/workers", "Queues"),
        ]
        results: list[tuple[str, str, Timing]] = []
        for name, path, expect in pages:
            timing = measure(client, server, clock, path, args.n, expect)
            results.append((name, path, timing))
            print(
                f"#   {name}: server median {timing.median_ms():.1f} ms, p95 {timing.p95_ms():.1f} ms "
                f"(database {timing.db_median_ms():.1f} ms; client round trip {timing.round_trip_median_ms():.1f} ms)",
                flush=True,
            )
        engine.dispose()
    print(f"# load after: {uptime()}; whole run {time.perf_counter() - whole:.0f} s", flush=True)
    print()
    print(
        "| page | server median ms | server p95 ms | database ms (median) | round trip ms (median) | target |"
    )
    print("|---|---|---|---|---|---|")
    for name, _path, timing in results:
        targeted = name.startswith(("gallery: 10,000-job batch, page 1 ", "batches page, 1,00"))
        verdict = ""
        if targeted:
            verdict = f"<= {TARGET_MS:.0f} ms: {'met' if timing.p95_ms() <= TARGET_MS else 'MISSED'} (p95)"
        print(
            f"| {name} | {timing.median_ms():.1f} | {timing.p95_ms():.1f} | {timing.db_median_ms():.1f} | "
            f"{timing.round_trip_median_ms():.1f} | {verdict} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
