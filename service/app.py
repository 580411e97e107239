"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from service.auth import ApiKeys, AuthMiddleware, needs_key
from service.errors import install_error_handlers
from service.formats import FORMAT_FALLBACK_HEADER
from service.images import configure_pillow
from service.logs import REQUEST_ID_HEADER
from service.middleware import ErrorGuardMiddleware, RequestLogMiddleware, RequestMetricsMiddleware
from service.routes import router
from service.runtime import Runtime
from service.schemas import LALIC_HEADERS, add_security
from service.settings import Settings

logger = logging.getLogger("service.app")
DRAIN_GRACE_S = 10.0
"""Extra time, beyond one request deadline, that shutdown waits for the worker to drain."""


CORS_METHODS = ["GET", "POST"]
CORS_REQUEST_HEADERS = ["Authorization", "Content-Type", "Accept", REQUEST_ID_HEADER]
CORS_EXPOSED_HEADERS = [*LALIC_HEADERS, FORMAT_FALLBACK_HEADER, REQUEST_ID_HEADER, "Retry-After"]
CORS_MAX_AGE_S = 600


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the model loads in the worker thread once the app starts (see /readyz).

    Raises:
        ValueError: ``api_keys_file`` cannot be read or holds an invalid key.
    """
    settings = settings if settings is not None else Settings()
    keys = ApiKeys(settings.load_api_keys())
    runtime = Runtime.create(settings)
    configure_pillow(settings.max_pixels)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runtime.worker.start()
        try:
            yield
        finally:
            logger.info("draining %d queued job(s)", runtime.worker.depth)
            drained = await run_in_threadpool(
                runtime.worker.close, settings.request_timeout_s + DRAIN_GRACE_S
            )
            if not drained:
                logger.warning("the worker did not finish in time; exiting anyway")

    app = FastAPI(
        title="LALIC image compression",
        summary="Learned image compression (LALIC) as a REST service.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    install_error_handlers(app, runtime.metrics)
    app.include_router(router)
    # Added last = outermost. Inside out: keys are checked before any route (and body) is touched;
    # the guard turns bugs into a JSON 500; CORS answers preflights without a key and labels every
    # response, errors included; metrics see every status; the request log sees everything and
    # stamps the request id on every response.
    if len(keys):
        app.add_middleware(
            AuthMiddleware, keys=keys, metrics=runtime.metrics, protect_ops=settings.auth_protect_ops
        )
    app.add_middleware(ErrorGuardMiddleware, metrics=runtime.metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=CORS_METHODS,
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_EXPOSED_HEADERS,
            max_age=CORS_MAX_AGE_S,
        )
    app.add_middleware(RequestMetricsMiddleware, metrics=runtime.metrics)
    app.add_middleware(RequestLogMiddleware)
    if len(keys):
        _document_security(app, settings.auth_protect_ops)
    ops = "protected" if settings.auth_protect_ops else "open"
    logger.info(
        "API keys: %d configured (ops endpoints %s); CORS origins: %s",
        len(keys),
        ops if len(keys) else "open",
        ", ".join(settings.cors_origins) or "none (CORS off)",
    )
    return app


def _document_security(app: FastAPI, protect_ops: bool) -> None:
    """Make /openapi.json declare the bearer keys on the paths that need them."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            protected = {path for path in schema.get("paths", {}) if needs_key(path, protect_ops)}
            app.openapi_schema = add_security(schema, protected)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
