"""ASGI middleware: per-request metrics, and the catch-all that turns bugs into a generic JSON 500."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ErrorCode, error_response
from service.metrics import NO_QUALITY, Metrics, endpoint_label, status_class

logger = logging.getLogger("service.middleware")

QUALITY_STATE_KEY = "lalic_quality"
"""Key in the request state (``scope["state"]``) where routes leave the request's quality label."""
STARTED_STATE_KEY = "lalic_started"
"""Key in the request state holding the ``time.monotonic()`` at which the request arrived."""
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class RequestMetricsMiddleware:
    """Records duration, body sizes, status class and in-flight count of every HTTP request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})
        state[STARTED_STATE_KEY] = time.monotonic()
        endpoint = endpoint_label(scope["path"])
        status = 500
        received = 0
        sent = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, counting_receive, counting_send)
        finally:
            self.metrics.in_flight.dec()
            m = self.metrics
            quality = state.get(QUALITY_STATE_KEY, NO_QUALITY)
            m.request_duration.labels(endpoint=endpoint, quality=quality).observe(
                time.perf_counter() - started
            )
            m.requests_total.labels(endpoint=endpoint, status_class=status_class(status)).inc()
            m.response_body_bytes.labels(endpoint=endpoint).observe(sent)
            if scope.get("method") in _BODY_METHODS:
                m.request_body_bytes.labels(endpoint=endpoint).observe(received)


class ErrorGuardMiddleware:
    """Logs any exception that escaped the app and answers a generic JSON 500 (never a traceback)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response_started = False

        async def watching_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception:
            logger.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if response_started:
                raise  # too late for a JSON body: let the server drop the connection
            response = error_response(self.metrics, 500, ErrorCode.INTERNAL_ERROR, "internal server error")
            await response(scope, receive, send)
