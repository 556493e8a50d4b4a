"""Fixtures for the operations tests: sessions, a registry and a store on `db_url` (both dialects)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

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
