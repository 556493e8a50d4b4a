"""`DG_RETENTION_DAYS`: the sweeper (beat task and `diffgentor sweep --loop` both call
`Sweeper.sweep`) prunes at most hourly, in bounded runs, and a failing prune never stops a sweep."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from schemas.tables import Job, utcnow
from tests.support import complete_job
from worker.jobstore import JobNotFound, JobStore, PublishTarget
from worker.retention import RetentionSchedule
from worker.settings import SettingsError, load_settings
from worker.storage import ArtifactStore, StorageUnavailable
from worker.sweeper import Sweeper

SPEC = {"kind": "t2i", "prompt": "a fox", "params": {"width": 64, "height": 64, "num_inference_steps": 2}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class NoPublisher:
    def publish(self, targets: list[PublishTarget]) -> None:
        raise AssertionError(f"nothing should be published: {targets}")


def old_job(store: JobStore, engine: sa.Engine, artifacts: ArtifactStore, days: float = 3) -> str:
    job_id = store.submit([SPEC])[0].job.id
    complete_job(store, artifacts, job_id)
    finished = utcnow() - timedelta(days=days)
    with engine.begin() as conn:
        conn.execute(sa.update(Job).where(Job.id == job_id).values(created_at=finished, finished_at=finished))
    return job_id


def gone(store: JobStore, job_id: str) -> bool:
    try:
        store.get(job_id)
    except JobNotFound:
        return True
    return False


def settings_for(db_url: str, storage_url: str, **extra: str) -> Any:
    return load_settings({"DG_DATABASE_URL": db_url, "DG_STORAGE_URL": storage_url, **extra})


def test_retention_days_setting(tmp_path: Path) -> None:
    base = {"DG_HOME": str(tmp_path)}
    assert load_settings(base).retention_days is None  # unset: off
    assert load_settings({**base, "DG_RETENTION_DAYS": ""}).retention_days is None
    assert load_settings({**base, "DG_RETENTION_DAYS": "0.5"}).retention_days == 0.5
    for bad in ("0", "-1", "abc", "inf", "nan", "99999"):
        with pytest.raises(SettingsError, match="DG_RETENTION_DAYS"):
            load_settings({**base, "DG_RETENTION_DAYS": bad})
    assert Sweeper(load_settings(base)).retention is None
    schedule = Sweeper(load_settings({**base, "DG_RETENTION_DAYS": "14"})).retention
    assert schedule is not None and schedule.days == 14 and schedule.every_seconds == 3600


def test_sweeper_prunes_at_most_hourly(
    db_url: str, store: JobStore, db_engine: sa.Engine, file_artifacts: ArtifactStore
) -> None:
    settings = settings_for(db_url, file_artifacts.url, DG_RETENTION_DAYS="1")
    first = old_job(store, db_engine, file_artifacts)
    recent = old_job(store, db_engine, file_artifacts, days=0.5)
    clock = Clock()
    sweeper = Sweeper(settings, store=store, publisher=NoPublisher())
    sweeper.retention = RetentionSchedule(1, artifacts=lambda: file_artifacts, clock=clock)
    try:
        report = sweeper.sweep()
        assert report.pruned == 1 and gone(store, first) and not gone(store, recent)

        second = old_job(store, db_engine, file_artifacts)
        clock.now += 3000  # within the hour: sweeps go on, no prune
        assert sweeper.sweep().pruned is None and not gone(store, second)
        clock.now += 600
        assert sweeper.sweep().pruned == 1 and gone(store, second)
    finally:
        sweeper.close()


def test_a_run_cut_short_goes_on_at_the_next_sweep(
    db_url: str, store: JobStore, db_engine: sa.Engine, file_artifacts: ArtifactStore
) -> None:
    jobs = [old_job(store, db_engine, file_artifacts) for _ in range(3)]
    clock = Clock()
    schedule = RetentionSchedule(
        1, artifacts=lambda: file_artifacts, clock=clock, chunk_size=1, budget_seconds=0
    )
    counts = []
    for _ in range(4):  # one chunk per sweep (budget 0), no waiting while jobs are left
        report = schedule.run_if_due(store)
        assert report is not None
        counts.append((report.jobs, report.complete))
    assert counts == [(1, False), (1, False), (1, False), (0, True)]
    assert all(gone(store, job_id) for job_id in jobs)
    assert not schedule.due()  # done: the next run in an hour


def test_a_failing_prune_never_stops_the_sweep(
    db_url: str,
    store: JobStore,
    db_engine: sa.Engine,
    file_artifacts: ArtifactStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    job_id = old_job(store, db_engine, file_artifacts)
    settings = settings_for(db_url, file_artifacts.url, DG_RETENTION_DAYS="1")
    clock = Clock()
    broken = {"on": True}

    def artifacts() -> ArtifactStore:
        if broken["on"]:
            raise StorageUnavailable("S3 endpoint http://s3:9000 is unreachable (ConnectionRefused)")
        return file_artifacts

    sweeper = Sweeper(settings, store=store, publisher=NoPublisher())
    sweeper.retention = RetentionSchedule(1, artifacts=artifacts, clock=clock)
    try:
        with caplog.at_level(logging.WARNING, logger="worker.retention"):
            for _ in range(2):  # two sweeps, 30 s apart: one failed try, one log line
                assert sweeper.sweep().pruned is None
                clock.now += 30
        lines = [r.getMessage() for r in caplog.records if r.name == "worker.retention"]
        assert len(lines) == 1 and "retention prune failed" in lines[0] and "unreachable" in lines[0]
        broken["on"] = False
        assert sweeper.sweep().pruned == 1 and gone(store, job_id)  # a minute later, not an hour
    finally:
        sweeper.close()
