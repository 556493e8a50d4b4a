"""Fixtures for the job-system tests: migrated databases on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from worker.db import make_engine, session_factory, upgrade
from worker.jobstore import JobStore


@pytest.fixture(scope="session")
def migrated_pg_url(pg_url: str) -> str:
    upgrade(pg_url)
    return pg_url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A migrated, empty job database on each supported dialect."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
        upgrade(url)
        yield url
        return
    url = request.getfixturevalue("migrated_pg_url")
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE artifacts, workers, jobs CASCADE"))
    engine.dispose()
    yield url


@pytest.fixture
def db_engine(db_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def store(db_engine: sa.Engine) -> JobStore:
    return JobStore(session_factory(db_engine), max_attempts=3)


@pytest.fixture(scope="session")
def tiny_model_paths(tmp_path_factory: pytest.TempPathFactory):
    """The engine engineers' tiny random DeepGen model, written once for the job tests."""
    from worker.deepgen.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("jobs_tiny_deepgen"))
