"""HTTP/1.1 connections: uvicorn's h11 protocol, bounded against hostile clients.

uvicorn's default parser (httptools) has no limit on header size or count and no read timeout: one
client sending an endless header grows the server without bound, and a client that sends nothing,
or one byte at a time, holds its connection forever. :class:`LimitedH11Protocol` is uvicorn's
:class:`~uvicorn.protocols.http.h11_impl.H11Protocol` (the pure-Python h11 parser) with:

* a bound on the request line plus headers (``max_header_bytes``; h11 refuses a head that grows past
  it while incomplete, and a complete head is measured too) and on the number of headers
  (``max_header_count``): 431 ``headers_too_large``;
* a header timeout (``header_timeout_s``, from connecting or from the end of the previous response
  until the headers are complete): 408 ``request_timeout``, or a silent close when the client sent
  nothing of a request;
* a body timeout (``body_timeout_s``): the request handler answers 408 itself when the body it reads
  is late (:func:`service.body.read_body`); here, a body nobody reads (it followed a response) is cut
  off the same time after its headers, :data:`BODY_TIMEOUT_GRACE_S` later than the handler would;
* a bound on open connections (``max_connections``): requests on connections beyond it get
  503 ``too_many_connections`` and the connection is closed;
* protocol errors answered as JSON (``{"error", "detail", "request_id"}``) like every other error.

Each refusal carries an ``X-Request-ID`` (the client's, when its headers were complete and it sent a
sane one; else a new one), the same id in its body, and is logged as one request line
(:func:`service.logs.log_request`) with its status and ``error`` code, as the app logs its requests.

After such a refusal the server stops reading (what still arrives is discarded, never buffered),
sends the response and half-closes, and closes for good once the client does or after
:data:`LINGER_S`, so that the client reads the response instead of a connection reset.
The idle keep-alive timeout is uvicorn's (``keep_alive_timeout_s``). WebSocket upgrades are off.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.errors import ErrorCode, error_body
from service.logs import REQUEST_ID_NAME, elapsed_ms, log_request, new_request_id, request_id_of
from service.metrics import Metrics
from service.middleware import REFUSED_STATE_KEY, REQUEST_ID_STATE_KEY
from service.settings import Settings

logger = logging.getLogger("service.protocol")

LINGER_S = 2.0
"""After refusing a connection, how long to keep discarding what the client still sends before closing."""
BODY_TIMEOUT_GRACE_S = 1.0
"""The connection-level body timeout fires this much after the handler's own (which answers 408)."""
TOO_MANY_CONNECTIONS_RETRY_S = 1
"""Retry-After of the 503 for connections beyond ``max_connections``."""
_REQUEST_LINE_OVERHEAD = len(b"  HTTP/1.1\r\n\r\n")
_HEADER_LINE_OVERHEAD = len(b": \r\n")


@dataclass(frozen=True)
class HttpLimits:
    """The connection limits, from the settings of the same names."""

    max_header_bytes: int
    max_header_count: int
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        """The limits ``settings`` ask for."""
        return cls(
            max_header_bytes=settings.max_header_bytes,
            max_header_count=settings.max_header_count,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_connections=settings.max_connections,
        )


@dataclass(frozen=True)
class Refusal:
    """An error answered by the connection itself: status, code and detail."""

    status: int
    code: ErrorCode
    detail: str
    retry_after_s: int | None = None
    request_id: str | None = None
    """The id in ``X-Request-ID`` and in the body (set by :meth:`for_request`)."""

    def for_request(self, request_id: str) -> Refusal:
        """This refusal, answering the request of id ``request_id``."""
        return replace(self, request_id=request_id)

    def body(self) -> bytes:
        """The JSON error body (:func:`service.errors.error_body`)."""
        return json.dumps(error_body(self.code, self.detail, self.request_id)).encode()

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Response headers: JSON, its length, ``Connection: close``, any ``Retry-After`` and the
        ``X-Request-ID``."""
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.body())).encode()),
            (b"connection", b"close"),
        ]
        if self.retry_after_s is not None:
            headers.append((b"retry-after", str(self.retry_after_s).encode()))
        if self.request_id is not None:
            headers.append((REQUEST_ID_NAME, self.request_id.encode("latin-1")))
        return headers

    def log(self, method: str | None, started: float, bytes_in: int) -> None:
        """Write the request line of this refusal (as :class:`service.middleware.RequestLogMiddleware`
        does for requests the app answers), with its ``error`` code. ``started``: the perf_counter at
        which the request could begin (connection made, or the previous response sent); ``bytes_in``:
        body bytes received."""
        log_request(
            {
                "request_id": self.request_id,
                "method": method,
                "route": None,
                "status": self.status,
                "duration_ms": elapsed_ms(started),
                "bytes_in": bytes_in,
                "bytes_out": len(self.body()),
                "quality": None,
                "error": self.code.value,
            }
        )

    def response(self) -> bytes:
        """The whole HTTP/1.1 response."""
        status = f"HTTP/1.1 {self.status} {http.HTTPStatus(self.status).phrase}\r\n".encode()
        headers = b"".join(name + b": " + value + b"\r\n" for name, value in self.headers())
        return status + headers + b"\r\n" + self.body()


def head_size(request: h11.Request) -> int:
    """Bytes of a parsed request's line and headers, as sent (give or take whitespace)."""
    line = len(request.method) + len(request.target) + _REQUEST_LINE_OVERHEAD
    return line + sum(len(name) + len(value) + _HEADER_LINE_OVERHEAD for name, value in request.headers)


class _LimitedConnection(h11.Connection):
    """An h11 server connection that refuses oversized heads and remembers why it refused (and the
    refused request's head, when it was complete)."""

    def __init__(self, limits: HttpLimits) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self._limits = limits
        self.refusal: Refusal | None = None
        self.refused_head: h11.Request | None = None
        self.body_bytes = 0
        """Body bytes of the current (or last) request received so far."""

    def _too_large(self, detail: str) -> h11.RemoteProtocolError:
        self.refusal = Refusal(431, ErrorCode.HEADERS_TOO_LARGE, detail)
        return h11.RemoteProtocolError(detail, error_status_hint=431)

    def next_event(self) -> Any:
        """h11's next event; a head over the limits raises :class:`h11.RemoteProtocolError` (431)."""
        limits = self._limits
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            if exc.error_status_hint == 431:
                raise self._too_large(
                    f"the request line and headers exceed {limits.max_header_bytes} bytes"
                ) from None
            self.refusal = Refusal(400, ErrorCode.BAD_REQUEST, f"malformed HTTP request: {exc}")
            raise
        if isinstance(event, h11.Data):
            self.body_bytes += len(event.data)
        elif isinstance(event, h11.Request):
            self.body_bytes = 0
            self.refused_head = event  # kept only if refused below
            if len(event.headers) > limits.max_header_count:
                raise self._too_large(
                    f"{len(event.headers)} headers, more than the limit of {limits.max_header_count}"
                )
            if head_size(event) > limits.max_header_bytes:
                raise self._too_large(f"the request line and headers exceed {limits.max_header_bytes} bytes")
            self.refused_head = None
        return event


def _too_many_connections_app(limit: int, metrics: Metrics | None) -> Any:
    """An ASGI app answering every request with 503 ``too_many_connections`` and closing."""
    refusal = Refusal(
        503,
        ErrorCode.TOO_MANY_CONNECTIONS,
        f"the server has {limit} connections open already; retry later",
        TOO_MANY_CONNECTIONS_RETRY_S,
    )

    async def app(scope: Any, receive: Any, send: Any) -> None:
        started = time.perf_counter()
        answer = refusal.for_request(request_id_of(scope["headers"]))
        if metrics is not None:
            metrics.errors_total.labels(code=answer.code.value).inc()
        answer.log(scope.get("method"), started, 0)
        await send({"type": "http.response.start", "status": answer.status, "headers": answer.headers()})
        await send({"type": "http.response.body", "body": answer.body()})

    return app


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header limits, read timeouts and a connection bound.

    Subclass per server with :func:`protocol_class`, which sets :attr:`limits` and :attr:`metrics`.
    """

    limits: ClassVar[HttpLimits]
    metrics: ClassVar[Metrics | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _LimitedConnection(self.limits)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind: str | None = None
        self._discarding = False
        self._request_started = time.perf_counter()

    # -- connection life cycle ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            logger.warning("%d connections open, above max_connections; refusing", len(self.connections))
            self.app = _too_many_connections_app(self.limits.max_connections, self.metrics)
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:
        if self._discarding:  # the client closed its side after our refusal: done
            self.transport.close()
        return super().eof_received()

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._request_started = time.perf_counter()  # the next request's time starts here
        self._watch()

    def send_400_response(self, msg: str) -> None:
        """Answer a protocol error (malformed, or a head over the limits) as JSON and close."""
        refusal = self.conn.refusal or Refusal(400, ErrorCode.BAD_REQUEST, msg)
        head = self.conn.refused_head  # the head, if it was complete (too many or too large headers)
        if head is None:
            self._refuse(refusal.for_request(new_request_id()))
        else:
            self._refuse(refusal.for_request(request_id_of(head.headers)), head.method.decode("latin-1"))

    # -- timeouts -----------------------------------------------------------------------------

    def _watch(self) -> None:
        """Arm the timer the client's state calls for: headers awaited, or a body still arriving."""
        if self.transport.is_closing() or self._discarding:
            self._cancel_timer()
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            self._arm("header", self.limits.header_timeout_s, self._header_timeout)
        elif state is h11.SEND_BODY:
            self._arm("body", self.limits.body_timeout_s + BODY_TIMEOUT_GRACE_S, self._body_timeout)
        else:
            self._cancel_timer()

    def _arm(self, kind: str, delay: float, callback: Any) -> None:
        """Start a ``kind`` timer unless one runs already (a drip of bytes must not restart it)."""
        if self._timer_kind == kind:
            return
        self._cancel_timer()
        self._timer = self.loop.call_later(delay, callback)
        self._timer_kind = kind

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._timer_kind = None

    def _header_timeout(self) -> None:
        self._timer = self._timer_kind = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if not self.conn.trailing_data[0]:  # nothing of a request arrived: an idle connection
            self.transport.close()
            return
        detail = f"the request headers did not arrive within {self.limits.header_timeout_s:g} s"
        # whatever X-Request-ID arrived may be cut off: a new id
        self._refuse(Refusal(408, ErrorCode.REQUEST_TIMEOUT, detail, request_id=new_request_id()))

    def _body_timeout(self) -> None:
        self._timer = self._timer_kind = None
        if self.transport.is_closing() or self.conn.their_state is not h11.SEND_BODY:
            return
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # the handler answered already; nobody reads this body
            return
        detail = f"the request body did not arrive within {self.limits.body_timeout_s:g} s"
        refusal = Refusal(408, ErrorCode.REQUEST_TIMEOUT, detail)
        if self.cycle is None:  # never the case in SEND_BODY; for safety
            self._refuse(refusal.for_request(new_request_id()))
            return
        scope = self.cycle.scope
        state = scope.setdefault("state", {})
        # the id the app gave the request (its request-log middleware), else the client's or a new one
        request_id = state.get(REQUEST_ID_STATE_KEY) or request_id_of(scope["headers"])
        state[REFUSED_STATE_KEY] = True  # logged here: the app's middleware must not log it again
        self._refuse(refusal.for_request(request_id), scope.get("method"), self.conn.body_bytes)

    # -- refusing -----------------------------------------------------------------------------

    def _refuse(self, refusal: Refusal, method: str | None = None, body_bytes: int = 0) -> None:
        """Log and send ``refusal``, stop reading and half-close; close when the client does, or after
        :data:`LINGER_S`. ``method`` is the request's, when its request line was complete, and
        ``body_bytes`` what arrived of its body (for the request line)."""
        self._cancel_timer()
        if self.metrics is not None:
            self.metrics.errors_total.labels(code=refusal.code.value).inc()
        refusal.log(method, self._request_started, body_bytes)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # a handler still running must not write after this
            self.cycle.message_event.set()
        self._discarding = True
        self.transport.write(refusal.response())
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def protocol_class(limits: HttpLimits, metrics: Metrics | None = None) -> type[LimitedH11Protocol]:
    """A :class:`LimitedH11Protocol` subclass bound to ``limits`` (and counting refusals in ``metrics``)."""
    return type("LalicH11Protocol", (LimitedH11Protocol,), {"limits": limits, "metrics": metrics})
