"""(e) Two workers share a burst evenly and no job runs twice.

    .venv/bin/python -m bench.burst_two_workers --n 100

One bulk submit of N jobs to a model queue consumed by two worker subprocesses. Checks:
every job succeeded with attempts == 1 (a second claim would raise it) and one artifact;
the workers' registry counts add up to N; the split is reported as the smaller share.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from pathlib import Path

from bench.harness import Report, stack

PARAMS = {"num_inference_steps": 4, "height": 64, "width": 64}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, stack(Path(tmp), workers=2) as s:
        jobs = s.wait_done(s.submit(PARAMS, args.n), interval=0.05)
        by_worker = Counter(job.worker_id for job in jobs)
        twice = [job.id for job in jobs if job.attempts != 1 or len(job.artifacts) != 1]
        failed = [job.id for job in jobs if job.status != "succeeded"]
    share = min(by_worker.values()) / args.n if len(by_worker) == 2 else 0.0
    ok = not twice and not failed and share >= 0.4
    Report(
        "e burst on two workers",
        args.n,
        {
            "split": "/".join(str(c) for c in sorted(by_worker.values())),
            "smaller_share": share,
            "ran_twice": len(twice),
            "failed": len(failed),
        },
        "even (>= 40 % each), none twice",
        ok,
    ).emit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
