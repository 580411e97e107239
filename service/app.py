"""The FastAPI application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service.errors import install_error_handlers
from service.images import configure_pillow
from service.middleware import ErrorGuardMiddleware, RequestMetricsMiddleware
from service.routes import router
from service.runtime import Runtime
from service.settings import Settings

logger = logging.getLogger("service.app")
DRAIN_GRACE_S = 10.0
"""Extra time, beyond one request deadline, that shutdown waits for the worker to drain."""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; the model loads in the worker thread once the app starts (see /readyz)."""
    settings = settings if settings is not None else Settings()
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
    # Added last = outermost: metrics see the 500 that the guard produces.
    app.add_middleware(ErrorGuardMiddleware, metrics=runtime.metrics)
    app.add_middleware(RequestMetricsMiddleware, metrics=runtime.metrics)
    return app
