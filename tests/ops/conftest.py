"""Fixtures for the operations tests: sessions, a registry and a store on `db_url` (both dialects),
and an own `redis-server` that a test may stop (tests.support.RedisServer)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.support import RedisServer
from worker.db import make_engine, session_factory
from worker.jobstore import JobStore
from worker.registry import WorkerRegistry


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def registry(sessions: sessionmaker[Session]) -> WorkerRegistry:
    return WorkerRegistry(sessions)


@pytest.fixture
def store(sessions: sessionmaker[Session]) -> JobStore:
    return JobStore(sessions)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server binary not installed")
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def shared_pg_without_sweepers(migrated_pg_url: str) -> str:
    """The session's PostgreSQL database without sweeper rows: they are global (not per model), so
    one left stalled by an earlier test would fail every later `health` there."""
    import sqlalchemy as sa

    from schemas.tables import WorkerRecord

    engine = make_engine(migrated_pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.delete(WorkerRecord).where(WorkerRecord.role == "sweeper"))
    finally:
        engine.dispose()
    return migrated_pg_url
