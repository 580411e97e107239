"""JSON error responses: the error-code enum, the service exception and the exception handlers."""

from __future__ import annotations

import math
from enum import StrEnum

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.logs import current_request_id
from service.metrics import Metrics


class ErrorCode(StrEnum):
    """The fixed set of ``error`` values in JSON error bodies (and of ``lalic_errors_total{code}``)."""

    BAD_BITSTREAM = "bad_bitstream"
    MODEL_MISMATCH = "model_mismatch"
    BAD_IMAGE = "bad_image"
    IMAGE_TOO_SMALL = "image_too_small"
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    REQUEST_TIMEOUT = "request_timeout"
    HEADERS_TOO_LARGE = "headers_too_large"
    TOO_MANY_PIXELS = "too_many_pixels"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    INVALID_PARAMETER = "invalid_parameter"
    INTERNAL_ERROR = "internal_error"
    NOT_READY = "not_ready"
    QUEUE_FULL = "queue_full"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    SHUTTING_DOWN = "shutting_down"
    TOO_MANY_CONNECTIONS = "too_many_connections"


class ServiceError(Exception):
    """A client-visible failure: HTTP status, error code, human-readable detail and extra headers."""

    def __init__(
        self, status: int, code: ErrorCode, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: ``seconds`` rounded up to whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds))) if math.isfinite(seconds) else "1"


def unavailable(code: ErrorCode, detail: str, retry_after_s: float = 1.0) -> ServiceError:
    """A 503 error with a ``Retry-After`` header (whole seconds, rounded up, at least 1)."""
    return ServiceError(503, code, detail, {"Retry-After": retry_after(retry_after_s)})


def error_body(code: ErrorCode, detail: str, request_id: str | None = None) -> dict[str, str]:
    """The JSON error body ``{"error": code, "detail": text, "request_id": id}``: ``request_id`` is the
    one in the response's ``X-Request-ID`` (by default the current request's; left out when unknown)."""
    body = {"error": code.value, "detail": detail}
    request_id = request_id if request_id is not None else current_request_id.get()
    if request_id is not None:
        body["request_id"] = request_id
    return body


def error_response(
    metrics: Metrics, status: int, code: ErrorCode, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """Build the JSON error response (:func:`error_body`) and count it."""
    metrics.errors_total.labels(code=code.value).inc()
    return JSONResponse(error_body(code, detail), status_code=status, headers=headers)


_HTTP_CODES = {
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    422: ErrorCode.INVALID_PARAMETER,
}


def _describe_validation(exc: RequestValidationError) -> str:
    """One line naming each invalid parameter, without echoing request bodies."""
    parts = []
    for error in exc.errors():
        location = ".".join(str(item) for item in error.get("loc", ()) if item not in ("query", "body"))
        parts.append(f"{location or 'request'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request parameters"


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Register handlers that turn service, validation and routing errors into JSON bodies.

    Unexpected exceptions are caught by :class:`service.middleware.ErrorGuardMiddleware`.
    """

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return error_response(metrics, exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(metrics, 422, ErrorCode.INVALID_PARAMETER, _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, ErrorCode.BAD_REQUEST)
        if exc.status_code >= 500:
            code = ErrorCode.INTERNAL_ERROR
        return error_response(metrics, exc.status_code, code, str(exc.detail), dict(exc.headers or {}))
