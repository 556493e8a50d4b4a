"""Artifact storage: ``s3://bucket/prefix`` (any S3-compatible store) and ``file:///dir``.

Stores hand out URIs (``s3://bucket/prefix/jobs/<id>/1/0.png``, ``file:///dir/jobs/<id>/1/0.png``) and
accept them back. Output keys are per job and claim number (`artifact_key`), so a worker that lost its
job never writes over the winner's image; input uploads are content-addressed (`content_addressed_key`).
`file://` objects and downloads are written whole or not at all, with the umask's mode (`worker.files`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote, unquote, urlsplit
from urllib.request import url2pathname

from worker.files import atomic_file
from worker.redact import redact_url, redact_urls_in

MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # the SigV4 ceiling
_CHUNK = 1024 * 1024


class StorageError(RuntimeError):
    """A storage operation failed; the message says what to fix (secrets already redacted)."""


class ObjectNotFoundError(StorageError):
    """The URI names an object (or file) that does not exist."""


class StorageUnavailable(StorageError):
    """The store could not be reached or answered with a transient error (connection refused,
    timeout, throttling, HTTP 5xx): an infrastructure fault, worth retrying; never the user's fault."""


# S3 error codes that mean "try again later", besides any HTTP 5xx answer.
TRANSIENT_S3_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "ServiceUnavailable",
        "InternalError",
        "OperationAborted",
        "RequestLimitExceeded",
    }
)


def artifact_key(job_id: str, index: int, *, attempt: int) -> str:
    """Key of a job's ``index``-th output image from claim number ``attempt``, relative to the prefix.

    Attempt-scoped, so a worker that lost the job (its lease expired while it stalled) writes
    beside the new owner's object, never over it: the artifact row names the winner's key
    (docs/jobs.md, "Artifacts are fenced").
    """
    if index < 0:
        raise ValueError(f"artifact index must be >= 0, got {index}")
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    _check_key_part(str(job_id), "job id")
    return f"{job_prefix(job_id)}{attempt}/{index}.png"


def job_prefix(job_id: str) -> str:
    """The key prefix under which every object of a job lives (all attempts)."""
    _check_key_part(str(job_id), "job id")
    return f"jobs/{job_id}/"


def content_addressed_key(data: bytes, suffix: str) -> str:
    """Key for an uploaded input: the same bytes always land on the same key (uploads deduplicate)."""
    suffix = suffix.lstrip(".").lower()
    if not suffix.isalnum():
        raise ValueError(f"file suffix must be letters/digits like 'png', got {suffix!r}")
    return f"inputs/{hashlib.sha256(data).hexdigest()}.{suffix}"


@runtime_checkable
class ArtifactStore(Protocol):
    """What the worker and the client need from a storage backend."""

    @property
    def url(self) -> str:
        """The storage URL this store was opened with (e.g. ``s3://bucket/prefix``)."""
        ...

    def uri_for(self, key: str) -> str:
        """The URI an object under ``<prefix>/<key>`` has (whether or not it exists)."""
        ...

    def put_bytes(self, key: str, data: bytes, content_type: str = "image/png") -> str:
        """Write ``data`` under ``<prefix>/<key>``, replacing any previous object; return its URI."""
        ...

    def get_bytes(self, uri: str, *, max_bytes: int | None = None) -> bytes:
        """Read an object; with ``max_bytes``, refuse objects larger than that without reading them."""
        ...

    def presigned_url(self, uri: str, expires_seconds: int = 3600) -> str:
        """A URL that lets anyone holding it GET the object until it expires."""
        ...

    def exists(self, uri: str) -> bool: ...

    def delete(self, uri: str) -> None:
        """Remove an object; removing one that does not exist is not an error."""
        ...

    def download(self, uri: str, path: str | os.PathLike[str]) -> None:
        """Copy an object to a local file (written atomically)."""
        ...

    def check_reachable(self) -> None:
        """Raise :class:`StorageError` now if the store cannot be used (CLI fail-fast)."""
        ...


def open_store(
    storage_url: str,
    *,
    endpoint_url: str | None = None,
    public_endpoint_url: str | None = None,
    s3_options: S3ClientOptions | None = None,
) -> ArtifactStore:
    """Open the store named by ``storage_url`` (``s3://bucket[/prefix]`` or ``file:///dir``).

    For S3, ``endpoint_url`` defaults to ``DG_S3_ENDPOINT_URL`` and ``public_endpoint_url`` to
    ``DG_S3_PUBLIC_ENDPOINT_URL`` (unset means AWS itself / same as the internal endpoint).
    """
    scheme = urlsplit(storage_url).scheme.lower()
    if scheme == "s3":
        return S3ArtifactStore(
            storage_url,
            endpoint_url=endpoint_url if endpoint_url is not None else _env("DG_S3_ENDPOINT_URL"),
            public_endpoint_url=(
                public_endpoint_url if public_endpoint_url is not None else _env("DG_S3_PUBLIC_ENDPOINT_URL")
            ),
            options=s3_options,
        )
    if scheme == "file":
        return FileArtifactStore(storage_url)
    raise StorageError(
        f"unsupported storage URL {redact_url(storage_url)!r}: use s3://bucket/prefix or file:///absolute/dir "
        "(DG_STORAGE_URL)"
    )


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _check_key_part(text: str, what: str) -> None:
    if not text or "/" in text or text in {".", ".."}:
        raise ValueError(f"{what} must be a non-empty name without '/', got {text!r}")


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(part in {"", ".", ".."} for part in parts):
        raise ValueError(f"storage key must be a relative path like 'jobs/<id>/1/0.png', got {key!r}")
    return key


# --------------------------------------------------------------------------------------------- file


class FileArtifactStore:
    """Artifacts as files below one directory; the embedded (no broker) default."""

    def __init__(self, storage_url: str) -> None:
        self._url = storage_url
        self.root = Path(file_uri_to_path(storage_url)).resolve()

    @property
    def url(self) -> str:
        return self._url

    def uri_for(self, key: str) -> str:
        return (self.root / _check_key(key)).as_uri()

    def put_bytes(self, key: str, data: bytes, content_type: str = "image/png") -> str:
        path = self.root / _check_key(key)
        try:
            with atomic_file(path) as out:
                out.write(data)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}; check DG_STORAGE_URL") from exc
        return path.as_uri()

    def get_bytes(self, uri: str, *, max_bytes: int | None = None) -> bytes:
        path = self._path_of(uri)
        try:
            size = path.stat().st_size
            if max_bytes is not None and size > max_bytes:
                raise StorageError(f"{uri} is {size} bytes, over the limit of {max_bytes} bytes")
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFoundError(f"no such file: {path}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def presigned_url(self, uri: str, expires_seconds: int = 3600) -> str:
        # Files cannot be signed; their URI is already the way to reach them on this machine.
        _check_expiry(expires_seconds)
        return self._path_of(uri).as_uri()

    def exists(self, uri: str) -> bool:
        return self._path_of(uri).is_file()

    def delete(self, uri: str) -> None:
        path = self._path_of(uri)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot delete {path}: {exc.strerror or exc}") from exc

    def download(self, uri: str, path: str | os.PathLike[str]) -> None:
        data = self.get_bytes(uri)
        try:
            with atomic_file(Path(path)) as out:
                out.write(data)
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc

    def check_reachable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create storage directory {self.root}: {exc.strerror or exc}") from exc
        if not os.access(self.root, os.W_OK):
            raise StorageError(
                f"storage directory {self.root} is not writable; fix DG_STORAGE_URL or permissions"
            )

    def _path_of(self, uri: str) -> Path:
        path = Path(file_uri_to_path(uri)).resolve()
        if not path.is_relative_to(self.root):
            raise StorageError(f"{uri} is outside this store's directory {self.root}")
        return path


def file_uri_to_path(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.scheme.lower() != "file" or parts.netloc not in {"", "localhost"} or not parts.path:
        raise StorageError(f"expected a file:///absolute/path URI, got {redact_url(uri)!r}")
    return url2pathname(unquote(parts.path))


def _check_expiry(expires_seconds: int) -> None:
    if not 1 <= expires_seconds <= MAX_PRESIGN_SECONDS:
        raise ValueError(
            f"presigned URL expiry must be 1..{MAX_PRESIGN_SECONDS} seconds (7 days), got {expires_seconds}"
        )


# ----------------------------------------------------------------------------------------------- s3


@dataclass(frozen=True)
class S3ClientOptions:
    """botocore client tuning; the defaults suit a worker uploading a few MB per job."""

    region: str | None = None  # None: the AWS chain (AWS_DEFAULT_REGION, config file), else us-east-1
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 60.0
    max_attempts: int = 5


def _split_s3_uri(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    if parts.scheme.lower() != "s3" or not parts.netloc:
        raise StorageError(f"expected an s3://bucket/key URI, got {redact_url(uri)!r}")
    return parts.netloc, unquote(parts.path.lstrip("/"))


class S3ArtifactStore:
    """Objects in an S3-compatible bucket, addressed path-style with SigV4."""

    def __init__(
        self,
        storage_url: str,
        *,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        options: S3ClientOptions | None = None,
    ) -> None:
        import boto3  # imported here so the file:// path never pays for botocore

        self._url = storage_url
        self.bucket, prefix = _split_s3_uri(storage_url)
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.public_endpoint_url = public_endpoint_url
        self._options = options or S3ClientOptions()
        session = boto3.session.Session()
        self.region = self._options.region or session.region_name or "us-east-1"
        self._client = self._make_client(session, endpoint_url)
        # SigV4 signs the Host header, so browser-facing URLs must be minted for the public host.
        use_public = public_endpoint_url and public_endpoint_url.rstrip("/") != (endpoint_url or "").rstrip(
            "/"
        )
        self._presign_client = self._make_client(session, public_endpoint_url) if use_public else self._client

    @property
    def url(self) -> str:
        return self._url

    @property
    def client(self) -> Any:
        """The internal boto3 client (for tests and tools that need a raw call)."""
        return self._client

    def _make_client(self, session: Any, endpoint_url: str | None) -> Any:
        from botocore.config import Config

        config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            # botocore >= 1.36 sends CRC32 checksums by default, which many S3-compatible stores reject.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=self._options.connect_timeout_seconds,
            read_timeout=self._options.read_timeout_seconds,
            retries={"max_attempts": self._options.max_attempts, "mode": "standard"},
        )
        try:
            return session.client("s3", endpoint_url=endpoint_url, region_name=self.region, config=config)
        except ValueError as exc:  # botocore rejects malformed endpoint URLs here
            raise StorageError(
                f"invalid S3 endpoint URL {redact_url(endpoint_url or '')!r}: {redact_urls_in(str(exc))}; "
                "fix DG_S3_ENDPOINT_URL / DG_S3_PUBLIC_ENDPOINT_URL"
            ) from exc

    def uri_for(self, key: str) -> str:
        full = f"{self.prefix}/{_check_key(key)}" if self.prefix else _check_key(key)
        return f"s3://{self.bucket}/{quote(full, safe='/')}"

    def put_bytes(self, key: str, data: bytes, content_type: str = "image/png") -> str:
        uri = self.uri_for(key)
        bucket, object_key = _split_s3_uri(uri)
        with self._errors(uri):
            self._client.put_object(Bucket=bucket, Key=object_key, Body=data, ContentType=content_type)
        return uri

    def get_bytes(self, uri: str, *, max_bytes: int | None = None) -> bytes:
        bucket, key = _split_s3_uri(uri)
        with self._errors(uri):
            response = self._client.get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                size = int(response.get("ContentLength", 0))
                if max_bytes is not None and size > max_bytes:
                    raise StorageError(f"{uri} is {size} bytes, over the limit of {max_bytes} bytes")
                # Read one byte past the cap so a store that lied about the length is caught too.
                data = body.read() if max_bytes is None else body.read(max_bytes + 1)
                if max_bytes is not None and len(data) > max_bytes:
                    raise StorageError(f"{uri} is over the limit of {max_bytes} bytes")
                return data
            finally:
                body.close()

    def presigned_url(self, uri: str, expires_seconds: int = 3600) -> str:
        _check_expiry(expires_seconds)
        bucket, key = _split_s3_uri(uri)
        with self._errors(uri):
            url: str = self._presign_client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_seconds
            )
        return url

    def exists(self, uri: str) -> bool:
        bucket, key = _split_s3_uri(uri)
        try:
            with self._errors(uri):
                self._client.head_object(Bucket=bucket, Key=key)
        except ObjectNotFoundError:
            return False
        return True

    def delete(self, uri: str) -> None:
        bucket, key = _split_s3_uri(uri)
        with self._errors(uri):
            self._client.delete_object(Bucket=bucket, Key=key)

    def download(self, uri: str, path: str | os.PathLike[str]) -> None:
        bucket, key = _split_s3_uri(uri)
        with self._errors(uri):
            body = self._client.get_object(Bucket=bucket, Key=key)["Body"]
            try:
                with atomic_file(Path(path)) as out:
                    for chunk in iter(lambda: body.read(_CHUNK), b""):
                        out.write(chunk)
            finally:
                body.close()

    def check_reachable(self) -> None:
        with self._errors(f"s3://{self.bucket}"):
            self._client.head_bucket(Bucket=self.bucket)

    def ensure_bucket(self) -> bool:
        """Create the bucket if it is missing (deployment bootstrap); return True if it was created."""
        try:
            self.check_reachable()
            return False
        except StorageError as exc:
            if "does not exist" not in str(exc):
                raise
        with self._errors(f"s3://{self.bucket}"):
            try:
                self._client.create_bucket(Bucket=self.bucket, **self._location_constraint())
            except self._client.exceptions.BucketAlreadyOwnedByYou:
                return False  # another bootstrap won the race
        return True

    def _location_constraint(self) -> dict[str, Any]:
        # us-east-1 is the one region that rejects an explicit LocationConstraint.
        if self.region == "us-east-1":
            return {}
        return {"CreateBucketConfiguration": {"LocationConstraint": self.region}}

    @contextmanager
    def _errors(self, uri: str) -> Iterator[None]:
        """Turn botocore's exceptions into :class:`StorageError` messages that say what to fix."""
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError, NoCredentialsError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        where = redact_url(self.endpoint_url) if self.endpoint_url else "AWS S3"
        bucket = urlsplit(uri).netloc
        try:
            yield
        except StorageError:
            raise
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket" or (code == "404" and exc.operation_name == "HeadBucket"):
                raise StorageError(
                    f"bucket {bucket!r} does not exist at {where}; create it or fix DG_STORAGE_URL"
                ) from exc
            if code in {"NoSuchKey", "404", "NotFound"}:
                raise ObjectNotFoundError(f"object not found: {uri}") from exc
            if code in TRANSIENT_S3_CODES or (isinstance(status, int) and status >= 500):
                raise StorageUnavailable(
                    f"S3 endpoint {where} answered HTTP {status} {code} for {uri} (a transient store error)"
                ) from exc
            if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
                raise StorageError(
                    f"access denied to {uri} at {where} ({code}); check the AWS credentials and bucket policy"
                ) from exc
            message = error.get("Message") or code
            raise StorageError(f"S3 error on {uri} at {where}: HTTP {status} {code}: {message}") from exc
        except NoCredentialsError as exc:
            raise StorageError(
                "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or an AWS profile / instance role)"
            ) from exc
        except (BotoConnectionError, HTTPClientError) as exc:
            # Connection refused or reset, DNS failure, timeouts: the endpoint itself is the problem.
            detail = redact_urls_in(str(exc))
            raise StorageUnavailable(
                f"S3 endpoint {where} is unreachable ({type(exc).__name__}: {detail}); "
                "check DG_S3_ENDPOINT_URL and that the object store is running"
            ) from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 request for {uri} at {where} failed: {redact_urls_in(str(exc))}") from exc
