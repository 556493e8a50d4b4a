"""S3ArtifactStore against a real HTTP S3 endpoint (moto server on loopback)."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from worker.storage import (
    ArtifactStore,
    ObjectNotFoundError,
    S3ArtifactStore,
    S3ClientOptions,
    StorageError,
    artifact_key,
    open_store,
)
from worker.testing import free_port

PUBLIC_ENDPOINT = "https://files.example.test"
FAST_FAIL = S3ClientOptions(connect_timeout_seconds=1, read_timeout_seconds=2, max_attempts=1)


@pytest.fixture
def store(s3_endpoint: str, s3_bucket: str) -> S3ArtifactStore:
    opened = open_store(f"s3://{s3_bucket}/runs/v1", endpoint_url=s3_endpoint, public_endpoint_url="")
    assert isinstance(opened, S3ArtifactStore)
    return opened


def _http_get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


def test_store_satisfies_the_protocol(store: S3ArtifactStore) -> None:
    assert isinstance(store, ArtifactStore)


def test_put_get_exists_download_round_trip(store: S3ArtifactStore, s3_bucket: str, tmp_path: Path) -> None:
    key = artifact_key("job-1", 0, attempt=1)
    uri = store.put_bytes(key, b"\x89PNG fake bytes", "image/png")

    assert uri == f"s3://{s3_bucket}/runs/v1/jobs/job-1/1/0.png" == store.uri_for(key)
    assert store.exists(uri)
    assert not store.exists(f"s3://{s3_bucket}/runs/v1/jobs/job-1/1/1.png")
    assert store.get_bytes(uri) == b"\x89PNG fake bytes"
    head = store.client.head_object(Bucket=s3_bucket, Key="runs/v1/jobs/job-1/1/0.png")
    assert head["ContentType"] == "image/png"

    target = tmp_path / "out" / "0.png"
    store.download(uri, target)
    assert target.read_bytes() == b"\x89PNG fake bytes"
    assert [p.name for p in target.parent.iterdir()] == ["0.png"]  # no temp file left behind


def test_same_key_is_overwritten_not_duplicated(store: S3ArtifactStore, s3_bucket: str) -> None:
    first = store.put_bytes(artifact_key("job-2", 0, attempt=1), b"first try")
    second = store.put_bytes(artifact_key("job-2", 0, attempt=1), b"second try")

    assert first == second
    assert store.get_bytes(second) == b"second try"
    listing = store.client.list_objects_v2(Bucket=s3_bucket, Prefix="runs/v1/jobs/job-2/")
    assert [item["Key"] for item in listing["Contents"]] == ["runs/v1/jobs/job-2/1/0.png"]
    store.delete(second)
    assert not store.exists(second)
    store.delete(second)  # deleting a missing object is not an error


def test_missing_object_and_size_cap(store: S3ArtifactStore, s3_bucket: str) -> None:
    with pytest.raises(ObjectNotFoundError, match="object not found"):
        store.get_bytes(f"s3://{s3_bucket}/runs/v1/nothing.png")
    uri = store.put_bytes("inputs/big.bin", b"x" * 1000, "application/octet-stream")
    with pytest.raises(StorageError, match="1000 bytes, over the limit of 999"):
        store.get_bytes(uri, max_bytes=999)
    assert store.get_bytes(uri, max_bytes=1000) == b"x" * 1000


def test_presigned_url_uses_public_endpoint_and_is_signed(s3_endpoint: str, s3_bucket: str) -> None:
    public_store = open_store(
        f"s3://{s3_bucket}/p", endpoint_url=s3_endpoint, public_endpoint_url=PUBLIC_ENDPOINT
    )
    uri = public_store.put_bytes(artifact_key("job-3", 0, attempt=1), b"presigned body")

    public_url = public_store.presigned_url(uri, expires_seconds=600)
    parts = urlsplit(public_url)
    query = parse_qs(parts.query)
    assert (parts.scheme, parts.netloc) == ("https", "files.example.test")
    assert parts.path == f"/{s3_bucket}/p/jobs/job-3/1/0.png"  # path-style addressing
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Expires"] == ["600"]
    assert len(query["X-Amz-Signature"][0]) == 64

    # moto does not check signatures, so prove the host is signed: same object, other host, other signature.
    internal_store = open_store(
        f"s3://{s3_bucket}/p", endpoint_url=s3_endpoint, public_endpoint_url=s3_endpoint
    )
    internal_url = internal_store.presigned_url(uri, expires_seconds=600)
    assert urlsplit(internal_url).netloc == urlsplit(s3_endpoint).netloc
    assert parse_qs(urlsplit(internal_url).query)["X-Amz-Signature"] != query["X-Amz-Signature"]
    assert _http_get(internal_url) == b"presigned body"


def test_presign_expiry_is_capped_at_seven_days(store: S3ArtifactStore) -> None:
    uri = store.put_bytes("a.png", b"a")
    assert "X-Amz-Expires=604800" in store.presigned_url(uri, expires_seconds=7 * 24 * 3600)
    with pytest.raises(ValueError, match="7 days"):
        store.presigned_url(uri, expires_seconds=7 * 24 * 3600 + 1)


def test_checksums_are_only_sent_when_required(store: S3ArtifactStore) -> None:
    config = store.client.meta.config
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.signature_version == "s3v4"
    assert config.s3["addressing_style"] == "path"

    sent_headers: list[dict[str, Any]] = []
    store.client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent_headers.append(dict(request.headers))
    )
    store.put_bytes("checksum-probe.png", b"probe")
    assert sent_headers, "the PutObject hook did not run"
    names = {name.lower() for name in sent_headers[0]}
    assert not any(
        name.startswith("x-amz-checksum") or name == "x-amz-sdk-checksum-algorithm" for name in names
    )


def test_missing_bucket_is_reported_by_name(s3_endpoint: str) -> None:
    store = open_store("s3://dg-no-such-bucket/x", endpoint_url=s3_endpoint, s3_options=FAST_FAIL)
    with pytest.raises(
        StorageError, match=r"bucket 'dg-no-such-bucket' does not exist at http://127\.0\.0\.1:"
    ):
        store.check_reachable()
    with pytest.raises(StorageError, match="bucket 'dg-no-such-bucket' does not exist"):
        store.put_bytes("a.png", b"a")


def test_unreachable_endpoint_names_it_without_the_password() -> None:
    port = free_port()  # nothing listens here
    endpoint = f"http://admin:s3cret@127.0.0.1:{port}"
    store = open_store("s3://bucket/x", endpoint_url=endpoint, s3_options=FAST_FAIL)
    with pytest.raises(StorageError) as caught:
        store.check_reachable()
    message = str(caught.value)
    assert f"S3 endpoint http://admin:***@127.0.0.1:{port} is unreachable" in message
    assert "DG_S3_ENDPOINT_URL" in message
    assert "s3cret" not in message


def test_endpoint_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, s3_endpoint: str, s3_bucket: str
) -> None:
    monkeypatch.setenv("DG_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("DG_S3_PUBLIC_ENDPOINT_URL", PUBLIC_ENDPOINT)
    store = open_store(f"s3://{s3_bucket}")
    store.check_reachable()
    uri = store.put_bytes("env.png", b"env")
    assert uri == f"s3://{s3_bucket}/env.png"
    assert urlsplit(store.presigned_url(uri)).netloc == "files.example.test"


def test_unsupported_storage_url_is_refused_with_redaction() -> None:
    with pytest.raises(StorageError, match=r"ftp://u:\*\*\*@host/x.*s3://bucket/prefix or file:///"):
        open_store("ftp://u:pw@host/x")


def test_storage_init_creates_the_bucket_once(
    monkeypatch: pytest.MonkeyPatch, s3_endpoint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker import storage_init

    bucket = f"dg-init-{free_port()}"
    monkeypatch.setenv("DG_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("DG_STORAGE_URL", f"s3://{bucket}/artifacts")
    assert storage_init.main() == 0
    assert storage_init.main() == 0
    assert capsys.readouterr().out.splitlines() == [
        f"bucket '{bucket}' created",
        f"bucket '{bucket}' already exists",
    ]
    open_store(f"s3://{bucket}", endpoint_url=s3_endpoint).check_reachable()


def test_storage_init_gives_up_on_a_dead_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.storage_init import init_storage

    monkeypatch.setenv("DG_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match="unreachable"):
        init_storage("s3://bucket", wait_seconds=0.5, poll_seconds=0.1)
