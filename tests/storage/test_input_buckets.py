"""s3:// edit inputs are read from the allowed buckets only (DG_INPUT_S3_BUCKETS), against moto S3.

Without the allow-list a job spec could make a worker read any bucket its credentials reach.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config

from tests.support import solid_png
from worker.errors import describe_error
from worker.inputs import InputImageError, InputLimits, load_input_image, load_input_images
from worker.settings import SettingsError, load_settings
from worker.storage import ArtifactStore, StorageUnavailable, content_addressed_key, open_store
from worker.transient import is_transient

SMALL = InputLimits(max_bytes=512 * 1024, timeout_seconds=2.0)


@pytest.fixture
def s3_factory(s3_endpoint: str) -> Any:
    opened: list[str] = []

    def factory(storage_url: str) -> ArtifactStore:
        opened.append(storage_url)
        return open_store(storage_url, endpoint_url=s3_endpoint)

    factory.opened = opened  # type: ignore[attr-defined]
    return factory


@pytest.fixture
def other_bucket(s3_endpoint: str) -> str:
    """A second bucket the same credentials reach (the one a hostile job spec would name)."""
    name = f"dg-other-{uuid.uuid4().hex[:8]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
    )
    client.create_bucket(Bucket=name)
    return name


def _put(factory: Any, bucket: str, color: tuple[int, int, int]) -> str:
    data = solid_png(6, 5, color)
    return str(factory(f"s3://{bucket}").put_bytes(content_addressed_key(data, "png"), data))


def test_allowed_bucket_is_read_and_another_is_refused(
    s3_factory: Any, s3_bucket: str, other_bucket: str
) -> None:
    mine, theirs = _put(s3_factory, s3_bucket, (1, 2, 3)), _put(s3_factory, other_bucket, (4, 5, 6))
    s3_factory.opened.clear()
    image = load_input_image(mine, store_factory=s3_factory, limits=SMALL, s3_buckets={s3_bucket})
    assert image.getpixel((0, 0)) == (1, 2, 3)

    with pytest.raises(InputImageError) as caught:
        load_input_image(theirs, store_factory=s3_factory, limits=SMALL, s3_buckets={s3_bucket}, index=2)
    message = str(caught.value)
    assert message.startswith(f"input image 2 ({theirs}): bucket '{other_bucket}' is not allowed"), message
    assert "DG_INPUT_S3_BUCKETS" in message
    assert s3_factory.opened == [f"s3://{s3_bucket}"]  # refused before any request to the other bucket
    # The input's fault, not the store's: the runner fails the job at once (error class permanent).
    assert not is_transient(caught.value) and describe_error(caught.value)[0] == "InputImageError"


def test_star_allows_any_bucket_and_an_empty_list_none(
    s3_factory: Any, s3_bucket: str, other_bucket: str
) -> None:
    theirs = _put(s3_factory, other_bucket, (7, 8, 9))
    assert load_input_image(theirs, store_factory=s3_factory, limits=SMALL, s3_buckets={"*"}).size == (6, 5)
    with pytest.raises(InputImageError, match=f"bucket '{other_bucket}' is not allowed"):
        load_input_image(theirs, store_factory=s3_factory, limits=SMALL, s3_buckets=())


@pytest.mark.parametrize("authority", ["user@{b}", "{b}:9000", "{b}.evil", "x{b}"])
def test_the_bucket_must_match_exactly(s3_factory: Any, s3_bucket: str, authority: str) -> None:
    ref = f"s3://{authority.format(b=s3_bucket)}/k.png"
    with pytest.raises(InputImageError, match="is not allowed for input images"):
        load_input_image(ref, store_factory=s3_factory, limits=SMALL, s3_buckets={s3_bucket})


def test_default_comes_from_the_environment(
    s3_factory: Any, s3_bucket: str, other_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without s3_buckets the process's DG_* settings decide: by default the artifact bucket only."""
    mine, theirs = _put(s3_factory, s3_bucket, (1, 1, 1)), _put(s3_factory, other_bucket, (2, 2, 2))
    monkeypatch.setenv("DG_HOME", str(tmp_path))
    monkeypatch.delenv("DG_INPUT_S3_BUCKETS", raising=False)
    monkeypatch.setenv("DG_STORAGE_URL", f"s3://{s3_bucket}/prefix")
    assert [i.size for i in load_input_images([mine], store_factory=s3_factory, limits=SMALL)] == [(6, 5)]
    with pytest.raises(InputImageError, match=r"^input image 2 .*is not allowed"):
        load_input_images([mine, theirs], store_factory=s3_factory, limits=SMALL)
    monkeypatch.setenv("DG_INPUT_S3_BUCKETS", f"{s3_bucket}, {other_bucket}")
    assert len(load_input_images([mine, theirs], store_factory=s3_factory, limits=SMALL)) == 2
    monkeypatch.setenv("DG_STORAGE_URL", (tmp_path / "artifacts").as_uri())
    monkeypatch.delenv("DG_INPUT_S3_BUCKETS")
    with pytest.raises(InputImageError, match="is not allowed"):  # file:// artifacts: no bucket by default
        load_input_image(mine, store_factory=s3_factory, limits=SMALL)


def test_an_unreachable_allowed_bucket_stays_a_transient_fault() -> None:
    class Down:
        def get_bytes(self, uri: str, *, max_bytes: int | None = None) -> bytes:
            raise StorageUnavailable("connection refused")

    with pytest.raises(StorageUnavailable):
        load_input_image(
            "s3://mine/k.png",
            store_factory=lambda url: Down(),
            limits=SMALL,  # type: ignore[arg-type,return-value]
            s3_buckets={"mine"},
        )


def test_setting(tmp_path: Path) -> None:
    home = {"DG_HOME": str(tmp_path)}
    assert load_settings(home).allowed_input_s3_buckets == frozenset()
    on_s3 = {**home, "DG_STORAGE_URL": "s3://art/prefix"}
    assert load_settings(on_s3).input_s3_buckets is None
    assert load_settings(on_s3).allowed_input_s3_buckets == {"art"}
    listed = load_settings({**on_s3, "DG_INPUT_S3_BUCKETS": " in-a , in.b,in-a,"})
    assert listed.input_s3_buckets == ("in-a", "in.b") and listed.allowed_input_s3_buckets == {"in-a", "in.b"}
    assert load_settings({**home, "DG_INPUT_S3_BUCKETS": "*"}).allowed_input_s3_buckets == {"*"}
    for bad in ("s3://in-a", "in-a/prefix", "a b"):
        with pytest.raises(SettingsError, match="DG_INPUT_S3_BUCKETS"):
            load_settings({**home, "DG_INPUT_S3_BUCKETS": bad})
