"""Fixtures for the retention tests: a job store on each dialect (`db_url`, tests/conftest.py) and an
artifact store of each kind (a `file://` folder, and a moto S3 bucket under a key prefix)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from worker.db import make_engine, session_factory
from worker.jobstore import JobStore
from worker.storage import ArtifactStore, FileArtifactStore, open_store


@pytest.fixture
def db_engine(db_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def store(db_engine: sa.Engine) -> JobStore:
    return JobStore(session_factory(db_engine), max_attempts=3)


@pytest.fixture
def file_artifacts(tmp_path: Path) -> FileArtifactStore:
    return FileArtifactStore((tmp_path / "artifacts").as_uri())


@pytest.fixture
def s3_artifacts(s3_endpoint: str, s3_bucket: str) -> ArtifactStore:
    return open_store(f"s3://{s3_bucket}/team/dg", endpoint_url=s3_endpoint, public_endpoint_url="")


@pytest.fixture(params=["file", "s3"])
def artifacts(request: pytest.FixtureRequest) -> ArtifactStore:
    """Each kind of artifact store (S3: moto, lazily, so file-only runs need no server)."""
    name = "file_artifacts" if request.param == "file" else "s3_artifacts"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]
