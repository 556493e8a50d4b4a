"""Fixtures for the retention tests: a job store on each dialect (`store`, tests/conftest.py) and an
artifact store of each kind (a `file://` folder, and a moto S3 bucket under a key prefix)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.storage import ArtifactStore, FileArtifactStore, open_store


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
