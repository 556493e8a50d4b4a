"""Fixtures for the event and webhook tests: queue-mode settings on `db_url` (both dialects) with the
session's Redis database, a `JobStore` that publishes events, and a `JobRunner` on the fake engine."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import FakeEngine
from worker.db import make_engine, session_factory
from worker.events import events_for
from worker.jobstore import JobStore
from worker.runner import JobRunner
from worker.settings import Settings, load_settings
from worker.storage import open_store


@pytest.fixture
def settings(tmp_path: Path, db_url: str, redis_url: str) -> Settings:
    loaded = load_settings(
        {"DG_HOME": str(tmp_path / "home"), "DG_BROKER_URL": redis_url, "DG_DATABASE_URL": db_url}
    )
    return replace(loaded, progress_interval_seconds=0.0, heartbeat_seconds=0.2, lease_seconds=30)


@pytest.fixture
def db_engine(settings: Settings) -> Iterator[sa.Engine]:
    engine = make_engine(settings.database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def store(db_engine: sa.Engine, settings: Settings) -> JobStore:
    """Publishes events to the session's Redis (and this process's hub)."""
    return JobStore(session_factory(db_engine), max_attempts=3, events=events_for(settings))


@pytest.fixture
def quiet_store(db_engine: sa.Engine) -> JobStore:
    """The same table, but its changes publish nothing to Redis (lost events)."""
    return JobStore(session_factory(db_engine), max_attempts=3)


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def runner(store: JobStore, engine: FakeEngine, settings: Settings) -> JobRunner:
    return JobRunner(settings, lambda: engine, store=store, artifact_store=open_store(settings.storage_url))
