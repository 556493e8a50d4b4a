"""`DiffgentorClient`: submit DeepGen jobs, follow them through the job table, collect the PNGs.

Configured from the `DG_*` environment (`from_env()`) or from arguments. Jobs are submitted through
`worker.submission.submit_jobs` in both modes. With a broker URL, their ids go to Redis for GPU workers;
without one (the embedded default) they run in this process through the same task code, on SQLite and
a local artifact folder under `DG_HOME` (api_client/embedded.py: the runner thread, its exit hook,
resuming unfinished jobs, the model checks).

    client = DiffgentorClient.from_env()
    job = client.submit_t2i("a red fox in snow", seed=7)  # a JobHandle (api_client/handles.py)
    images = job.result(timeout=600)  # the artifacts' metadata; raises if the job failed
    client.download(job, "out/")
"""

from __future__ import annotations

import builtins
import functools
import io
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, overload

from PIL import Image

from api_client.embedded import EmbeddedRunner, EngineCheck, check_model_runtime
from api_client.errors import (
    ConfigurationError,
    DiffgentorError,
    IdempotencyConflict,
    InputFileError,
    JobNotFound,
    JobStateError,
    MissingExtra,
    ServiceUnreachable,
    UsageError,
    WaitTimeout,
    missing_extra_message,
    path_problem,
)
from api_client.handles import JobHandle
from api_client.inputs import is_remote
from api_client.progress import JobProgress, WaitProgressBar
from schemas.enums import TERMINAL_STATUSES, JobStatus
from schemas.specs import DEFAULT_MODEL_NAME, MIN_PRIORITY, EditParams, EditSpec, GenerationParams, T2ISpec
from schemas.views import JobView
from worker.redact import redact_url, redact_urls_in
from worker.settings import Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from api_client.batches import Batch
    from worker.events import Subscription
    from worker.publish import Publisher
    from worker.storage import ArtifactStore

# One edit input: a local path, image bytes, a PIL image, or an http(s):// / s3:// URL.
ImageInput: TypeAlias = "str | os.PathLike[str] | bytes | Image.Image"
# A job given by id, by a view of it, or by the handle submit_* returned.
JobRef: TypeAlias = "str | JobView | JobHandle"

DEFAULT_POLL_SECONDS = 0.5
# Queue mode: jobs waiting this long without any progress make `wait` look for live workers of
# their model and, when there are none, say so on the progress line (with the command to start one).
NO_WORKER_NOTICE_SECONDS = 15.0
CONNECT_TIMEOUT_SECONDS = 5
BAR_REFRESH_SECONDS = 1.0  # a waiting progress bar redraws its clock (and notice) at least this often


# Kept for code that names the type: submit_many returns handles, which carry ``.job`` and ``.created``.
SubmittedJob = JobHandle


class DiffgentorClient:
    def __init__(
        self,
        settings: Settings | None = None,
        *,
        database_url: str | None = None,
        broker_url: str | None = None,
        storage_url: str | None = None,
        s3_endpoint_url: str | None = None,
        s3_public_endpoint_url: str | None = None,
        home: str | os.PathLike[str] | None = None,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        webhook_url: str | None = None,
        webhook_events: Sequence[str] | None = None,
    ) -> None:
        """Arguments override the matching `DG_*` variable; `settings` replaces the environment.

        [issue 11] ``webhook_url`` / ``webhook_events``: the webhook of every job this client submits
        whose spec names none (docs/events.md); checked at submit."""
        overrides = {
            "DG_DATABASE_URL": database_url,
            "DG_BROKER_URL": broker_url,
            "DG_STORAGE_URL": storage_url,
            "DG_S3_ENDPOINT_URL": s3_endpoint_url,
            "DG_S3_PUBLIC_ENDPOINT_URL": s3_public_endpoint_url,
            "DG_HOME": None if home is None else os.fspath(home),
        }
        if settings is None or any(value is not None for value in overrides.values()):
            base = dict(os.environ) if settings is None else {}
            base.update({key: value for key, value in overrides.items() if value is not None})
            settings = _load_settings(base) if settings is None else _replace_settings(settings, overrides)
        self.settings = settings
        self.poll_seconds = poll_seconds
        self.webhook_url = webhook_url  # [issue 11]
        self.webhook_events = list(webhook_events) if webhook_events is not None else None
        self.no_worker_notice_seconds = NO_WORKER_NOTICE_SECONDS
        self._checked_db = False
        self._detached = False
        self._engine_check = EngineCheck()  # embedded mode: DG_DEEPGEN_* and the preflight, once

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DiffgentorClient:
        return cls(_load_settings(os.environ if environ is None else environ))

    # ------------------------------------------------------------------------------------ wiring

    @property
    def embedded(self) -> bool:
        return self.settings.embedded

    @cached_property
    def _engine(self) -> Any:
        from worker.db import make_engine

        url = self.settings.database_url
        kwargs: dict[str, Any] = {}
        if url.startswith("postgresql"):
            kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_SECONDS}
        try:
            return make_engine(url, **kwargs)  # SQLite: creates the database's folder (DG_HOME)
        except ModuleNotFoundError as exc:
            if missing_extra_message(exc.name) is None:
                raise
            raise MissingExtra(exc.name) from None
        except OSError as exc:
            if exc.filename is None:
                raise
            raise InputFileError(path_problem(exc, "the job database folder")) from None

    @cached_property
    def store(self) -> Any:
        """The `worker.jobstore.JobStore` on the configured database (checked and migrated first)."""
        from worker.db import session_factory
        from worker.jobstore import JobStore

        self.check_database()
        from worker.events import events_for  # [issue 11] a cancel wakes the job's waiters

        return JobStore(
            session_factory(self._engine),
            max_attempts=self.settings.max_attempts,
            events=events_for(self.settings),
        )

    @cached_property
    def artifacts(self) -> ArtifactStore:
        """The artifact storage (S3 or a local folder), checked once on first use."""
        from worker.storage import StorageError, StorageUnavailable, open_store

        settings = self.settings
        try:
            store = open_store(
                settings.storage_url,
                endpoint_url=settings.s3_endpoint_url,
                public_endpoint_url=settings.s3_public_endpoint_url,
            )
            store.check_reachable()
        except StorageError as exc:
            raise ServiceUnreachable(
                "S3", _storage_where(settings), str(exc), transient=isinstance(exc, StorageUnavailable)
            ) from None
        return store

    @cached_property
    def _publisher(self) -> Publisher:
        """Where `submit_jobs` sends new job ids: Redis, or (embedded) this process's runner thread."""
        if self.embedded:
            return self._embedded_runner
        self.check_broker()
        from worker.celery_app import make_producer_app
        from worker.publish import CeleryPublisher

        # Built from our settings (not the process environment), so argument overrides apply.
        return CeleryPublisher(app=make_producer_app(self.settings.worker_broker_url, self.settings))

    @cached_property
    def _embedded_runner(self) -> EmbeddedRunner:
        # Reuses this client's database and storage; registers its exit hook (api_client/embedded.py).
        return EmbeddedRunner.for_client(
            self.settings, self.store, self.artifacts, engine_check=self._engine_check
        )

    def check_database_reachable(self) -> None:
        """Connect once; an unreachable database raises `ServiceUnreachable` naming the (redacted) URL."""
        import sqlalchemy as sa

        url = self.settings.database_url
        try:
            with self._engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
        except sa.exc.OperationalError as exc:
            raise ServiceUnreachable("the job database", redact_url(url), _first_line(exc)) from None

    def check_database(self) -> None:
        """Fail fast when the job database is unreachable or has no tables (embedded: create them)."""
        if self._checked_db:
            return
        from worker.db import current_revision, upgrade

        self.check_database_reachable()
        url = self.settings.database_url
        if current_revision(url) is None:
            if not self.embedded:
                raise ConfigurationError(
                    f"the job database at {redact_url(url)} has no job tables; run `diffgentor db upgrade`"
                )
            upgrade(url)
        self._checked_db = True

    def check_broker(self) -> None:
        """Fail fast when Redis does not answer (no job row is written before this passes)."""
        url = self.settings.broker_url
        if url is None or url.startswith("memory://"):
            return
        import redis

        try:
            connection = redis.Redis.from_url(
                url, socket_connect_timeout=CONNECT_TIMEOUT_SECONDS, socket_timeout=CONNECT_TIMEOUT_SECONDS
            )
            try:
                connection.ping()
            finally:
                connection.close()
        except redis.RedisError as exc:
            raise ServiceUnreachable("Redis", redact_url(url), redact_urls_in(str(exc))) from None

    def check_model_runtime(self) -> None:
        """Embedded mode runs the model in this process: fail with the extra to install when the
        model libraries (`diffgentor[deepgen]`) are missing, before any job row is written."""
        check_model_runtime()

    def check_services(self) -> None:
        """Check every service the configuration names: database, broker (if any) and storage;
        in embedded mode also that the model libraries are installed."""
        if self.embedded:
            self.check_model_runtime()
        self.check_database()
        self.check_broker()
        _ = self.artifacts

    def close(self, *, finish_embedded_jobs: bool = True) -> None:
        """Release connections. Embedded jobs still running in this process are finished first
        unless ``finish_embedded_jobs`` is False (Ctrl-C: they stay queued for a rerun; at
        interpreter exit the job then running is cancelled at its next step)."""
        runner = self.__dict__.get("_embedded_runner")
        if runner is not None and finish_embedded_jobs and not self._detached:
            runner.finish()  # also drops its exit hook: nothing is left to stop at exit
        publisher = self.__dict__.get("_publisher")
        if publisher is not None and hasattr(publisher, "close"):
            publisher.close()
        store = self.__dict__.get("store")
        if store is not None:
            store.close()  # [issue 13] pending publish confirmations first, while the engine is open
        engine = self.__dict__.get("_engine")
        if engine is not None:
            engine.dispose()

    def detach(self) -> None:
        """Do not finish embedded jobs on close (after Ctrl-C: a rerun picks them up)."""
        self._detached = True

    def __enter__(self) -> DiffgentorClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        self.close(finish_embedded_jobs=exc_type is None)

    # ------------------------------------------------------------------------------------ submit

    def t2i_spec(
        self,
        prompt: str,
        *,
        model_name: str = DEFAULT_MODEL_NAME,
        priority: int = MIN_PRIORITY,
        idempotency_key: str | None = None,
        webhook_url: str | None = None,
        webhook_events: Sequence[str] | None = None,
        **params: Any,
    ) -> T2ISpec:
        return _validated(
            lambda: T2ISpec(
                prompt=prompt,
                model_name=model_name,
                priority=priority,
                idempotency_key=idempotency_key,
                params=GenerationParams(**_without_none(params)),
                **self._webhook_fields(webhook_url, webhook_events),  # [issue 11]
            )
        )

    def edit_spec(
        self,
        instruction: str,
        images: Sequence[ImageInput],
        *,
        model_name: str = DEFAULT_MODEL_NAME,
        priority: int = MIN_PRIORITY,
        idempotency_key: str | None = None,
        webhook_url: str | None = None,
        webhook_events: Sequence[str] | None = None,
        **params: Any,
    ) -> EditSpec:
        """Build an edit spec; local images are uploaded (content-addressed) to the storage first."""
        references = [self.image_reference(image) for image in images]
        return _validated(
            lambda: EditSpec(
                instruction=instruction,
                images=references,
                model_name=model_name,
                priority=priority,
                idempotency_key=idempotency_key,
                params=EditParams(**_without_none(params)),
                **self._webhook_fields(webhook_url, webhook_events),  # [issue 11]
            )
        )

    def _webhook_fields(self, url: str | None, events: Sequence[str] | None) -> dict[str, Any]:
        """[issue 11] A spec's webhook: the one given, else this client's (none: no fields)."""
        url = url or self.webhook_url
        if url is None:
            return {}
        chosen = events if events is not None else self.webhook_events
        return {"webhook_url": url, "webhook_events": list(chosen) if chosen is not None else None}

    def check_webhook(self, url: str) -> None:
        """[issue 11] Refuse (`ConfigurationError`, exit 4, one line) a webhook this configuration could not
        send: DG_WEBHOOK_SECRET unset (webhooks are always signed), not http(s), or a host that resolves
        to a private, loopback or link-local address (unless DG_WEBHOOK_ALLOW_PRIVATE_NETWORKS)."""
        from worker.webhooks import WebhookRefused, WebhooksUnsigned, check_webhook_url

        if not self.settings.webhook_secret:
            raise ConfigurationError(str(WebhooksUnsigned("submitting a job with a webhook")))
        try:
            check_webhook_url(url, allow_private_networks=self.settings.webhook_allow_private_networks)
        except WebhookRefused as exc:
            raise ConfigurationError(str(exc)) from None

    def submit_t2i(self, prompt: str, **options: Any) -> JobHandle:
        """Submit one text-to-image job. Options: model_name, priority, idempotency_key, params."""
        return self._submit([self.t2i_spec(prompt, **options)], batch_name=None)[0]

    def submit_edit(self, instruction: str, images: Sequence[ImageInput], **options: Any) -> JobHandle:
        """Submit one edit job; images are local paths, PIL images, bytes or http(s)/s3 URLs."""
        return self._submit([self.edit_spec(instruction, images, **options)], batch_name=None)[0]

    def submit_many(
        self,
        specs: Sequence[T2ISpec | EditSpec],
        *,
        batch_name: str | None = None,
        batch_indexes: Sequence[int] | None = None,
    ) -> builtins.list[JobHandle]:
        """Insert all jobs in one transaction, then publish them in one pipelined send.

        Returns handles in input order; a spec whose idempotency key is already known returns that
        job (``created=False``) instead of a new one, and reusing a key with a different spec raises
        `IdempotencyConflict` naming the key.

        The same transaction also records a batch (`batch(...)`, `diffgentor batches`) named
        ``batch_name`` (default: the running script's file name) holding the jobs created now, at
        ``batch_indexes`` (default: their positions in ``specs``); each new job's ``batch_id``
        names it. Jobs found by idempotency key keep their own batch.
        """
        return self._submit(specs, batch_name=batch_name or _script_name(), batch_indexes=batch_indexes)

    def _submit(
        self,
        specs: Sequence[T2ISpec | EditSpec],
        *,
        batch_name: str | None,
        batch_indexes: Sequence[int] | None = None,
    ) -> builtins.list[JobHandle]:
        from worker.batches import NewBatch
        from worker.jobstore import IdempotencyConflict as KeyConflict
        from worker.submission import submit_jobs

        if not specs:
            return []
        for url in sorted({spec.webhook_url for spec in specs if spec.webhook_url}):  # [issue 11]
            self.check_webhook(url)
        batch = NewBatch(batch_name) if batch_name is not None else None
        self._check_before_submit()
        try:
            submitted = submit_jobs(
                self.store, self._publisher, list(specs), batch=batch, batch_indexes=batch_indexes
            )
        except KeyConflict as exc:
            raise IdempotencyConflict(str(exc)) from None
        except ValueError as exc:  # batch_indexes: wrong length, repeated or negative
            raise UsageError(str(exc)) from None
        # Jobs found by idempotency key (not created now) may be an interrupted earlier run's.
        self._run_unfinished_here([item.job for item in submitted if not item.created])
        return [JobHandle(self, item.job, created=bool(item.created)) for item in submitted]

    def image_reference(self, image: ImageInput) -> str:
        """One edit input -> a reference the worker can read (uploading local data when needed)."""
        if isinstance(image, str) and is_remote(image):
            return image
        if isinstance(image, Image.Image):
            if image.width * image.height > self.settings.input_max_pixels:
                raise InputFileError(
                    f"the PIL image given to submit_edit has {image.width}x{image.height} pixels, "
                    f"over DG_INPUT_MAX_PIXELS={self.settings.input_max_pixels}"
                )
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            return self._upload_input(buffer.getvalue(), "png")
        if isinstance(image, bytes | bytearray):
            data = bytes(image)
            self._check_pixels(data, "bytes given to submit_edit")
            return self._upload_input(data, _image_suffix(data, "bytes given to submit_edit"))
        if isinstance(image, str | os.PathLike):
            path = Path(image).expanduser()
            if not path.is_file():
                raise InputFileError(f"input image {path} does not exist")
            self._check_pixels(path, str(path))
            if self.embedded and self.settings.allow_local_inputs:
                return str(path.resolve())  # the in-process worker reads the producer's own files
            data = path.read_bytes()
            return self._upload_input(data, _image_suffix(data, str(path)))
        raise InputFileError(
            f"unsupported input image type {type(image).__name__}: give a path, PIL image, bytes or URL"
        )

    def _check_pixels(self, source: bytes | Path, name: str) -> None:
        """A decompression bomb is refused here, at submit, naming the image and the limit."""
        from api_client.inputs import local_image_problem

        problem = local_image_problem(source, self.settings.input_max_pixels)
        if problem is not None:
            raise InputFileError(f"input image {name}: {problem}")

    def _upload_input(self, data: bytes, suffix: str) -> str:
        from worker.storage import StorageError, content_addressed_key, file_uri_to_path

        try:
            uri = self.artifacts.put_bytes(
                content_addressed_key(data, suffix), data, content_type=f"image/{suffix}"
            )
        except StorageError as exc:
            raise ServiceUnreachable("S3", _storage_where(self.settings), str(exc)) from None
        if uri.startswith("file://"):
            return file_uri_to_path(uri)  # job specs take local paths, not file:// URIs
        return uri

    def _check_before_submit(self) -> None:
        """What must hold before any row is written (nothing half-submitted on a dead broker): the
        services answer and, in embedded mode, the model can run in this process."""
        self.check_services()
        if self.embedded:
            self._check_engine_env()

    def _check_engine_env(self) -> None:
        """Embedded mode: `DG_DEEPGEN_*` valid and the worker's preflight passed (`EngineCheck`, once
        per client and set of values)."""
        self._engine_check()

    def drive_embedded(self, jobs: Sequence[JobView]) -> None:
        """What a poll of ``jobs`` does first in embedded mode: run unfinished jobs that no process
        runs (an interrupted earlier run's) and raise when this process's runner thread stopped."""
        self._run_unfinished_here(jobs)
        runner = self.__dict__.get("_embedded_runner")
        pending = [job.id for job in jobs if not job.is_terminal]
        error = runner.error_for(pending) if pending and runner is not None else None
        if error is not None:
            raise DiffgentorError(f"the in-process job runner stopped: {error}")

    def _run_unfinished_here(self, jobs: Sequence[JobView]) -> None:
        """Embedded mode: no worker will run this table's unfinished jobs (left by an interrupted
        run), so this process's runner thread does; a job it already has is not run twice."""
        unfinished = [job for job in jobs if not job.is_terminal]
        if self.embedded and unfinished:
            self._embedded_runner.resume(unfinished)

    # ------------------------------------------------------------------------------------ query

    def resolve_job_id(self, job: JobRef) -> str:
        """A job id, or a unique prefix of one (at least 4 characters, as git takes commit ids).

        An unknown id or prefix raises `JobNotFound`; a prefix of several jobs raises `UsageError`
        listing them; a shorter one raises `UsageError`.
        """
        from api_client.refs import resolve_prefix

        if isinstance(job, JobView | JobHandle):
            return job.id
        return resolve_prefix(
            str(job),
            noun="job",
            listing="diffgentor list",
            lookup=lambda prefix, limit: self._store_call(
                lambda: self.store.resolve_prefix(prefix, limit=limit)
            ),
            not_found=JobNotFound,
        )

    def get(self, job: JobRef) -> JobView:
        job_id = self.resolve_job_id(job)
        return self._store_call(lambda: self.store.get(job_id))

    def get_many(self, jobs: Sequence[JobRef]) -> list[JobView]:
        ids = [self.resolve_job_id(job) for job in jobs]
        return list(self._store_call(lambda: self.store.get_many(ids)))

    def list(
        self,
        *,
        status: JobStatus | str | Iterable[JobStatus | str] | None = None,
        model_name: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> builtins.list[JobView]:
        """Jobs newest first, filtered by status, model and creation time; page with limit/offset.

        A naive ``created_after`` / ``created_before`` is taken as UTC (the table stores UTC).
        """
        statuses = _statuses(status)
        try:
            jobs = self.store.list(
                status=statuses,
                model_name=model_name,
                created_after=_as_utc(created_after),
                created_before=_as_utc(created_before),
                limit=limit,
                offset=offset,
            )
        except ValueError as exc:  # limit/offset out of range
            raise UsageError(str(exc)) from None
        return list(jobs)

    def cancel(self, job: JobRef) -> JobView:
        """Cancel: a queued job never starts; a running one stops at its next step.

        A job that already succeeded or failed raises `JobStateError` (exit 8, as `retry` of a
        job that cannot be retried); cancelling a cancelled job again returns it unchanged.
        """
        job_id = self.resolve_job_id(job)
        view = self.get(job_id)
        if view.status != JobStatus.CANCELLED:
            _refuse_finished(view)
            view = self._store_call(lambda: self.store.cancel(job_id))
            _refuse_finished(view)  # it finished before the cancel arrived
        return view

    def retry(self, job: JobRef) -> JobView:
        """A failed or cancelled job -> a new queued job linked to it (``retry_of``), published now.

        Idempotent: while an earlier retry of the same job (followed to the end of its chain) is
        queued, running or succeeded, that job is returned instead of a new one.
        """
        from worker.submission import retry_job

        job_id = self.resolve_job_id(job)
        self.get(job_id)
        self._check_before_submit()
        retried: JobView = self._store_call(lambda: retry_job(self.store, self._publisher, job_id))
        self._run_unfinished_here([retried])  # a live retry made by an interrupted earlier run
        return retried

    def _store_call(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except LookupError as exc:
            raise JobNotFound(str(getattr(exc, "job_id", exc))) from None
        except ValueError as exc:
            raise JobStateError(str(exc)) from None

    # ------------------------------------------------------------------------------------ wait

    @overload
    def wait(  # type: ignore[overload-overlap]  # a str is a Sequence too; one job in -> one view out wins
        self,
        jobs: JobRef,
        *,
        timeout: float | None = ...,
        progress: bool = ...,
        on_update: Callable[[builtins.list[JobView]], None] | None = ...,
    ) -> JobView: ...

    @overload
    def wait(
        self,
        jobs: Sequence[JobRef],
        *,
        timeout: float | None = ...,
        progress: bool = ...,
        on_update: Callable[[builtins.list[JobView]], None] | None = ...,
    ) -> builtins.list[JobView]: ...

    def wait(
        self,
        jobs: JobRef | Sequence[JobRef],
        *,
        timeout: float | None = None,
        progress: bool = False,
        on_update: Callable[[builtins.list[JobView]], None] | None = None,
    ) -> Any:
        """Wait until every job is finished; returns the final view(s) (one job in, one view out).

        Raises `WaitTimeout` (naming the unfinished jobs) when ``timeout`` seconds pass first.

        [issue 11] Subscribed to the jobs' events before the first read: an event wakes it and the
        jobs it names are read again at once (progress at most every ``poll_seconds``); every job is
        read again every DG_EVENTS_FALLBACK_SECONDS regardless, so a lost event only delays. Without
        events (DG_EVENTS=0, Redis down) it polls every ``poll_seconds`` as before (docs/events.md).
        """
        from worker.events import ReadPacer

        if isinstance(jobs, str | JobView | JobHandle):
            single, ids = True, [self.resolve_job_id(jobs)]
        else:
            single, ids = False, [self.resolve_job_id(job) for job in jobs]
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = WaitProgressBar(len(ids)) if progress else None
        stall = _StallWatch(self) if bar is not None and not self.embedded else None
        subscription = self._subscribe(job_ids=ids)  # before the first read: no event falls between
        pacer = ReadPacer(
            subscription,
            poll_seconds=self.poll_seconds,
            fallback_seconds=self.events_fallback_seconds,
            cost_factor=1.0,  # reads by id are cheap: an ending job is read right after the one that started
        )
        try:
            views = dict(zip(ids, self.get_many(ids), strict=True))
            self._run_unfinished_here(list(views.values()))
            while True:
                current = [views[job_id] for job_id in ids]
                if bar is not None:
                    bar.update(
                        [_progress_of(view) for view in current],
                        notice=stall.notice(current) if stall is not None else None,
                    )
                if on_update is not None:
                    on_update(current)
                pending = [view.id for view in current if not view.is_terminal]
                self.drive_embedded([view for view in current if not view.is_terminal])
                if not pending:
                    return current[0] if single else current
                # A progress bar wakes at least every BAR_REFRESH_SECONDS for its clock and the
                # no-live-worker notice (no read of the jobs: events or the fallback bring those).
                wake = deadline if bar is None else _sooner(deadline, time.monotonic() + BAR_REFRESH_SECONDS)
                reread = pacer.next(wake)
                if reread is None:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise WaitTimeout(pending, timeout or 0.0)
                    continue
                ask = pending if reread.full else [job_id for job_id in pending if job_id in reread.job_ids]
                started = time.monotonic()
                if ask:
                    views.update(zip(ask, self.get_many(ask), strict=True))
                pacer.done(reread, time.monotonic() - started)
        finally:
            subscription.close()
            if bar is not None:
                bar.close()

    @property
    def events_fallback_seconds(self) -> float:
        """[issue 11] How often a waiter reads everything while events arrive: DG_EVENTS_FALLBACK_SECONDS
        in queue mode; the poll interval in embedded mode (the local SQLite read is cheap, and an
        in-process runner that stopped emits nothing)."""
        return self.poll_seconds if self.embedded else self.settings.events_fallback_seconds

    def _subscribe(self, *, job_ids: Sequence[str] = (), batch_ids: Sequence[str] = ()) -> Subscription:
        """[issue 11] The events of these jobs and batches (Redis in queue mode, this process's hub
        when embedded, `Polling` when DG_EVENTS=0 or Redis does not answer)."""
        from worker.events import subscribe

        return subscribe(self.settings, job_ids=job_ids, batch_ids=batch_ids)

    # ---- batches ---------------------------------------------------------------------------

    def batches(self, *, limit: int = 50, offset: int = 0, owner: str | None = None) -> builtins.list[Batch]:
        """Batch records newest first (one owner's with ``owner``); page with limit/offset."""
        from api_client.batches import list_batches

        return list_batches(self, limit=limit, offset=offset, owner=owner)

    def batch(self, batch_id_or_prefix: str) -> Batch:
        """A batch by id or unique prefix (at least 4 characters): `BatchNotFound` (exit 6) when
        unknown, `UsageError` (exit 2) when ambiguous or too short."""
        from api_client.batches import open_batch

        return open_batch(self, batch_id_or_prefix)

    # ------------------------------------------------------------------------------------ results

    def artifact_uris(self, job: JobRef) -> builtins.list[str]:
        """The job's PNG URIs in index order; a job that did not succeed raises `JobStateError`."""
        view = job if isinstance(job, JobView) and job.is_terminal else self.get(job)
        _refuse_unsucceeded(view)
        return [artifact.uri for artifact in sorted(view.artifacts, key=lambda a: a.index)]

    def presigned_urls(self, job: JobRef, expires_seconds: int = 3600) -> builtins.list[str]:
        return [self.artifacts.presigned_url(uri, expires_seconds) for uri in self.artifact_uris(job)]

    def download(
        self, job: JobRef, folder: str | os.PathLike[str], name: str | None = None
    ) -> builtins.list[Path]:
        """Copy a job's PNGs into ``folder`` as ``<job_id>-<index>.png`` (or ``name`` for one image)."""
        view = self.get(job)
        _refuse_unsucceeded(view)
        target = Path(folder)
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputFileError(path_problem(exc, "the download folder")) from None
        paths = []
        for artifact in sorted(view.artifacts, key=lambda a: a.index):
            file_name = name if name and len(view.artifacts) == 1 else f"{view.id}-{artifact.index}.png"
            path = target / file_name
            # Written whole, with the umask's mode (worker.files.atomic_file).
            self._storage_call(functools.partial(self.artifacts.download, artifact.uri, path))
            paths.append(path)
        return paths

    def open_images(self, job: JobRef) -> builtins.list[Image.Image]:
        images: builtins.list[Image.Image] = []
        for uri in self.artifact_uris(job):
            data = self._storage_call(functools.partial(self.artifacts.get_bytes, uri))
            image = Image.open(io.BytesIO(data))
            image.load()
            images.append(image)
        return images

    def _storage_call(self, call: Callable[[], Any]) -> Any:
        from worker.storage import StorageError

        try:
            return call()
        except StorageError as exc:
            raise DiffgentorError(str(exc)) from None


class _StallWatch:
    """While queued jobs make no progress for `no_worker_notice_seconds`, look (every as often) for
    live workers of their models; the notice names the models with none and how to start one."""

    def __init__(self, client: DiffgentorClient) -> None:
        self._client = client
        self._state: tuple[Any, ...] | None = None
        self._since = time.monotonic()
        self._next_check = 0.0
        self._notice: str | None = None

    def notice(self, views: Sequence[JobView]) -> str | None:
        now = time.monotonic()
        state = tuple((view.status, view.progress_step) for view in views)
        if state != self._state:  # something moved: a worker is on it
            self._state, self._since, self._notice = state, now, None
            return None
        after = self._client.no_worker_notice_seconds
        if now - self._since >= after and now >= self._next_check:
            self._next_check = now + after
            self._notice = self._no_live_worker(views, now - self._since)
        return self._notice

    def _no_live_worker(self, views: Sequence[JobView], idle_seconds: float) -> str | None:
        models = sorted({view.model_name for view in views if view.status == JobStatus.QUEUED})
        if not models:
            return None
        try:
            from schemas.tables import utcnow
            from worker.db import session_factory
            from worker.registry import WorkerRegistry, stale_after

            registry = WorkerRegistry(session_factory(self._client._engine))
            fresh = stale_after(self._client.settings.heartbeat_seconds)
            now = utcnow()
            idle = [
                model
                for model in models
                if not any(
                    (now - worker.heartbeat_at).total_seconds() <= fresh
                    for worker in registry.list(model_name=model)
                )
            ]
        except Exception:  # only a hint: never let it break the wait
            return None
        if not idle:
            return None
        start = "; ".join(f"`diffgentor worker --model_name {model}`" for model in idle)
        names = ", ".join(repr(model) for model in idle)
        return f"no live worker for model {names} for {idle_seconds:.0f}s: start one with {start}"


# ---------------------------------------------------------------------------------------- helpers


def _load_settings(environ: Mapping[str, str]) -> Settings:
    try:
        return load_settings(environ)
    except SettingsError as exc:
        raise ConfigurationError(str(exc)) from None


def _replace_settings(settings: Settings, overrides: Mapping[str, str | None]) -> Settings:
    from dataclasses import replace

    names = {
        "DG_DATABASE_URL": "database_url",
        "DG_BROKER_URL": "broker_url",
        "DG_STORAGE_URL": "storage_url",
        "DG_S3_ENDPOINT_URL": "s3_endpoint_url",
        "DG_S3_PUBLIC_ENDPOINT_URL": "s3_public_endpoint_url",
    }
    changes: dict[str, Any] = {
        names[key]: value for key, value in overrides.items() if value and key in names
    }
    if overrides.get("DG_HOME"):
        changes["home"] = Path(str(overrides["DG_HOME"])).expanduser()
    return replace(settings, **changes)


def _validated(build: Callable[[], Any]) -> Any:
    from pydantic import ValidationError

    try:
        return build()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'spec'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ConfigurationError(f"invalid job parameters: {problems}") from None


def _without_none(params: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in params.items() if value is not None}


def _refuse_finished(view: JobView) -> None:
    if view.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        again = "; `diffgentor retry` runs it again" if view.status == JobStatus.FAILED else ""
        raise JobStateError(f"job {view.id} already {view.status.value}: there is nothing to cancel{again}")


def _sooner(deadline: float | None, moment: float) -> float:
    return moment if deadline is None else min(deadline, moment)


def _script_name() -> str:
    """A batch's default name: the script submitting it (``eval.py``), or ``python``."""
    import sys

    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] not in ("", "-c", "-") else ""
    return name or "python"


def _refuse_unsucceeded(view: JobView) -> None:
    if view.status != JobStatus.SUCCEEDED:
        reason = f" ({view.error_type}: {view.error_message})" if view.error_type else ""
        raise JobStateError(f"job {view.id} is {view.status.value}, not succeeded; it has no images{reason}")


def _statuses(status: Any) -> builtins.list[JobStatus] | None:
    if status is None:
        return None
    items = [status] if isinstance(status, str | JobStatus) else list(status)
    try:
        return [JobStatus(item) for item in items]
    except ValueError:
        choices = ", ".join(s.value for s in JobStatus)
        raise ConfigurationError(f"unknown job status in {items}; use one of {choices}") from None


def _progress_of(view: JobView) -> JobProgress:
    running = view.status == JobStatus.RUNNING and view.progress_total > 0
    return JobProgress(
        job_id=view.id,
        finished=view.status in TERMINAL_STATUSES,
        step=view.progress_step if running else None,
        total=view.progress_total if running else None,
    )


def _image_suffix(data: bytes, what: str) -> str:
    from PIL import UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = (image.format or "").lower()
    except (UnidentifiedImageError, OSError):
        raise InputFileError(f"{what} is not a readable image") from None
    return {"jpeg": "jpg"}.get(image_format, image_format or "png")


def _as_utc(moment: datetime | None) -> datetime | None:
    # The UTC column type refuses naive values (a raw StatementError); the job table is in UTC.
    return moment.replace(tzinfo=timezone.utc) if moment is not None and moment.tzinfo is None else moment


def _first_line(exc: Any) -> str:
    original = getattr(exc, "orig", None) or exc
    lines = str(original).strip().splitlines()
    return redact_urls_in(lines[0] if lines else type(original).__name__)


def _storage_where(settings: Settings) -> str:
    endpoint = settings.s3_endpoint_url
    where = redact_url(settings.storage_url)
    return f"{where} (endpoint {redact_url(endpoint)})" if endpoint else where
