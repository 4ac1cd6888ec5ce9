"""The app factory: ``uvicorn service.app:create_app --factory`` or ``python -m service``."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import __version__
from service.auth import AuthMiddleware, configure as configure_auth
from service.errors import ServiceError
from service.jobs import JobManager
from service.logs import configure_logging
from service.metrics import ServiceMetrics
from service.middleware import BodyLimitMiddleware, RequestContextMiddleware
from service.routers import health, infer, jobs, metrics, models, predict, web
from service.runtime import ModelServer
from service.settings import Settings, get_settings

__all__ = ["create_app"]

log = logging.getLogger("service")

DESCRIPTION = """Rotation-equivariant GSA-Net image classifiers on ONNX Runtime.

* `/v2/...`: the Open Inference Protocol (KServe v2), JSON and binary tensors, for existing clients
  (`tritonclient.http`, KServe).
* `/v1/models/{name}/predict`: images in (PNG, JPEG, TIFF), labels, probabilities and orientation
  responses out.
* `/v1/jobs/...`: batch scoring jobs for whole slides, patch sets and slide archives (202 with a job
  id, progress, result downloads, cancel).
* `/metrics`: Prometheus.
* `/`: a web page for people (predictions, orientation responses, slide heatmaps).

Every error is `{"error": "..."}` with its HTTP status."""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    server: ModelServer = app.state.server
    job_manager: JobManager = app.state.jobs
    server.start()
    job_manager.start()
    try:
        yield
    finally:
        log.info("shutting down: interrupting running jobs, finishing queued requests")
        await asyncio.to_thread(job_manager.stop, app.state.settings.graceful_shutdown_s)
        await server.stop()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; models load in the background once it starts (ready after warm-up).

    Raises:
        AuthConfigError: authentication is on (``GSA_AUTH``) but no API key is configured.
    """
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)
    api_keys = configure_auth(settings)
    log.info("authentication %s", f"on ({len(api_keys)} API keys)" if api_keys else "off")
    app = FastAPI(title="GSA-Serve", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    service_metrics = ServiceMetrics()
    app.state.settings = settings
    app.state.server = ModelServer(settings, service_metrics)
    app.state.jobs = _job_manager(settings, app.state.server)
    for router in (health.router, models.router, infer.router, predict.router, jobs.router, metrics.router, web.router):
        app.include_router(router)
    web.mount_static(app)
    _add_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, large_prefixes=("/v1/jobs",),
                       large_max_bytes=settings.max_upload_bytes)
    app.add_middleware(AuthMiddleware, keys=api_keys, open_metrics=not settings.metrics_auth)
    app.add_middleware(RequestContextMiddleware, metrics=service_metrics, access_log_enabled=settings.access_log)
    return app


def _job_manager(settings: Settings, server: ModelServer) -> JobManager:
    def resolve_model(name: str, version: str | None):
        return server.get(name, version)  # Unavailable while loading: the job waits

    def count_tiles(kind: str, count: int) -> None:
        server.metrics.job_tiles.labels(kind).inc(count)

    return JobManager(settings.jobs_dir, resolve_model, settings.max_concurrent_jobs, settings.max_queued_jobs,
                      settings.resume_jobs, data_dir=settings.data_dir, checkpoint_every=settings.job_checkpoint_tiles,
                      lease_s=settings.job_lease_s, poll_s=settings.job_poll_s, on_tiles=count_tiles,
                      model_dir=settings.model_dir, ray_address=settings.ray_address, ray_workers=settings.ray_workers,
                      ray_threads=settings.ray_threads, ray_start_timeout_s=settings.ray_start_timeout_s)


def _count(request: Request, outcome: str) -> None:
    labels = getattr(request.state, "model_labels", None)
    if labels is not None:
        request.app.state.server.metrics.inference_requests.labels(*labels, outcome).inc()


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        _count(request, exc.outcome)
        level = logging.ERROR if exc.status >= 500 and exc.status != 503 else logging.INFO
        log.log(level, "%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path}"
        return JSONResponse({"error": detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        _count(request, "bad_request")
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        status = 400 if request.url.path.startswith("/v2") else 422
        return JSONResponse({"error": f"invalid request: {problems}"}, status_code=status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        _count(request, "error")
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)
