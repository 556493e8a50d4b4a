"""Waiting progress: a tqdm bar on a terminal, plain lines in logs."""

from __future__ import annotations

import io

from api_client.progress import JobProgress, WaitProgressBar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_counts_finished_jobs_and_steps_of_running_ones() -> None:
    stream = _Terminal()
    bar = WaitProgressBar(3, stream=stream)
    assert not bar.plain
    bar.update(
        [
            JobProgress("aaaaaaaa-1", finished=True),
            JobProgress("bbbbbbbb-2", finished=False, step=5, total=10),
            JobProgress("cccccccc-3", finished=False),  # queued
        ]
    )
    assert bar.n == 1.5
    bar.update(
        [
            JobProgress("aaaaaaaa-1", finished=True),
            JobProgress("bbbbbbbb-2", finished=False, step=10, total=10),  # decoding: not done yet
            JobProgress("cccccccc-3", finished=True),
        ]
    )
    assert 2.9 < bar.n < 3
    bar.close()
    text = stream.getvalue()
    assert "1.50/3 jobs" in text and "done 1, running 1 bbbbbbbb:5/10" in text
    assert "done 2, running 1 bbbbbbbb:10/10" in text


def test_plain_lines_when_not_a_terminal() -> None:
    stream = io.StringIO()  # a pipe or log file: no carriage-return redraws
    now = [0.0]
    bar = WaitProgressBar(2, stream=stream, plain_interval_seconds=10, clock=lambda: now[0])
    assert bar.plain

    def update(step: int, finished: int) -> None:
        jobs = [
            JobProgress("aaaaaaaa-1", finished=finished >= 1),
            JobProgress("bbbbbbbb-2", finished=finished >= 2, step=step or None, total=50),
        ]
        bar.update(jobs)

    update(0, 0)  # first state: one line
    now[0] = 1
    update(1, 0)  # a job started: a line
    now[0] = 2
    update(5, 0)  # steps moved, but within the interval: no line
    now[0] = 12
    update(20, 0)  # interval passed: a line
    update(20, 0)  # nothing changed: no line
    now[0] = 13
    update(25, 1)  # a job finished: a line at once
    now[0] = 75
    update(0, 2)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines == [
        "jobs: 0/2 finished, 0 running, 2 waiting [00:00]",
        "jobs: 0/2 finished, 1 running (bbbbbbbb:1/50), 1 waiting [00:01]",
        "jobs: 0/2 finished, 1 running (bbbbbbbb:20/50), 1 waiting [00:12]",
        "jobs: 1/2 finished, 1 running (bbbbbbbb:25/50), 0 waiting [00:13]",
        "jobs: 2/2 finished, 0 running, 0 waiting [01:15]",
    ]
