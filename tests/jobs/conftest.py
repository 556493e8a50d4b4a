"""Fixtures for the job-system tests: an engine and a store on `db_url` (tests/conftest.py: both dialects;
the tiny model: `tiny_model_paths` there)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from worker.db import make_engine, session_factory
from worker.jobstore import JobStore


@pytest.fixture
def db_engine(db_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def store(db_engine: sa.Engine) -> JobStore:
    return JobStore(session_factory(db_engine), max_attempts=3)
