"""The body of one job, shared by the Celery task and the embedded in-process mode.

claim -> (lease kept alive by a thread) -> engine (resident) -> inputs -> generate with a
throttled progress/cancel callback -> PNG with metadata -> upload to a deterministic key ->
fenced completion with the artifact rows. Every exception ends the job `failed` with a
readable reason; the worker process itself keeps serving.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, Protocol

from schemas.specs import parse_job_spec
from schemas.views import ArtifactView
from worker.claims import ClaimedJob, ClaimRefusal
from worker.deepgen.types import GenerationRequest, GenerationResult, GenerationStopped, StepCallback
from worker.errors import describe_error, free_accelerator_memory, is_soft_time_limit
from worker.jobstore import JobStore
from worker.lease import LeaseKeeper, ProgressReporter
from worker.settings import Settings

log = logging.getLogger(__name__)


class Engine(Protocol):
    @property
    def provenance(self) -> Any: ...

    def generate(self, request: GenerationRequest, step_callback: StepCallback | None = None) -> GenerationResult: ...


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
    LOST = "lost"  # another worker took the job over; nothing was written


def load_deepgen_engine() -> Engine:
    """The real engine from the DG_DEEPGEN_* variables; torch is imported here, in the process that runs jobs."""
    from worker.deepgen.engine import DeepGenEngine

    return DeepGenEngine.from_env()


class JobRunner:
    def __init__(self, settings: Settings, engine_provider: EngineProvider, *, store: JobStore,
                 artifact_store: Any, input_store_factory: Callable[[str], Any] | None = None) -> None:
        self.settings = settings
        self.engine_provider = engine_provider
        self.store = store
        self.artifact_store = artifact_store
        self.input_store_factory = input_store_factory

    @classmethod
    def from_settings(cls, settings: Settings, engine_provider: EngineProvider, *,
                      store: JobStore | None = None, artifact_store: Any = None) -> JobRunner:
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

        return cls(settings, engine_provider, store=store, artifact_store=artifact_store,
                   input_store_factory=input_store)

    def run(self, job_id: str, worker_id: str) -> RunOutcome:
        outcome = self.store.claim_or_refusal(job_id, worker_id, self.settings.lease_seconds)
        if isinstance(outcome, ClaimRefusal):
            log.info("dropping delivery of job %s: %s", job_id, outcome.reason)
            return RunOutcome.SKIPPED
        claimed = outcome
        log.info("job %s claimed by %s (attempt %d/%d)", job_id, worker_id, claimed.attempts, claimed.max_attempts)
        lease = LeaseKeeper(self.store, job_id, worker_id, lease_seconds=self.settings.lease_seconds,
                            heartbeat_seconds=self.settings.heartbeat_seconds)
        with lease:
            try:
                return self._execute(claimed, lease)
            except GenerationStopped:
                return self._stopped(claimed, lease)
            except Exception as exc:
                # BaseException (KeyboardInterrupt, SystemExit, hard kills) is left to the worker:
                # the lease then expires and the job is retried up to the attempts cap.
                return self._failed(claimed, exc)

    def _execute(self, claimed: ClaimedJob, lease: LeaseKeeper) -> RunOutcome:
        spec = parse_job_spec(claimed.spec)
        engine = self.engine_provider()
        if lease.should_stop:  # cancelled (or taken over) while the model was loading
            raise GenerationStopped(0, spec.params.num_inference_steps)
        images: tuple[Any, ...] = ()
        prompt = spec.prompt if spec.kind == "t2i" else spec.instruction
        if spec.kind == "edit":
            images = tuple(self._load_inputs(spec.images))
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
        )
        progress = ProgressReporter(self.store, claimed.id, claimed.worker_id, lease,
                                    self.settings.progress_interval_seconds)
        result = engine.generate(request, progress)
        self._check_lease(claimed, lease, params.num_inference_steps)
        provenance = _plain(engine.provenance)
        artifact = self._upload(claimed, prompt, spec.model_dump(mode="json")["params"], result)
        done = self.store.finish_succeeded(
            claimed.id, claimed.worker_id, artifacts=[artifact], seed=result.seed,
            width=result.width, height=result.height, provenance=provenance,
        )
        if not done:
            log.warning("job %s finished here but was taken over meanwhile; result left to the owner", claimed.id)
            return RunOutcome.LOST
        log.info("job %s succeeded -> %s", claimed.id, artifact.uri)
        return RunOutcome.SUCCEEDED

    def _check_lease(self, claimed: ClaimedJob, lease: LeaseKeeper, total: int) -> None:
        """Before uploading: renew the lease once more and stop if it was lost or a cancel came.

        The last step writes no progress and the heartbeat may be up to a period behind, so a
        worker whose job was taken over would otherwise overwrite the new owner's PNG.
        """
        try:
            lease.observe(self.store.heartbeat(claimed.id, claimed.worker_id, self.settings.lease_seconds))
        except Exception as exc:
            if is_soft_time_limit(exc):
                raise
            # A database blip: go by what the heartbeat thread saw; the fenced finish decides.
            log.warning("lease check of job %s before upload failed", claimed.id, exc_info=True)
        if lease.should_stop:
            raise GenerationStopped(total, total)

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
        }
        if self.input_store_factory is not None:
            kwargs["store_factory"] = self.input_store_factory
        return load_input_images(refs, **kwargs)

    def _upload(self, claimed: ClaimedJob, prompt: str, params: dict[str, Any],
                result: GenerationResult) -> ArtifactView:
        from worker.png import encode_png, generation_metadata, png_info
        from worker.storage import artifact_key

        params = {**params, "seed": result.seed, "height": result.height, "width": result.width}
        metadata = generation_metadata(prompt=prompt, parameters=params, seed=result.seed,
                                       model=claimed.model_name, job_id=claimed.id)
        data = encode_png(result.image, metadata)
        summary = png_info(data)
        # Deterministic key: a re-run after a crash overwrites the same object.
        uri = self.artifact_store.put_bytes(artifact_key(claimed.id, 0), data, "image/png")
        return ArtifactView(index=0, uri=uri, width=summary.width, height=summary.height,
                              bytes=summary.size, sha256=summary.sha256)

    def _stopped(self, claimed: ClaimedJob, lease: LeaseKeeper) -> RunOutcome:
        if lease.cancel_requested.is_set() and self.store.finish_cancelled(claimed.id, claimed.worker_id):
            log.info("job %s cancelled at the worker's request", claimed.id)
            return RunOutcome.CANCELLED
        log.warning("job %s stopped: this worker lost its lease", claimed.id)
        return RunOutcome.LOST

    def _failed(self, claimed: ClaimedJob, exc: Exception) -> RunOutcome:
        free_accelerator_memory()
        error_type, message = describe_error(exc, soft_time_limit_seconds=self.settings.soft_time_limit_seconds)
        log.warning("job %s failed: %s: %s", claimed.id, error_type, message, exc_info=_unexpected(exc))
        try:
            recorded = self.store.finish_failed(claimed.id, claimed.worker_id, error_type=error_type,
                                                error_message=message)
        except Exception:
            log.exception("could not record the failure of job %s; its lease will expire", claimed.id)
            return RunOutcome.FAILED
        return RunOutcome.FAILED if recorded else RunOutcome.LOST


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
