from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from worker.storage import (
    ArtifactStore,
    FileArtifactStore,
    ObjectNotFoundError,
    StorageError,
    artifact_key,
    content_addressed_key,
    open_store,
)


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return open_store((tmp_path / "artifacts").as_uri())


def test_keys_are_deterministic() -> None:
    assert artifact_key("0b5e", 3, attempt=2) == "jobs/0b5e/2/3.png"
    digest = hashlib.sha256(b"pixels").hexdigest()
    assert content_addressed_key(b"pixels", ".PNG") == f"inputs/{digest}.png"
    assert content_addressed_key(b"pixels", "png") == content_addressed_key(b"pixels", "png")
    with pytest.raises(ValueError, match="job id"):
        artifact_key("../etc", 0, attempt=1)
    with pytest.raises(ValueError, match="attempt"):
        artifact_key("j", 0, attempt=0)
    with pytest.raises(ValueError, match="suffix"):
        content_addressed_key(b"x", "png/../x")


def test_round_trip_overwrite_and_download(store: ArtifactStore, tmp_path: Path) -> None:
    assert isinstance(store, FileArtifactStore) and isinstance(store, ArtifactStore)
    store.check_reachable()
    uri = store.put_bytes(artifact_key("job 1", 0, attempt=1), b"one")
    assert (
        uri
        == (tmp_path / "artifacts" / "jobs" / "job 1" / "1" / "0.png").as_uri()
        == store.uri_for("jobs/job 1/1/0.png")
    )
    assert "job%201" in uri  # spaces are percent-encoded and decoded back
    assert store.exists(uri) and store.get_bytes(uri) == b"one"

    assert store.put_bytes(artifact_key("job 1", 0, attempt=1), b"two") == uri
    assert store.get_bytes(uri) == b"two"
    assert sorted(p.name for p in (tmp_path / "artifacts" / "jobs" / "job 1" / "1").iterdir()) == ["0.png"]

    store.download(uri, tmp_path / "copy.png")
    assert (tmp_path / "copy.png").read_bytes() == b"two"
    assert store.presigned_url(uri) == uri
    store.delete(uri)
    assert not store.exists(uri)
    store.delete(uri)  # deleting a missing object is not an error


def test_missing_and_outside_paths(store: ArtifactStore, tmp_path: Path) -> None:
    missing = (tmp_path / "artifacts" / "nope.png").as_uri()
    assert not store.exists(missing)
    with pytest.raises(ObjectNotFoundError, match="no such file"):
        store.get_bytes(missing)
    (tmp_path / "secret.txt").write_text("s")
    with pytest.raises(StorageError, match="outside this store's directory"):
        store.get_bytes((tmp_path / "secret.txt").as_uri())
    with pytest.raises(ValueError, match="relative path"):
        store.put_bytes("../escape.png", b"x")


def test_size_cap(store: ArtifactStore) -> None:
    uri = store.put_bytes("inputs/x.bin", b"12345")
    with pytest.raises(StorageError, match="5 bytes, over the limit of 4 bytes"):
        store.get_bytes(uri, max_bytes=4)


def test_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    store = open_store(tmp_path.as_uri())
    (tmp_path / "jobs").write_text("a file where a directory is needed")
    with pytest.raises(StorageError, match="cannot write"):
        store.put_bytes(artifact_key("j", 0, attempt=1), b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs"]


def test_unwritable_root_fails_fast(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="cannot create storage directory"):
        open_store((blocker / "sub").as_uri()).check_reachable()
