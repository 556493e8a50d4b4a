"""(f) Worker memory over many jobs: RSS of the job-running process (the prefork child).

    .venv/bin/python -m bench.worker_memory --n 500

After a warm-up of `--warmup` jobs (allocator pools, caches, first S3/DB connections),
N jobs are submitted in batches of 50 and the child's RSS is sampled after each batch.
Growth = (last sample - after warm-up) / after warm-up.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.harness import Report, rss_bytes, stack

PARAMS = {"num_inference_steps": 2, "height": 64, "width": 64}
BATCH = 50


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, stack(Path(tmp)) as s:
        [child] = s.workers[0].child_pids()
        s.wait_done(s.submit(PARAMS, args.warmup), interval=0.05)
        baseline = rss_bytes(child)
        samples: list[int] = []
        for offset in range(0, args.n, BATCH):
            jobs = s.wait_done(s.submit(PARAMS, min(BATCH, args.n - offset)), interval=0.05)
            assert all(job.status == "succeeded" for job in jobs)
            samples.append(rss_bytes(child))
        assert s.workers[0].child_pids() == [child], "the child was replaced: RSS would not be comparable"
    growth = (samples[-1] - baseline) / baseline
    mib = 2**20
    Report(
        "f worker memory",
        args.n,
        {
            "rss_after_warmup_mib": baseline / mib,
            "rss_end_mib": samples[-1] / mib,
            "growth_pct": growth * 100,
            "samples_mib": " ".join(f"{x / mib:.0f}" for x in samples),
        },
        "growth < 5 %",
        growth < 0.05,
    ).emit()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
