"""Fixtures for the operations tests: migrated databases (SQLite and PostgreSQL) and a store."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from worker.db import make_engine, session_factory, upgrade
from worker.jobstore import JobStore
from worker.registry import WorkerRegistry


@pytest.fixture(scope="session")
def ops_pg_url(pg_url: str) -> str:
    upgrade(pg_url)
    return pg_url


@pytest.fixture(params=["sqlite", "postgresql"])
def ops_db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
        upgrade(url)
        return url
    url = request.getfixturevalue("ops_pg_url")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE artifacts, workers, jobs CASCADE"))
    engine.dispose()
    return url


@pytest.fixture
def sessions(ops_db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(ops_db_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def registry(sessions: sessionmaker[Session]) -> WorkerRegistry:
    return WorkerRegistry(sessions)


@pytest.fixture
def store(sessions: sessionmaker[Session]) -> JobStore:
    return JobStore(sessions)
