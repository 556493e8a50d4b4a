"""(d) Status polling: `JobStore.get` (row + artifacts, as `diffgentor status` reads it).

.venv/bin/python -m bench.poll_throughput --n 5000 --jobs 1000
"""

from __future__ import annotations

import argparse
import random
import time

from bench.harness import Report, pg_database


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5000, help="polls")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs in the table")
    args = parser.parse_args(argv)

    from worker.db import make_engine, session_factory
    from worker.jobstore import JobStore

    with pg_database() as db:
        engine = make_engine(db)
        store = JobStore(session_factory(engine))
        ids = [s.job.id for s in store.submit([{"kind": "t2i", "prompt": f"p{i}"} for i in range(args.jobs)])]
        picks = [random.choice(ids) for _ in range(args.n)]
        store.get(ids[0])
        started = time.perf_counter()
        for job_id in picks:
            store.get(job_id)
        rate = args.n / (time.perf_counter() - started)
        # What a client waiting on many jobs should do: one query for a page of ids.
        started = time.perf_counter()
        for offset in range(0, args.n, 50):
            store.get_many(picks[offset : offset + 50])
        batched = args.n / (time.perf_counter() - started)
        engine.dispose()
    Report(
        "d status poll",
        args.n,
        {"polls_per_s": rate, "jobs_in_table": args.jobs},
        ">= 2000 polls/s",
        rate >= 2000,
    ).emit()
    Report(
        "d status poll, get_many x50", args.n, {"jobs_per_s": batched}, ">= 2000 polls/s", batched >= 2000
    ).emit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
