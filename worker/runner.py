"""The body of one job, shared by the Celery task and the embedded in-process mode.

claim -> (lease kept alive by a thread) -> engine (resident) -> inputs -> generate the job's
num_images_per_prompt images (one batched engine call) with a throttled progress/cancel callback ->
one PNG with metadata per image -> uploads to attempt-scoped keys (artifact indexes 0..N-1) ->
one fenced completion with all the artifact rows.

Infrastructure faults (object store, database; `worker.transient`) are retried in place
within DG_TRANSIENT_RETRY_SECONDS; past that the job is handed back to the queue with a
growing delay, at most DG_MAX_REQUEUES times, and only then ends `failed` with error class
`transient`. Any other exception ends the job `failed` (class `permanent`) with a readable
reason. The worker process itself keeps serving (docs/jobs.md, "Transient faults").
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from enum import Enum
from typing import Any, Protocol, TypeVar

from schemas.enums import ErrorClass
from schemas.specs import parse_job_spec
from schemas.views import ArtifactView
from worker.claims import ClaimedJob, ClaimRefusal
from worker.deepgen.types import GenerationRequest, GenerationResult, GenerationStopped, StepCallback
from worker.errors import describe_error, free_accelerator_memory, is_soft_time_limit
from worker.finisher import Finisher
from worker.jobstore import JobNotFound, JobStore
from worker.lease import LeaseKeeper, ProgressReporter
from worker.settings import Settings
from worker.transient import is_transient, one_line, retry_transient

log = logging.getLogger(__name__)

_T = TypeVar("_T")
MAX_REQUEUE_DELAY_SECONDS = 600.0  # the longest wait between two hand-backs of one job


class Engine(Protocol):
    @property
    def provenance(self) -> Any: ...

    def generate(
        self, request: GenerationRequest, step_callback: StepCallback | None = None
    ) -> GenerationResult:
        """`request.num_images_per_prompt` images in `result.images`; `step_callback` once per step."""
        ...


EngineProvider = Callable[[], Engine]


class ResidentEngine:
    """Builds the engine on first use and keeps it for the life of the process."""

    def __init__(self, factory: Callable[[], Engine]) -> None:
        self._factory = factory
        self._engine: Engine | None = None
        self._lock = threading.Lock()
        self.load_count = 0

    def __call__(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = self._factory()
                self.load_count += 1
                log.info("DeepGen model loaded (load #%d in this process)", self.load_count)
            return self._engine


class RunOutcome(str, Enum):
    SKIPPED = "skipped"  # duplicate delivery, finished, cancelled or poison at claim
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REQUEUED = "requeued"  # an infrastructure fault outlasted the retries: back to the queue, delayed
    LOST = "lost"  # another worker took the job over; nothing was written
    # [issue 13] the images exist; encode, uploads and completion run on the finisher's thread
    FINISHING = "finishing"


@dataclasses.dataclass(frozen=True)
class _Generated:
    """What a job's generation hands to its finish (possibly on the finisher's thread)."""

    prompt: str
    params: dict[str, Any]
    result: GenerationResult
    provenance: dict[str, Any] | None


def load_deepgen_engine() -> Engine:
    """The real engine from the DG_DEEPGEN_* variables; torch is imported here, in the process that runs jobs."""
    from worker.deepgen.engine import DeepGenEngine

    return DeepGenEngine.from_env()


class JobRunner:
    def __init__(
        self,
        settings: Settings,
        engine_provider: EngineProvider,
        *,
        store: JobStore,
        artifact_store: Any,
        input_store_factory: Callable[[str], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.engine_provider = engine_provider
        self.store = store
        self.artifact_store = artifact_store
        self.input_store_factory = input_store_factory
        # [issue 13] told the outcome of each finish done on a finisher's thread
        self.on_done: Callable[[str, str, float], None] | None = None
        self._beside_threads: ThreadPoolExecutor | None = None  # made on first use (after a fork)

    def _beside(self) -> ThreadPoolExecutor:
        """[issue 13] Two threads beside the finish: the pre-upload lease check, and each PNG's
        thumbnail (made and stored while the PNG is encoded and uploaded)."""
        if self._beside_threads is None:
            self._beside_threads = ThreadPoolExecutor(2, thread_name_prefix="beside")
        return self._beside_threads

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        engine_provider: EngineProvider,
        *,
        store: JobStore | None = None,
        artifact_store: Any = None,
    ) -> JobRunner:
        """A runner on the configured database and storage (or on ones the caller already opened)."""
        from worker.jobstore import open_job_store
        from worker.storage import open_store

        if store is None:
            store = open_job_store(settings)
        if artifact_store is None:
            artifact_store = open_store(
                settings.storage_url,
                endpoint_url=settings.s3_endpoint_url,
                public_endpoint_url=settings.s3_public_endpoint_url,
            )

        @functools.lru_cache(maxsize=16)  # one S3 client per input bucket, not one per input image
        def input_store(storage_url: str) -> Any:
            return open_store(storage_url, endpoint_url=settings.s3_endpoint_url)

        return cls(
            settings,
            engine_provider,
            store=store,
            artifact_store=artifact_store,
            input_store_factory=input_store,
        )

    def run(self, job_id: str, worker_id: str, finisher: Finisher | None = None) -> RunOutcome:
        """Claim and run one job. With a `finisher` ([issue 13]) the encode, uploads and completion
        are handed to its thread once the images exist, and `FINISHING` is returned at once; the
        job's lease keeper goes with them and stops only after the completion (or failure) is
        written. The finish's outcome reaches `on_done(job_id, outcome, seconds)`."""
        if finisher is not None and finisher.holds(job_id):
            # The claim would grant it again to this same worker id (a retried claim): drop it here.
            log.info("dropping delivery of job %s: its finish is pending in this worker", job_id)
            return RunOutcome.SKIPPED
        outcome = self.store.claim_or_refusal(job_id, worker_id, self.settings.lease_seconds)
        if isinstance(outcome, ClaimRefusal):
            log.info("dropping delivery of job %s: %s", job_id, outcome.reason)
            return RunOutcome.SKIPPED
        claimed = outcome
        log.info(
            "job %s claimed by %s (attempt %d/%d)", job_id, worker_id, claimed.attempts, claimed.max_attempts
        )
        lease = LeaseKeeper(
            self.store,
            job_id,
            worker_id,
            lease_seconds=self.settings.lease_seconds,
            heartbeat_seconds=self.settings.heartbeat_seconds,
        )
        lease.start()
        handed_over = False
        try:
            generated = self._guarded(claimed, lease, lambda: self._generate(claimed, lease))
            if isinstance(generated, RunOutcome):
                return generated

            def finish() -> RunOutcome:
                return self._guarded(claimed, lease, lambda: self._finish(claimed, lease, generated))

            if finisher is None:
                return finish()
            try:  # blocks while the previous job's finish is pending (at most one)
                finisher.submit(
                    claimed.id, finish, release=lease.stop, abandon=lease.abandon, on_done=self.on_done
                )
            except Exception as exc:  # the soft time limit of this job, while it waited
                return self._failed(claimed, exc)
            handed_over = True
            log.info("job %s generated; encode, upload and completion handed to the finisher", claimed.id)
            return RunOutcome.FINISHING
        finally:
            if not handed_over:
                lease.stop()

    def _guarded(self, claimed: ClaimedJob, lease: LeaseKeeper, body: Callable[[], _T]) -> _T | RunOutcome:
        """`body`, with every exception ending the job as docs/jobs.md says (stopped, requeued, failed)."""
        try:
            return body()
        except GenerationStopped:
            return self._stopped(claimed, lease)
        except Exception as exc:
            # BaseException (KeyboardInterrupt, SystemExit, hard kills) is left to the worker:
            # the lease then expires and the job is retried up to the attempts cap.
            if not is_soft_time_limit(exc) and self._must_stop(claimed, lease):
                # Cancelled or taken over meanwhile: the error is most likely the stop itself
                # (e.g. an embedded model load cut short at interpreter exit), not the job's.
                return self._stopped(claimed, lease)
            if is_transient(exc) and not is_soft_time_limit(exc):
                return self._requeue(claimed, exc)
            return self._failed(claimed, exc)

    def _retrying(self, operation: Callable[[], _T], what: str, lease: LeaseKeeper | None = None) -> _T:
        """`operation` retried in place over transient faults, while this worker still owns the job."""
        return retry_transient(
            operation,
            what=what,
            budget_seconds=self.settings.transient_retry_seconds,
            should_stop=(lambda: lease.should_stop) if lease is not None else (lambda: False),
        )

    def _generate(self, claimed: ClaimedJob, lease: LeaseKeeper) -> _Generated:
        """Inputs, the engine call, the check that the job is still ours and not cancelled."""
        spec = parse_job_spec(claimed.spec)
        engine = self.engine_provider()
        if lease.should_stop:  # cancelled (or taken over) while the model was loading
            raise GenerationStopped(0, spec.params.num_inference_steps)
        images: tuple[Any, ...] = ()
        prompt = spec.prompt if spec.kind == "t2i" else spec.instruction
        if spec.kind == "edit":
            images = tuple(
                self._retrying(
                    lambda: self._load_inputs(spec.images),
                    f"reading the input images of job {claimed.id}",
                    lease,
                )
            )
        params = spec.params
        request = GenerationRequest(
            kind=spec.kind,
            prompt=prompt,
            images=images,
            negative_prompt=params.negative_prompt,
            guidance_scale=params.guidance_scale,
            num_inference_steps=params.num_inference_steps,
            height=params.height,
            width=params.width,
            seed=claimed.seed,
            num_images_per_prompt=params.num_images_per_prompt,
        )
        progress = ProgressReporter(
            self.store, claimed.id, claimed.worker_id, lease, self.settings.progress_interval_seconds
        )
        result = engine.generate(request, progress)
        if len(result.images) != params.num_images_per_prompt:
            raise RuntimeError(
                f"the engine returned {len(result.images)} image(s) for num_images_per_prompt="
                f"{params.num_images_per_prompt}"
            )
        return _Generated(
            prompt=prompt,
            params=spec.model_dump(mode="json")["params"],
            result=result,
            provenance=_plain(engine.provenance),
        )

    def _finish(self, claimed: ClaimedJob, lease: LeaseKeeper, generated: _Generated) -> RunOutcome:
        """The pre-upload lease check, one PNG per image, the uploads, the fenced completion with
        the artifact rows. [issue 13] The check runs here, on the finisher's thread when the finish
        is overlapped, so its round trip is not between two jobs' generations."""
        result, provenance = generated.result, generated.provenance
        # The pre-upload lease check: the last step writes no progress and the heartbeat may be up to
        # a period behind, so renew once more now; a cancel or a takeover stops before the first PUT.
        # [issue 13] Its round trip runs beside, while the first PNG is encoded.
        check = self._beside().submit(self._must_stop, claimed, lease)
        artifacts = self._upload(claimed, generated.prompt, generated.params, result, lease, check)
        if lease.lost.is_set():  # taken over, or [issue 13] an abandoned finish that came back late
            self._remove_unless_recorded(claimed.id, _object_uris(artifacts))
            return RunOutcome.LOST
        done = self._retrying(
            lambda: self.store.finish_succeeded(
                claimed.id,
                claimed.worker_id,
                artifacts=artifacts,
                seed=result.seed,
                width=result.width,
                height=result.height,
                provenance=provenance,
            ),
            f"completing job {claimed.id}",
        )
        if not done:
            log.warning(
                "job %s finished here but was taken over meanwhile; result left to the owner", claimed.id
            )
            self._remove_unless_recorded(claimed.id, _object_uris(artifacts))
            return RunOutcome.LOST
        log.info("job %s succeeded -> %s", claimed.id, ", ".join(artifact.uri for artifact in artifacts))
        self._remove_earlier_attempts(claimed, len(artifacts))
        return RunOutcome.SUCCEEDED

    def _must_stop(self, claimed: ClaimedJob, lease: LeaseKeeper) -> bool:
        """Renew the lease once more now and say whether the job was cancelled or taken over."""
        try:
            lease.observe(self.store.heartbeat(claimed.id, claimed.worker_id, self.settings.lease_seconds))
        except Exception as exc:
            if is_soft_time_limit(exc):
                raise
            # A database blip: go by what the heartbeat thread saw; the fenced finish decides.
            log.warning("lease check of job %s failed: %s", claimed.id, one_line(exc))
        return lease.should_stop

    def _load_inputs(self, refs: list[str]) -> list[Any]:
        from worker.inputs import InputLimits, load_input_images

        limits = InputLimits(
            max_bytes=self.settings.input_max_bytes,
            timeout_seconds=self.settings.input_timeout_seconds,
            max_pixels=self.settings.input_max_pixels,
        )
        kwargs: dict[str, Any] = {
            "limits": limits,
            "allow_local": self.settings.allow_local_inputs,
            "allow_private_networks": self.settings.input_allow_private_networks,
            "s3_buckets": self.settings.allowed_input_s3_buckets,
        }
        if self.input_store_factory is not None:
            kwargs["store_factory"] = self.input_store_factory
        return load_input_images(refs, **kwargs)

    def _upload(
        self,
        claimed: ClaimedJob,
        prompt: str,
        params: dict[str, Any],
        result: GenerationResult,
        lease: LeaseKeeper,
        check: Future[bool],
    ) -> list[ArtifactView]:
        """One PNG per image, artifact index = the image's position in the batch; ``check`` (the
        pre-upload lease check, True: stop) is waited for before the first PNG is stored.

        If an upload fails (or the job is cancelled or taken over between two uploads), the
        objects this run already stored are removed before the error goes on.
        """
        steps = params["num_inference_steps"]
        params = {**params, "seed": result.seed, "height": result.height, "width": result.width}
        artifacts: list[ArtifactView] = []
        try:
            for index, image in enumerate(result.images):
                if index and lease.should_stop:  # cancelled or taken over meanwhile: stop uploading
                    raise GenerationStopped(steps, steps)
                artifacts.append(
                    self._upload_one(claimed, prompt, params, result, index, image, lease, check)
                )
        except Exception:
            for artifact in artifacts:
                self._remove(artifact.uri)
                if artifact.thumbnail_uri:  # [issue 12]
                    self._remove(artifact.thumbnail_uri)
            raise
        return artifacts

    def _upload_one(
        self,
        claimed: ClaimedJob,
        prompt: str,
        params: dict[str, Any],
        result: GenerationResult,
        index: int,
        image: Any,
        lease: LeaseKeeper,
        check: Future[bool],
    ) -> ArtifactView:
        from worker.png import encode_png, generation_metadata, png_info
        from worker.storage import artifact_key

        metadata = generation_metadata(
            prompt=prompt,
            parameters=params,
            seed=result.seed,
            model=claimed.model_name,
            job_id=claimed.id,
            image_index=index,
        )
        # Attempt-scoped key: a worker that lost the job meanwhile cannot touch the owner's object.
        key = artifact_key(claimed.id, index, attempt=claimed.attempts)
        # [issue 12, 13] The thumbnail is made from the image and stored beside, while the PNG is
        # encoded and uploaded.
        thumbnail = self._beside().submit(self._upload_thumbnail, claimed, key, image, index, lease)
        try:
            data = encode_png(image, metadata)
            summary = png_info(data)
            if check.result():  # cancelled or taken over: nothing is stored (the thumbnail is removed)
                steps = params["num_inference_steps"]
                raise GenerationStopped(steps, steps)
            uri = self._retrying(
                lambda: self.artifact_store.put_bytes(key, data, "image/png"),
                f"uploading the image of job {claimed.id}"
                + (f", index {index}" if len(result.images) > 1 else ""),
                lease,
            )
        except BaseException:
            self._remove_when_stored(thumbnail)
            raise
        try:
            thumbnail_uri = thumbnail.result()
        except BaseException:  # a soft time limit: this image's PNG is not in the caller's list yet
            self._remove(uri)
            self._remove_when_stored(thumbnail)
            raise
        return ArtifactView(
            index=index,
            uri=uri,
            width=summary.width,
            height=summary.height,
            bytes=summary.size,
            sha256=summary.sha256,
            thumbnail_uri=thumbnail_uri,
        )

    def _upload_thumbnail(
        self, claimed: ClaimedJob, png_key: str, image: Any, index: int, lease: LeaseKeeper
    ) -> str | None:
        """[issue 12] The gallery's small WebP beside the PNG (`worker.thumbnails`), under the same
        attempt-scoped prefix, made from the PNG's pixels. A job never fails for want of one: the
        dashboard makes a missing thumbnail from the PNG, so any error here is logged and the
        artifact records none."""
        from worker.thumbnails import shrink_image, thumbnail_key

        try:
            thumbnail = shrink_image(image)
            return self._retrying(
                lambda: self.artifact_store.put_bytes(
                    thumbnail_key(png_key), thumbnail.data, thumbnail.content_type
                ),
                f"uploading the thumbnail of job {claimed.id}, index {index}",
                lease,
            )
        except Exception as exc:
            if is_soft_time_limit(exc):
                raise
            log.warning("job %s: no thumbnail for image %d (%s)", claimed.id, index, one_line(exc))
            return None

    def _remove_when_stored(self, thumbnail: Future[str | None]) -> None:
        """Remove the thumbnail once its upload ends, if it stored one (without waiting for it)."""

        def remove(done: Future[str | None]) -> None:
            uri = None if done.cancelled() or done.exception() is not None else done.result()
            if uri is not None:
                self._remove(uri)

        thumbnail.add_done_callback(remove)

    def _remove_earlier_attempts(self, claimed: ClaimedJob, image_count: int) -> None:
        """After a win: objects that earlier runs of this job may have left (they lost the job).

        Every run of a job makes the same number of images (the spec fixes it), indexes 0..N-1.
        """
        from worker.storage import artifact_key
        from worker.thumbnails import thumbnail_key

        for attempt in range(1, claimed.attempts):
            for index in range(image_count):
                key = artifact_key(claimed.id, index, attempt=attempt)
                self._remove(self.artifact_store.uri_for(key))
                self._remove(self.artifact_store.uri_for(thumbnail_key(key)))  # [issue 12]

    def _remove_unless_recorded(self, job_id: str, uris: list[str]) -> None:
        """After a lost completion: remove this run's objects, unless the row names them after all
        (the completion did commit and only its reply was lost)."""
        try:
            recorded = set(_object_uris(self.store.get(job_id).artifacts))
        except JobNotFound:
            recorded = set()  # pruned meanwhile: nothing can record these objects any more
        except Exception as exc:
            log.warning("could not read job %s to clean up its objects: %s", job_id, one_line(exc))
            return
        for uri in uris:
            if uri not in recorded:
                self._remove(uri)

    def _remove(self, uri: str) -> None:
        try:
            self.artifact_store.delete(uri)
        except Exception as exc:  # an orphan costs storage only; retention deletes the job's prefix
            log.warning("could not delete %s: %s", uri, one_line(exc))

    def _stopped(self, claimed: ClaimedJob, lease: LeaseKeeper) -> RunOutcome:
        if lease.cancel_requested.is_set() and self.store.finish_cancelled(claimed.id, claimed.worker_id):
            log.info("job %s cancelled at the worker's request", claimed.id)
            return RunOutcome.CANCELLED
        log.warning("job %s stopped: this worker lost its lease", claimed.id)
        return RunOutcome.LOST

    def _requeue(self, claimed: ClaimedJob, exc: Exception) -> RunOutcome:
        """An infrastructure fault outlasted the in-place retries: back to the queue with a delay,
        or, once DG_MAX_REQUEUES hand-backs are spent, `failed` with error class `transient`."""
        error_type, message = describe_error(exc)
        if claimed.requeues >= self.settings.max_requeues:
            note = (
                f"gave up after {claimed.requeues} requeue(s): an infrastructure fault outlasted every retry "
                f"(DG_MAX_REQUEUES); last error: {message}"
            )
            return self._failed(claimed, exc, error_class=ErrorClass.TRANSIENT, message=note)
        delay = min(MAX_REQUEUE_DELAY_SECONDS, self.settings.requeue_delay_seconds * 2**claimed.requeues)
        note = (
            f"requeued after an infrastructure fault (hand-back {claimed.requeues + 1} of at most "
            f"{self.settings.max_requeues}; runs again in {delay:.0f} s): {message}"
        )
        try:
            handed_back = self._retrying(
                lambda: self.store.requeue(
                    claimed.id,
                    claimed.worker_id,
                    delay_seconds=delay,
                    error_type=error_type,
                    error_message=note,
                ),
                f"requeueing job {claimed.id}",
            )
        except Exception as write_error:
            log.warning(
                "could not requeue job %s (%s); its lease will expire and the sweeper re-runs it",
                claimed.id,
                one_line(write_error),
            )
            return RunOutcome.LOST
        log.warning("job %s: %s", claimed.id, note)
        return RunOutcome.REQUEUED if handed_back else RunOutcome.LOST

    def _failed(
        self,
        claimed: ClaimedJob,
        exc: Exception,
        *,
        error_class: ErrorClass = ErrorClass.PERMANENT,
        message: str | None = None,
    ) -> RunOutcome:
        free_accelerator_memory()
        error_type, described = describe_error(
            exc, soft_time_limit_seconds=self.settings.soft_time_limit_seconds
        )
        message = message or described
        log.warning(
            "job %s failed: %s: %s",
            claimed.id,
            error_type,
            message,
            exc_info=error_class is ErrorClass.PERMANENT and _unexpected(exc),
        )
        try:
            recorded = self._retrying(
                lambda: self.store.finish_failed(
                    claimed.id,
                    claimed.worker_id,
                    error_type=error_type,
                    error_message=message,
                    error_class=error_class,
                ),
                f"recording the failure of job {claimed.id}",
            )
        except Exception as write_error:
            log.warning(
                "could not record the failure of job %s (%s); its lease will expire",
                claimed.id,
                one_line(write_error),
            )
            return RunOutcome.FAILED
        return RunOutcome.FAILED if recorded else RunOutcome.LOST


def _object_uris(artifacts: list[ArtifactView]) -> list[str]:
    """Every object a run stored: the PNGs and their thumbnails ([issue 12])."""
    return [uri for a in artifacts for uri in (a.uri, a.thumbnail_uri) if uri]


def _unexpected(exc: Exception) -> bool:
    """Expected, user-caused failures get no traceback in the log."""
    from pydantic import ValidationError

    from worker.inputs import InputImageError

    return not isinstance(exc, InputImageError | ValidationError | ValueError)


def _plain(value: Any) -> dict[str, Any] | None:
    """Engine provenance as JSON-ready data (the engine may give a dataclass or a mapping)."""
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        import json

        return json.loads(json.dumps(dict(value), default=str))
    return {"value": str(value)}
