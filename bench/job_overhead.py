"""(a) Per-job overhead of the whole path against a direct engine call on the same tiny model.

    .venv/bin/python -m bench.job_overhead --n 100

Whole path, one job at a time: INSERT + commit, publish to Redis, worker claim (conditional
UPDATE with lease), engine, PNG encode, S3 upload (moto), artifact rows + fenced completion.
It is measured on the job row as `finished_at - created_at` (both written from this host's
clock), so the bench's own polling does not count. The direct call is
`DeepGenEngine.generate` on the same request in this process, with the worker's thread count,
interleaved with the jobs (one direct call, then one job, ...; never both at once), so a slower
or faster minute of this shared VM weighs on both alike.
Overhead median = median(path) - median(direct); overhead p95 = p95(path) - median(direct).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.harness import Report, direct_engine, direct_request, median, pct, stack

PARAMS = {"num_inference_steps": 2, "height": 64, "width": 64}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument(
        "--no-overlap",
        action="store_true",
        help="DG_OVERLAP_FINISH=0: finish each job in line (before/after)",
    )
    args = parser.parse_args(argv)
    extra = {"DG_OVERLAP_FINISH": "0"} if args.no_overlap else {}
    with tempfile.TemporaryDirectory() as tmp, stack(Path(tmp), **extra) as s:
        engine = direct_engine(s.model_env)
        engine.generate(direct_request(PARAMS))
        direct: list[float] = []
        path: list[float] = []
        stages: dict[str, list[float]] = {"submit_call": [], "created_to_started": [], "run": []}
        for i in range(args.n):
            started = time.perf_counter()
            engine.generate(direct_request(PARAMS, seed=i))
            direct.append(time.perf_counter() - started)
            called = time.perf_counter()
            [job_id] = s.submit(PARAMS)
            # The producer's call (insert + commit + publish; `published_at` is written with the row
            # since migration 0006, so the rows no longer time the publish apart).
            stages["submit_call"].append(time.perf_counter() - called)
            [job] = s.wait_done([job_id], interval=0.02)  # DB timestamps time the path; a light poll
            assert job.status == "succeeded", job
            path.append((job.finished_at - job.created_at).total_seconds())
            stages["created_to_started"].append((job.started_at - job.created_at).total_seconds())
            stages["run"].append((job.finished_at - job.started_at).total_seconds())
    ms = 1000.0
    overhead = (median(path) - median(direct)) * ms
    Report(
        "a per-job overhead" + (" (in-line finish)" if args.no_overlap else ""),
        args.n,
        {
            "path_median_ms": median(path) * ms,
            "path_p95_ms": pct(path, 95) * ms,
            "direct_median_ms": median(direct) * ms,
            "direct_p95_ms": pct(direct, 95) * ms,
            "overhead_median_ms": overhead,
            "overhead_p95_ms": (pct(path, 95) - median(direct)) * ms,
            **{f"{name}_median_ms": median(values) * ms for name, values in stages.items()},
        },
        "<= 12 ms median",
        overhead <= 12,
    ).emit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
