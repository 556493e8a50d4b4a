"""The dashboard's Starlette app: pages, live-update endpoints, images, actions and error pages.

Pages render on the server (Jinja2, autoescaped); `static/dashboard.js` polls two small JSON
endpoints to move progress bars, counts, badges and thumbnails without a reload. Database
and storage calls are synchronous, so every page endpoint is a plain function that Starlette
runs in its thread pool. Any error becomes a page (or JSON, or a placeholder image) with its
HTTP status; the traceback of an unexpected one goes to the log, never to the browser.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from api_client.dashboard import present
from api_client.dashboard.config import DashboardConfig
from api_client.dashboard.images import ImageProblem, Images, placeholder_svg
from api_client.dashboard.queries import (
    batch_jobs_page,
    batch_views,
    broker_depths,
    jobs_by_id,
    model_queues,
)
from api_client.dashboard.security import (
    COOKIE,
    SESSION_SECONDS,
    AuthMiddleware,
    Guard,
    HeadersMiddleware,
    origin_matches,
    safe_next,
)
from schemas.enums import TERMINAL_STATUSES, JobStatus
from schemas.views import JobView
from worker.batches import BatchNotFound, BatchStore
from worker.jobstore import InvalidTransition, JobNotFound, JobStore
from worker.redact import redact_url, redact_urls_in
from worker.registry import WorkerRegistry
from worker.settings import Settings
from worker.storage import ArtifactStore, StorageError, StorageUnavailable

log = logging.getLogger("diffgentor.dashboard")

PACKAGE = Path(__file__).resolve().parent
MAX_LIVE_IDS = 1000  # ids one live-update request may ask about
MAX_FORM_BYTES = 16 * 1024
STATUSES = [status.value for status in JobStatus]
IMAGE_PREFIXES = ("/image/", "/thumb/", "/input/")
IMMUTABLE = "private, max-age=86400"  # artifact URLs carry their content hash (?v=)

NOTICES = {
    "cancelled": "Job cancelled.",
    "stopping": "The job is running: its worker stops it at the next denoising step.",
    "already-cancelled": "The job was already cancelled.",
    "retried": "Retry queued: this is the new job.",
    "retry-existing": "A retry of this job was already queued, running or done: this is that job.",
    "retry-unpublished": (
        "Retry created but not sent to a worker: embedded mode runs it when `diffgentor wait JOB` "
        "or `diffgentor sweep` runs; in queue mode the sweeper publishes it."
    ),
    "batch-cancelled": "Batch cancelled: {a} queued job(s) cancelled, {b} running job(s) stop at their next step.",
    "batch-retried": "{a} failed or cancelled row(s) retried as new jobs.",
    "batch-retried-unpublished": (
        "{a} row(s) retried; the new jobs wait for `diffgentor wait` / `diffgentor sweep` (embedded mode) "
        "or the sweeper (queue mode) to be sent to a worker."
    ),
    "batch-nothing": "Nothing to retry: no row of this batch failed or was cancelled.",
    "batch-retry-unsent": (
        "Failed and cancelled rows retried, but sending the new jobs to the workers failed: the "
        "sweeper publishes them."
    ),
}


class PageError(Exception):
    """A request that cannot be served: the status, a title and a sentence that says why."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


@dataclass
class Services:
    """What the pages read from: the same stores as every other command, on the same settings."""

    settings: Settings
    store: JobStore
    artifacts: ArtifactStore
    batches: BatchStore = field(init=False)
    registry: WorkerRegistry = field(init=False)
    publisher_factory: Callable[[], Any] | None = None  # queue mode: sends retries to the workers
    _publisher: Any = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.batches = BatchStore(self.store)
        self.registry = WorkerRegistry(self.store.sessions)

    @classmethod
    def from_client(cls, client: Any) -> Services:
        """From a `DiffgentorClient` (checked database and storage; queue mode: its broker)."""
        settings: Settings = client.settings
        factory = None
        if not settings.embedded:

            def factory() -> Any:
                from worker.celery_app import make_producer_app
                from worker.publish import CeleryPublisher

                return CeleryPublisher(app=make_producer_app(settings.worker_broker_url, settings))

        return cls(settings, client.store, client.artifacts, publisher_factory=factory)

    def publisher(self) -> Any:
        """The queue publisher (None in embedded mode: the dashboard never runs the model)."""
        if self.publisher_factory is None:
            return None
        with self._lock:
            if self._publisher is None:
                self._publisher = self.publisher_factory()
            return self._publisher

    def close(self) -> None:
        if self._publisher is not None and hasattr(self._publisher, "close"):
            self._publisher.close()


# ---------------------------------------------------------------------------------- parameters


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise PageError(
            400, "Bad query parameter", f"{name} must be a whole number from {low} to {high}, got {raw!r}"
        )
    return value


def _status_param(request: Request) -> JobStatus | None:
    raw = request.query_params.get("status")
    if raw is None or raw in ("", "all"):
        return None
    if raw not in STATUSES:
        raise PageError(
            400, "Bad query parameter", f"status must be one of all, {', '.join(STATUSES)}; got {raw!r}"
        )
    return JobStatus(raw)


def _uuid_or_none(text: str) -> str | None:
    try:
        value = str(uuid.UUID(text))
    except ValueError:
        return None
    return value if value == text.lower() else None


def _ids_param(request: Request) -> list[str]:
    raw = request.query_params.get("ids", "")
    ids = [part for part in raw.split(",") if part]
    if len(ids) > MAX_LIVE_IDS:
        raise PageError(400, "Too many ids", f"at most {MAX_LIVE_IDS} ids per request, got {len(ids)}")
    checked = [_uuid_or_none(part) for part in ids]
    if any(value is None for value in checked):
        bad = next(part for part, value in zip(ids, checked, strict=True) if value is None)
        raise PageError(400, "Bad query parameter", f"ids must be comma-separated ids, got {bad[:80]!r}")
    return [value for value in checked if value is not None]


def _notice(request: Request) -> str | None:
    code = request.query_params.get("notice")
    message = NOTICES.get(code or "")
    if message is None:
        return None
    numbers = {key: _small_int(request.query_params.get(key)) for key in ("a", "b")}
    return message.format(**numbers)


def _small_int(raw: str | None) -> int:
    try:
        return max(0, min(10**9, int(raw or 0)))
    except ValueError:
        return 0


# ------------------------------------------------------------------------------------- the app


def create_app(config: DashboardConfig, services: Services) -> Starlette:
    """The dashboard for `config` over `services` (no socket: `command.serve` runs it with uvicorn)."""
    guard = Guard(config)
    templates = jinja2.Environment(
        loader=jinja2.FileSystemLoader(PACKAGE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    templates.filters.update(
        when=present.when,
        text=present.text,
        ref=present.ref,
        duration=present.duration,
    )
    templates.globals.update(between=present.between, bar_svg=present.bar_svg)
    images = Images(
        services.store,
        services.artifacts,
        services.settings,
        max_bytes=config.image_max_bytes,
        cache_bytes=config.thumbnail_cache_bytes,
    )
    settings = services.settings
    footer = {
        "mode": "embedded (SQLite and local files)" if settings.embedded else "queue (Redis workers)",
        "database": redact_url(settings.database_url),
        "storage": redact_url(settings.storage_url),
    }

    def render(request: Request, name: str, http_status: int = 200, **context: Any) -> HTMLResponse:
        nonce = request.scope.get("dg.session")
        page = templates.get_template(name).render(
            request_path=request.url.path,
            config=config,
            login_required=guard.enabled,
            logged_in=request.scope.get("dg.auth") is not None,
            actions=config.allow_actions and request.scope.get("dg.auth") is not None,
            csrf=guard.csrf_token(nonce),
            poll_ms=int(config.poll_seconds * 1000),
            footer=footer,
            notice=_notice(request),
            **context,
        )
        return HTMLResponse(page, status_code=http_status, headers={"Cache-Control": "no-store"})

    # ---- pages ---------------------------------------------------------------------------

    def home(request: Request) -> Response:
        return RedirectResponse("/batches", status_code=303)

    def batches_page(request: Request) -> Response:
        page = _int_param(request, "page", 1, 1, 1_000_000)
        per_page = _int_param(request, "per_page", 50, 1, 1000)
        owner = request.query_params.get("owner") or None
        if owner is not None and len(owner) > 255:
            raise PageError(400, "Bad query parameter", "owner is at most 255 characters")
        views = services.batches.list(limit=per_page, offset=(page - 1) * per_page, owner=owner)
        rows = [
            {
                "batch": progress.batch,
                "owner_link": "/batches?owner=" + quote(progress.batch.owner, safe=""),
                "created": present.when(progress.batch.created_at),
                **present.batch_summary(progress),
            }
            for progress in services.batches.progress_many(views)
        ]
        return render(
            request,
            "batches.html",
            rows=rows,
            rows_html=present.batch_rows_html(rows),
            page=page,
            per_page=per_page,
            owner=owner,
            has_next=len(views) == per_page,
            query=lambda **changes: _query(request, changes),
        )

    def batch_page(request: Request) -> Response:
        batch = _batch_or_redirect(request, request.path_params["batch_id"])
        if isinstance(batch, Response):
            return batch
        status = _status_param(request)
        page = _int_param(request, "page", 1, 1, 10_000_000)
        per_page = _int_param(request, "per_page", 100, 1, 500)
        progress = services.batches.progress(batch)
        summary = present.batch_summary(progress)
        counts = summary["counts"]
        total = summary["total"] if status is None else counts[status.value]
        pages = max(1, math.ceil(total / per_page))
        offset = (page - 1) * per_page
        jobs = (
            batch_jobs_page(
                services.store,
                batch.id,
                statuses=None if status is None else [status],
                offset=offset,
                limit=per_page,
            )
            if offset < total
            else []
        )
        return render(
            request,
            "batch.html",
            batch=batch,
            summary=summary,
            status=status.value if status else "all",
            filters=[("all", summary["total"]), *counts.items()],
            page=page,
            pages=pages,
            per_page=per_page,
            tiles=[_tile(job) for job in jobs],
            query=lambda **changes: _query(request, changes),
        )

    def jobs_page(request: Request) -> Response:
        status = _status_param(request)
        page = _int_param(request, "page", 1, 1, 1_000_000)
        per_page = _int_param(request, "per_page", 50, 1, 500)
        jobs = services.store.list(status=status, limit=per_page, offset=(page - 1) * per_page)
        return render(
            request,
            "jobs.html",
            jobs=[_tile(job) for job in jobs],
            status=status.value if status else "all",
            statuses=["all", *STATUSES],
            page=page,
            has_next=len(jobs) == per_page,
            query=lambda **changes: _query(request, changes),
        )

    def job_page(request: Request) -> Response:
        job = _job_or_redirect(request, request.path_params["job_id"])
        if isinstance(job, Response):
            return job
        batch = None
        if job.batch_id is not None:
            try:
                batch = services.batches.get(job.batch_id)
            except BatchNotFound:
                batch = None
        spec = job.spec
        params = dict(spec.get("params") or {})
        refs = list(spec.get("images") or [])
        return render(
            request,
            "job.html",
            job=job,
            tile=_tile(job),
            batch=batch,
            prompt=present.prompt_of(job),
            negative_prompt=params.get("negative_prompt"),
            params=sorted(params.items()),
            request_fields=sorted(
                (key, value)
                for key, value in spec.items()
                if key not in ("params", "images", "prompt", "instruction")
            ),
            inputs=[(number, present.ref(str(ref))) for number, ref in enumerate(refs)],
            images=[
                {"artifact": artifact, "version": artifact.sha256[:16], "uri": redact_url(artifact.uri)}
                for artifact in job.artifacts
            ],
            provenance=sorted((job.provenance or {}).items()),
            terminal=job.status in TERMINAL_STATUSES,
            can_cancel=job.status in (JobStatus.QUEUED, JobStatus.RUNNING) and not job.cancel_requested,
            can_retry=job.status in (JobStatus.FAILED, JobStatus.CANCELLED),
        )

    def workers_page(request: Request) -> Response:
        from worker import health
        from worker.registry import MIN_STALE_SECONDS

        stale = max(MIN_STALE_SECONDS, 3 * settings.heartbeat_seconds)
        report = health.report(
            services.registry, stale_seconds=stale, stuck_seconds=health.DEFAULT_STUCK_SECONDS
        )
        current = jobs_by_id(
            services.store, [r.worker.current_job_id for r in report.workers if r.worker.current_job_id]
        )
        queues = model_queues(services.store)
        models = sorted({*queues, *(r.worker.model_name for r in report.workers)})
        depths = None
        if settings.broker_url is not None:
            depths = broker_depths(settings.broker_url, models)
        return render(
            request,
            "workers.html",
            workers=[
                {
                    "health": r,
                    "label": _WORKER_LABELS.get(r.state, r.state),
                    "job": current.get(r.worker.current_job_id or ""),
                }
                for r in report.workers
            ],
            sweepers=report.sweepers,
            models=[
                {
                    "name": model,
                    "queued": queues[model].queued if model in queues else 0,
                    "running": queues[model].running if model in queues else 0,
                    "workers": sum(1 for r in report.workers if r.worker.model_name == model),
                    "alive": sum(
                        1
                        for r in report.workers
                        if r.worker.model_name == model and r.state in ("ok", "busy")
                    ),
                    "broker": None if depths is None else depths.get(model),
                }
                for model in models
            ],
            broker="none (embedded mode)" if settings.broker_url is None else redact_url(settings.broker_url),
            broker_down=settings.broker_url is not None and depths is None,
            stale_seconds=stale,
        )

    # ---- live updates --------------------------------------------------------------------

    def api_jobs(request: Request) -> Response:
        found = jobs_by_id(services.store, _ids_param(request))
        return JSONResponse({"jobs": {job_id: _job_json(job) for job_id, job in found.items()}})

    def api_batches(request: Request) -> Response:
        views = batch_views(services.store, _ids_param(request))
        progress = services.batches.progress_many(list(views.values()))
        return JSONResponse({"batches": {p.batch.id: present.progress_json(p) for p in progress}})

    def healthz(request: Request) -> Response:
        return Response("ok\n", media_type="text/plain")

    # ---- images --------------------------------------------------------------------------

    def _image_response(request: Request, load: Callable[[], Any]) -> Response:
        try:
            item = load()
        except ImageProblem as problem:
            if _wants_html(request):
                raise PageError(problem.status, "Image not available", problem.message) from None
            return Response(
                placeholder_svg(problem.status),
                status_code=problem.status,
                media_type="image/svg+xml",
                headers={"Cache-Control": "no-store"},
            )
        return Response(item.data, media_type=item.content_type, headers={"Cache-Control": IMMUTABLE})

    def image(request: Request) -> Response:
        job_id, index = _image_target(request)
        return _image_response(request, lambda: images.full(job_id, index))

    def thumbnail(request: Request) -> Response:
        job_id, index = _image_target(request)
        return _image_response(request, lambda: images.thumbnail(job_id, index))

    def input_image(request: Request) -> Response:
        job_id, index = _image_target(request)
        return _image_response(request, lambda: images.input_preview(job_id, index))

    # ---- login ---------------------------------------------------------------------------

    def login_page(request: Request) -> Response:
        if not guard.enabled:
            return RedirectResponse("/", status_code=303)
        return render(request, "login.html", next=safe_next(request.query_params.get("next")), failed=False)

    async def login(request: Request) -> Response:
        if not guard.enabled:
            return RedirectResponse("/", status_code=303)
        form = await _form(request)
        target = safe_next(form.get("next"))
        if not guard.token_matches(form.get("token")):
            await asyncio.sleep(0.5)  # a guess costs half a second
            return render(request, "login.html", http_status=401, next=target, failed=True)
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            COOKIE,
            guard.new_session(),
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    def logout(request: Request) -> Response:
        response = RedirectResponse("/login" if guard.enabled else "/", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # ---- actions -------------------------------------------------------------------------

    def _authorize_action(request: Request, form: Mapping[str, str]) -> None:
        if not config.allow_actions:
            raise PageError(
                403,
                "Read-only dashboard",
                "this dashboard was started without --allow-actions: it shows jobs but cannot change them",
            )
        auth = request.scope.get("dg.auth")
        if auth == "bearer":
            return  # a header a browser never adds by itself: no cross-site request can carry it
        if auth != "cookie":
            raise PageError(401, "Login required", "log in with the dashboard's token to cancel or retry")
        if not origin_matches(request.headers.get("origin"), request.headers.get("host")):
            raise PageError(403, "Request refused", "the request came from another site (Origin header)")
        expected = guard.csrf_token(request.scope.get("dg.session"))
        if not expected or not hmac.compare_digest(form.get("csrf", "").encode(), expected.encode()):
            raise PageError(
                403, "Request refused", "the form's CSRF token is missing or wrong; reload the page"
            )

    async def job_action(request: Request) -> Response:
        form = await _form(request)
        return await run_in_threadpool(_job_action, request, form)

    def _job_action(request: Request, form: Mapping[str, str]) -> Response:
        _authorize_action(request, form)
        job_id = _uuid_or_none(request.path_params["job_id"])
        if job_id is None:
            raise PageError(404, "Unknown job", f"no job with id {request.path_params['job_id'][:80]!r}")
        job = _get_job(job_id)
        action = request.path_params["action"]
        if action == "cancel":
            if job.status == JobStatus.CANCELLED:
                return _back(f"/jobs/{job_id}", "already-cancelled")
            if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
                raise PageError(409, "Cannot cancel", f"job {job_id} already {job.status.value}")
            after = services.store.cancel(job_id)
            if after.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
                raise PageError(409, "Cannot cancel", f"job {job_id} {after.status.value} before the cancel")
            return _back(
                f"/jobs/{job_id}", "cancelled" if after.status == JobStatus.CANCELLED else "stopping"
            )
        if action == "retry":
            if job.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
                raise PageError(
                    409,
                    "Cannot retry",
                    f"job {job_id} is {job.status.value}; only failed or cancelled jobs retry",
                )
            new, notice = _retry_job(job_id)
            return _back(f"/jobs/{new.id}", notice)
        raise PageError(404, "Unknown action", f"jobs can be cancelled or retried, not {action[:40]!r}")

    def _retry_job(job_id: str) -> tuple[JobView, str]:
        from worker.submission import retry_job

        publisher = services.publisher()
        try:
            if publisher is None:
                item = services.store.retry_or_existing(job_id)
                return item.job, "retry-unpublished" if item.created else "retry-existing"
            view = retry_job(services.store, publisher, job_id)
        except InvalidTransition as exc:
            raise PageError(409, "Cannot retry", str(exc)) from None
        except (JobNotFound, PageError):
            raise
        except Exception as exc:  # the publish failed after the commit: the row is there, unpublished
            log.warning("retry of job %s: publishing failed (%s); the sweeper publishes it", job_id, exc)
            return services.store.retry_or_existing(job_id).job, "retry-unpublished"
        return view, "retried" if view.retry_of == job_id else "retry-existing"

    async def batch_action(request: Request) -> Response:
        form = await _form(request)
        return await run_in_threadpool(_batch_action, request, form)

    def _batch_action(request: Request, form: Mapping[str, str]) -> Response:
        _authorize_action(request, form)
        batch_id = _uuid_or_none(request.path_params["batch_id"])
        if batch_id is None:
            raise PageError(
                404, "Unknown batch", f"no batch with id {request.path_params['batch_id'][:80]!r}"
            )
        batch = _get_batch(batch_id)
        action = request.path_params["action"]
        if action == "cancel":
            outcome = services.batches.cancel(batch.id)
            return _back(f"/batches/{batch.id}", "batch-cancelled", a=outcome.cancelled, b=outcome.stopping)
        if action == "retry":
            made = _retry_batch(batch.id)
            if made is None:
                return _back(f"/batches/{batch.id}", "batch-nothing")
            count, published = made
            if count < 0:
                return _back(f"/batches/{batch.id}", "batch-retry-unsent")
            return _back(
                f"/batches/{batch.id}", "batch-retried" if published else "batch-retried-unpublished", a=count
            )
        raise PageError(404, "Unknown action", f"batches can be cancelled or retried, not {action[:40]!r}")

    def _retry_batch(batch_id: str) -> tuple[int, bool] | None:
        from worker.submission import retry_failed_batch

        publisher = services.publisher()
        if publisher is None:
            count, after = 0, None
            while True:
                page = services.batches.retry_failed_page(batch_id, after=after)
                if not page:
                    break
                count += len(page)
                after = page[-1].batch_index
            return (count, False) if count else None
        try:
            made = retry_failed_batch(services.store, publisher, batch_id)
        except Exception as exc:  # a page was committed, its publish failed: the sweeper sends it
            log.warning("retry of batch %s: publishing failed (%s); the sweeper publishes", batch_id, exc)
            return (-1, False)
        return (len(made), True) if made else None

    # ---- helpers -------------------------------------------------------------------------

    def _get_job(job_id: str) -> JobView:
        try:
            return services.store.get(job_id)
        except JobNotFound:
            raise PageError(404, "Unknown job", f"no job with id {job_id}") from None

    def _get_batch(batch_id: str) -> Any:
        try:
            return services.batches.get(batch_id)
        except BatchNotFound:
            raise PageError(404, "Unknown batch", f"no batch with id {batch_id}") from None

    def _job_or_redirect(request: Request, text: str) -> JobView | Response:
        job_id = _uuid_or_none(text)
        if job_id is not None:
            if job_id != text:
                return RedirectResponse(f"/jobs/{job_id}", status_code=303)
            return _get_job(job_id)
        matches = services.store.resolve_prefix(text, limit=6) if len(text) >= 4 else []
        if len(matches) == 1:
            return RedirectResponse(f"/jobs/{matches[0]}", status_code=303)
        if len(matches) > 1:
            raise PageError(
                400,
                "Ambiguous job id",
                f"{text!r} is the start of {len(matches)} or more job ids; give more of it",
            )
        raise PageError(404, "Unknown job", f"no job with id {text[:80]!r}")

    def _batch_or_redirect(request: Request, text: str) -> Any:
        batch_id = _uuid_or_none(text)
        if batch_id is not None:
            if batch_id != text:
                return RedirectResponse(f"/batches/{batch_id}", status_code=303)
            return _get_batch(batch_id)
        matches = services.batches.resolve_prefix(text, limit=6) if len(text) >= 4 else []
        if len(matches) == 1:
            target = f"/batches/{matches[0]}"
            if request.url.query:
                target += f"?{request.url.query}"
            return RedirectResponse(target, status_code=303)
        if len(matches) > 1:
            raise PageError(
                400,
                "Ambiguous batch id",
                f"{text!r} is the start of {len(matches)} or more batch ids; give more of it",
            )
        raise PageError(404, "Unknown batch", f"no batch with id {text[:80]!r}")

    # ---- errors --------------------------------------------------------------------------

    def error_response(request: Request, status: int, title: str, detail: str) -> Response:
        detail = redact_urls_in(detail)
        path = request.url.path
        if path.startswith("/api/"):
            return JSONResponse({"error": title, "detail": detail}, status_code=status)
        if path.startswith(IMAGE_PREFIXES) and not _wants_html(request):
            return Response(placeholder_svg(status), status_code=status, media_type="image/svg+xml")
        try:
            return render(
                request, "error.html", http_status=status, title=title, detail=detail, status_code=status
            )
        except Exception:  # a template problem must not hide the error itself
            log.exception("error page could not be rendered")
            return Response(f"{status} {title}: {detail}\n", status_code=status, media_type="text/plain")

    def on_page_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, PageError)
        return error_response(request, exc.status, exc.title, exc.detail)

    def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            return error_response(request, 404, "Not found", f"there is no page at {request.url.path[:200]}")
        if exc.status_code == 405:
            return error_response(
                request,
                405,
                "Method not allowed",
                f"{request.method} is not accepted at {request.url.path[:200]}",
            )
        return error_response(request, exc.status_code, "Request refused", str(exc.detail))

    def on_database_error(request: Request, exc: Exception) -> Response:
        log.warning("job database error on %s: %s", request.url.path, _first_line(exc))
        return error_response(
            request,
            503,
            "Job database unavailable",
            f"the job database at {redact_url(settings.database_url)} could not answer: {_first_line(exc)}",
        )

    def on_storage_error(request: Request, exc: Exception) -> Response:
        status = 503 if isinstance(exc, StorageUnavailable) else 502
        return error_response(request, status, "Artifact storage unavailable", str(exc))

    def on_internal_error(request: Request, exc: Exception) -> Response:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(
            request, 500, "Internal error", "the dashboard hit a bug; the traceback is in its log"
        )

    routes = [
        Route("/", home),
        Route("/batches", batches_page),
        Route("/batches/{batch_id}", batch_page),
        Route("/batches/{batch_id}/{action}", batch_action, methods=["POST"]),
        Route("/jobs", jobs_page),
        Route("/jobs/{job_id}", job_page),
        Route("/jobs/{job_id}/{action}", job_action, methods=["POST"]),
        Route("/workers", workers_page),
        Route("/api/jobs", api_jobs),
        Route("/api/batches", api_batches),
        Route("/image/{job_id}/{index:int}", image),
        Route("/thumb/{job_id}/{index:int}", thumbnail),
        Route("/input/{job_id}/{index:int}", input_image),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/healthz", healthz),
        Mount("/static", app=StaticFiles(directory=PACKAGE / "static"), name="static"),
    ]
    handlers: dict[Any, Any] = {
        PageError: on_page_error,
        HTTPException: on_http_error,
        sa.exc.DBAPIError: on_database_error,
        sa.exc.TimeoutError: on_database_error,
        StorageError: on_storage_error,
        Exception: on_internal_error,
    }
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(HeadersMiddleware, check_host=not guard.enabled),
            Middleware(AuthMiddleware, guard=guard),
        ],
        exception_handlers=handlers,
    )
    app.state.services = services
    app.state.images = images
    return app


_WORKER_LABELS = {
    "ok": "alive, idle",
    "busy": "alive, busy",
    "stuck": "stuck",
    "gone": "gone",
    "replaced": "gone (its node runs a new process)",
}


def _tile(job: JobView) -> dict[str, Any]:
    """What a gallery tile, a job list row and a job page header show of a job."""
    first = job.artifacts[0] if job.artifacts else None
    return {
        "id": job.id,
        "short": job.id[:8],
        "status": job.status.value,
        "live": job.status not in TERMINAL_STATUSES,
        "step": job.progress_step,
        "total": job.progress_total,
        "index": job.batch_index,
        "prompt": present.prompt_of(job),
        "kind": job.kind.value,
        "images": present.image_count(job),
        "thumb": f"/thumb/{job.id}/0?v={first.sha256[:16]}" if first is not None else None,
        "width": first.width if first is not None else job.width,
        "height": first.height if first is not None else job.height,
        "error": present.text(job.error_type) if job.error_type else None,
        "created_at": job.created_at,
        "cancel_requested": job.cancel_requested,
    }


def _job_json(job: JobView) -> dict[str, Any]:
    tile = _tile(job)
    return {key: tile[key] for key in ("status", "live", "step", "total", "thumb", "images", "error")} | {
        "cancel_requested": job.cancel_requested
    }


def _image_target(request: Request) -> tuple[str, int]:
    job_id = _uuid_or_none(request.path_params["job_id"])
    if job_id is None:
        raise PageError(404, "Unknown job", f"no job with id {request.path_params['job_id'][:80]!r}")
    return job_id, int(request.path_params["index"])


def _wants_html(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "text/html" in accept


def _query(request: Request, changes: Mapping[str, Any]) -> str:
    """This page's query string with some parameters changed (None drops one)."""
    params = dict(request.query_params)
    params.pop("notice", None)
    for key, value in changes.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = str(value)
    return "?" + urlencode(params) if params else request.url.path


def _back(path: str, notice: str, **numbers: int) -> Response:
    return RedirectResponse(f"{path}?{urlencode({'notice': notice, **numbers})}", status_code=303)


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body (small: login and action buttons only)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise PageError(413, "Request too large", f"a form is at most {MAX_FORM_BYTES} bytes")
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise PageError(400, "Bad form", "the form could not be read") from None
    return {key: values[0] for key, values in parsed.items() if values}


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip().splitlines()
    return redact_urls_in(text[0] if text else type(exc).__name__)[:300]
