"""(c) Submission throughput to Redis + PostgreSQL: one job per call, and bulk batches.

    .venv/bin/python -m bench.submit_throughput --n 2000 --batch 1000

Single mode runs once with one producer and once with several producer threads (realistic:
many clients), bulk mode sends `--batch` specs per call. Each job takes the full producer path
(`worker.submission.submit_jobs`): durable INSERT (one transaction; COPY for a bulk call on
PostgreSQL; the rows carry `published_at` and a pending-publish row each), publish the id to its
Redis queue (`CeleryPublisher`'s Redis template path), delete the pending-publish rows (a relaxed,
non-durable commit; for single submits in rounds by a thread, waited for inside the timed span);
the views are not read back.
Set DG_BENCH_REDIS_DB when another benchmark may run at the same time (each flushes its database).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from bench.harness import Report, pg_database, redis_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000, help="jobs per mode")
    parser.add_argument("--batch", type=int, default=1000, help="jobs per bulk call")
    parser.add_argument(
        "--producers", type=int, default=8, help="concurrent producer threads (single mode, 2nd run)"
    )
    args = parser.parse_args(argv)

    from worker.db import make_engine, session_factory
    from worker.jobstore import JobStore
    from worker.publish import CeleryPublisher
    from worker.submission import submit_jobs

    with pg_database() as db, redis_url() as broker:
        # A pool at least as large as the producer threads: with the default 5 (+10 overflow) the
        # extra connections are opened and closed per submit (145 new connections in 1000 x8 submits).
        engine = make_engine(db, pool_size=max(5, args.producers))
        store = JobStore(session_factory(engine))
        publisher = CeleryPublisher(broker)
        spec = {"kind": "t2i", "prompt": "a red fox in the snow", "model_name": "bench-unconsumed"}
        submit_jobs(store, publisher, [spec])  # warm connections and caches

        # A single submit's pending-publish row is deleted in rounds by a thread (worker.confirmations):
        # the timed span ends when those deletes are done too.
        started = time.perf_counter()
        for _ in range(args.n):
            submit_jobs(store, publisher, [spec])
        store.flush_confirmations()
        single = args.n / (time.perf_counter() - started)

        # Many producers submitting one job each: PostgreSQL groups their commits (one fsync for several).
        per_thread = args.n // args.producers
        started = time.perf_counter()
        with ThreadPoolExecutor(args.producers) as pool:
            list(
                pool.map(
                    lambda _: [submit_jobs(store, publisher, [spec]) for _ in range(per_thread)],
                    range(args.producers),
                )
            )
        store.flush_confirmations()
        concurrent = per_thread * args.producers / (time.perf_counter() - started)

        started = time.perf_counter()
        for offset in range(0, args.n, args.batch):
            submit_jobs(store, publisher, [spec] * min(args.batch, args.n - offset))
        bulk = args.n / (time.perf_counter() - started)

        from worker.metrics import QueueDepthCollector

        depth = QueueDepthCollector(broker, ["bench-unconsumed"]).depths()["bench-unconsumed"]
        expected = 2 * args.n + 1 + per_thread * args.producers
        assert depth == expected, f"expected {expected} messages, found {depth}"
        publisher.close()
        store.close()
        engine.dispose()
    # [issue 13] targets: >= 1,500 jobs/s with 8 producer threads, >= 10,000 jobs/s in batches of 1000.
    Report("c submit single", args.n, {"jobs_per_s": single}, ">= 500 jobs/s", single >= 500).emit()
    Report(
        f"c submit single x{args.producers} producers",
        per_thread * args.producers,
        {"jobs_per_s": concurrent},
        ">= 1500 jobs/s",
        concurrent >= 1500,
    ).emit()
    Report(
        "c submit bulk", args.n, {"jobs_per_s": bulk, "batch": args.batch}, ">= 10000 jobs/s", bulk >= 10000
    ).emit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
