"""ASGI middleware: request ids and the request log, per-request metrics, and the catch-all 500."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ErrorCode, error_response
from service.logs import (
    REQUEST_ID_NAME,
    current_request_id,
    elapsed_ms,
    log_request,
    request_id_of,
)
from service.metrics import NO_QUALITY, Metrics, endpoint_label, status_class
from service.timeline import RESPOND, TIMELINE_STATE_KEY, Timeline

logger = logging.getLogger("service.middleware")

QUALITY_STATE_KEY = "lalic_quality"
"""Key in the request state (``scope["state"]``) where routes leave the request's quality label."""
QUALITY_VALUE_STATE_KEY = "lalic_quality_value"
"""Key in the request state holding the request's quality as a float (for the request log)."""
STARTED_STATE_KEY = "lalic_started"
"""Key in the request state holding the ``time.monotonic()`` at which the request arrived."""
REQUEST_ID_STATE_KEY = "lalic_request_id"
"""Key in the request state holding the request id."""
REFUSED_STATE_KEY = "lalic_refused"
"""Key in the request state set when the connection refused the request while the app handled it (its
body came too late): the connection wrote the response and the request line, the middleware does not."""
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def request_started(scope: Scope) -> float:
    """The ``time.monotonic()`` at which the request of ``scope`` arrived (now, if not recorded)."""
    return scope.get("state", {}).get(STARTED_STATE_KEY, time.monotonic())


class _Traffic:
    """Wraps an ASGI ``receive``/``send`` pair, counting body bytes each way and keeping the status."""

    def __init__(self, receive: Receive, send: Send, status: int | None = None) -> None:
        self._receive = receive
        self._send = send
        self.status = status
        self.received = 0
        self.sent = 0

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.sent += len(message.get("body", b""))
        await self._send(message)


class RequestLogMiddleware:
    """Gives every HTTP request an id (``X-Request-ID`` in, if sane; always out) and logs one line for it.

    Outermost, so that every response (auth refusals and the guard's 500 included) carries the id.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_of(scope["headers"])
        state = scope.setdefault("state", {})
        state[REQUEST_ID_STATE_KEY] = request_id
        token = current_request_id.set(request_id)

        async def tagging_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(n, v) for n, v in message.get("headers", []) if n.lower() != REQUEST_ID_NAME]
                headers.append((REQUEST_ID_NAME, request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        traffic = _Traffic(receive, tagging_send)
        try:
            await self.app(scope, traffic.receive, traffic.send)
        finally:
            route = scope.get("route")
            if not state.get(REFUSED_STATE_KEY):
                log_request(
                    {
                        "request_id": request_id,
                        "method": scope.get("method"),
                        "route": getattr(route, "path", None),
                        "status": traffic.status,
                        "duration_ms": elapsed_ms(started),
                        "bytes_in": traffic.received,
                        "bytes_out": traffic.sent,
                        "quality": state.get(QUALITY_VALUE_STATE_KEY),
                    }
                )
            current_request_id.reset(token)


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
        timeline = state[TIMELINE_STATE_KEY] = Timeline(state[STARTED_STATE_KEY])
        endpoint = endpoint_label(scope["path"])
        traffic = _Traffic(receive, send, status=500)
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, traffic.receive, traffic.send)
        finally:
            self.metrics.in_flight.dec()
            m = self.metrics
            quality = state.get(QUALITY_STATE_KEY, NO_QUALITY)
            m.request_duration.labels(endpoint=endpoint, quality=quality).observe(
                time.perf_counter() - started
            )
            m.requests_total.labels(endpoint=endpoint, status_class=status_class(traffic.status)).inc()
            if timeline.stages and status_class(traffic.status) == "2xx":
                timeline.mark(RESPOND)
                for stage, seconds in timeline.stages:
                    m.request_stage.labels(endpoint=endpoint, stage=stage).observe(seconds)
            m.response_body_bytes.labels(endpoint=endpoint).observe(traffic.sent)
            if scope.get("method") in _BODY_METHODS:
                m.request_body_bytes.labels(endpoint=endpoint).observe(traffic.received)


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
