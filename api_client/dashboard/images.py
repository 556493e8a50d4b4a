"""Images a page shows, proxied from storage: a job's PNGs, their thumbnails, and edit inputs.

Pages never carry a storage URI or a presigned URL: an `<img>` names `/image/<job>/<index>`,
`/thumb/<job>/<index>` or `/input/<job>/<n>`, and this process reads the object with the same
store (and credentials) the workers use. A job stored before thumbnails existed, or whose
thumbnail object is missing, gets one made here from its PNG, kept in a small in-memory cache
(never written back: the dashboard writes nothing). Edit inputs are read under the workers'
own rules (`worker.inputs`: allowed buckets, local files only where allowed, the SSRF guard)
and re-encoded, so only pixels ever leave, never a file as stored.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from schemas.views import ArtifactView, JobView
from worker.jobstore import JobNotFound, JobStore
from worker.settings import Settings
from worker.storage import ArtifactStore, ObjectNotFoundError, StorageError, StorageUnavailable, open_store
from worker.thumbnails import ThumbnailError, make_thumbnail, shrink_image

PREVIEW_SIDE = 1024  # edit inputs are shown re-encoded at most this size
PREVIEW_MAX_BYTES = 400_000


class ImageProblem(Exception):
    """Why an image cannot be served: an HTTP status and a sentence for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ImageBytes:
    data: bytes
    content_type: str


class ByteCache:
    """A thread-safe LRU of byte strings bounded by their total size."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, ImageBytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> ImageBytes | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: str, item: ImageBytes) -> None:
        if len(item.data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._size -= len(old.data)
            self._items[key] = item
            self._size += len(item.data)
            while self._size > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped.data)


def _storage_problem(exc: StorageError, what: str) -> ImageProblem:
    if isinstance(exc, ObjectNotFoundError):
        return ImageProblem(
            404, f"{what} is gone from storage (pruned by retention, or deleted): {exc}".rstrip()
        )
    if isinstance(exc, StorageUnavailable):
        return ImageProblem(503, f"the artifact storage cannot be reached right now: {exc}")
    return ImageProblem(502, f"the artifact storage refused to serve {what}: {exc}")


class Images:
    def __init__(
        self,
        store: JobStore,
        artifacts: ArtifactStore,
        settings: Settings,
        *,
        max_bytes: int,
        cache_bytes: int,
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.settings = settings
        self.max_bytes = max_bytes
        self.cache = ByteCache(cache_bytes)
        self._input_stores: dict[str, Any] = {}
        self._lock = threading.Lock()

    def job(self, job_id: str) -> JobView:
        try:
            return self.store.get(job_id)
        except JobNotFound:
            raise ImageProblem(404, f"no job with id {job_id}") from None

    def artifact(self, job_id: str, index: int) -> tuple[JobView, ArtifactView]:
        job = self.job(job_id)
        for artifact in job.artifacts:
            if artifact.index == index:
                return job, artifact
        count = len(job.artifacts)
        detail = f"it has {count} image(s)" if count else f"it is {job.status.value} and has no images"
        raise ImageProblem(404, f"job {job_id} has no image {index}: {detail}")

    def full(self, job_id: str, index: int) -> ImageBytes:
        _, artifact = self.artifact(job_id, index)
        return ImageBytes(self._read(artifact.uri, f"image {index} of job {job_id}"), "image/png")

    def thumbnail(self, job_id: str, index: int) -> ImageBytes:
        _, artifact = self.artifact(job_id, index)
        what = f"image {index} of job {job_id}"
        thumbnail_uri = getattr(artifact, "thumbnail_uri", None)
        if thumbnail_uri:
            try:
                data = self.artifacts.get_bytes(thumbnail_uri, max_bytes=self.max_bytes)
                return ImageBytes(data, _content_type(thumbnail_uri))
            except ObjectNotFoundError:
                pass  # the PNG may still be there: make one from it below
            except StorageError as exc:
                raise _storage_problem(exc, f"the thumbnail of {what}") from None
        key = f"{artifact.uri}#{artifact.sha256}"
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        try:
            made = make_thumbnail(self._read(artifact.uri, what))
        except ThumbnailError as exc:
            raise ImageProblem(502, f"{what} cannot be shrunk: {exc}") from None
        item = ImageBytes(made.data, made.content_type)
        self.cache.put(key, item)
        return item

    def input_preview(self, job_id: str, number: int) -> ImageBytes:
        """Edit input ``number`` (0-based) of a job, re-encoded at most PREVIEW_SIDE a side."""
        from worker.inputs import InputImageError, InputLimits, load_input_image

        job = self.job(job_id)
        refs = list(job.spec.get("images") or [])
        if not 0 <= number < len(refs):
            raise ImageProblem(
                404, f"job {job_id} has {len(refs)} input image(s); there is no input {number}"
            )
        key = f"input:{job_id}:{number}"
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        settings = self.settings
        limits = InputLimits(
            max_bytes=settings.input_max_bytes,
            timeout_seconds=min(10.0, settings.input_timeout_seconds),
            max_pixels=settings.input_max_pixels,
        )
        try:
            image = load_input_image(
                refs[number],
                store_factory=self._input_store,
                limits=limits,
                allow_local=settings.allow_local_inputs,
                allow_private_networks=settings.input_allow_private_networks,
                s3_buckets=settings.allowed_input_s3_buckets,
                index=number + 1,
            )
        except InputImageError as exc:
            status = 503 if isinstance(exc.__cause__, StorageUnavailable) else 404
            raise ImageProblem(status, f"input {number + 1} of job {job_id} cannot be shown: {exc}") from None
        item = ImageBytes(*_preview(image))
        self.cache.put(key, item)
        return item

    def _input_store(self, storage_url: str) -> Any:
        """One store per input bucket for the life of the process (as the runner keeps them)."""
        with self._lock:
            if storage_url not in self._input_stores:
                self._input_stores[storage_url] = open_store(
                    storage_url, endpoint_url=self.settings.s3_endpoint_url
                )
            return self._input_stores[storage_url]

    def _read(self, uri: str, what: str) -> bytes:
        try:
            return self.artifacts.get_bytes(uri, max_bytes=self.max_bytes)
        except StorageError as exc:
            raise _storage_problem(exc, what) from None


def _preview(image: Any) -> tuple[bytes, str]:
    made = shrink_image(image, side=PREVIEW_SIDE, max_bytes=PREVIEW_MAX_BYTES)
    return made.data, made.content_type


def _content_type(uri: str) -> str:
    lowered = uri.lower()
    if lowered.endswith(".webp"):
        return "image/webp"
    if lowered.endswith((".jpg", ".jpeg")):
        return "image/jpeg"
    return "image/png"


MISSING_SVG = """<svg xmlns="http://www.w3.org/2000/svg" width="256" height="256" viewBox="0 0 256 256">
<rect width="256" height="256" fill="#f3f3f3" stroke="#c8c8c8"/>
<text x="128" y="122" font-family="sans-serif" font-size="18" text-anchor="middle" fill="#8a1c1c">{title}</text>
<text x="128" y="148" font-family="sans-serif" font-size="13" text-anchor="middle" fill="#555">{detail}</text>
</svg>"""


def placeholder_svg(status: int) -> bytes:
    """What an `<img>` shows instead of an image that cannot be served (the status says why)."""
    title, detail = {
        404: ("image missing", "gone from storage"),
        503: ("storage down", "try again later"),
    }.get(status, ("image unavailable", f"HTTP {status}"))
    return MISSING_SVG.format(title=title, detail=detail).encode()
