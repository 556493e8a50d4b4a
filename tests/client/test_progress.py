"""The wait progress bar: finished jobs plus the step fraction of running ones."""

from __future__ import annotations

import io

from api_client.progress import JobProgress, WaitProgressBar


def test_bar_counts_finished_jobs_and_steps_of_running_ones() -> None:
    stream = io.StringIO()
    bar = WaitProgressBar(3, stream=stream)
    bar.update([
        JobProgress("aaaaaaaa-1", finished=True),
        JobProgress("bbbbbbbb-2", finished=False, step=5, total=10),
        JobProgress("cccccccc-3", finished=False),  # queued
    ])
    assert bar._bar.n == 1.5
    bar.update([
        JobProgress("aaaaaaaa-1", finished=True),
        JobProgress("bbbbbbbb-2", finished=False, step=10, total=10),  # decoding: not done yet
        JobProgress("cccccccc-3", finished=True),
    ])
    assert 2.9 < bar._bar.n < 3
    bar.close()
    text = stream.getvalue()
    assert "1.50/3 jobs" in text and "done 1, running 1 bbbbbbbb:5/10" in text
    assert "done 2, running 1 bbbbbbbb:10/10" in text
