"""Logging: JSON lines (or text), the request id of the current request, and the per-request log line.

With ``log_format=json`` every log record is one JSON object on one line of stderr::

    {"ts": "2025-01-01T12:00:00.123Z", "level": "INFO", "logger": "lalic.access", "message": "request",
     "request_id": "9f1c...", "method": "POST", "route": "/compress", "status": 200,
     "duration_ms": 41.2, "bytes_in": 48213, "bytes_out": 3120, "quality": 3.0}

Records logged while a request is handled carry its ``request_id``. Request lines hold no header
values, query strings, keys or body bytes: only the fields above (``route`` is the route template,
or null when no route matched). A request refused by the connection itself (:mod:`service.protocol`:
431, 408, 400, or 503 ``too_many_connections``) gets the same line with ``route`` null and one more
field, ``error``, its error code; ``method`` is null when the request line was never complete.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

ACCESS_LOGGER = "lalic.access"
REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_NAME = REQUEST_ID_HEADER.lower().encode("latin-1")
"""The header's name as raw ASGI and h11 headers spell it."""
_REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}")
"""A client's X-Request-ID is kept when it matches this (UUIDs, hex, base64, dotted ids), else replaced."""
FIELDS_ATTR = "lalic_fields"
"""Attribute of a log record holding extra JSON fields (``logger.info(..., extra={FIELDS_ATTR: {...}})``)."""

current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lalic_request_id", default=None
)
"""The id of the request being handled in this context (None outside requests)."""


def sane_request_id(value: str | None) -> str | None:
    """``value`` if it is a reasonable request id to echo and log, else None."""
    if value is not None and _REQUEST_ID_PATTERN.fullmatch(value):
        return value
    return None


def new_request_id() -> str:
    """A fresh random request id (32 hex digits)."""
    return uuid.uuid4().hex


def offered_request_id(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The client's ``X-Request-ID`` among raw (lower-case name, value) headers, if it sent exactly one
    and it is sane (:func:`sane_request_id`); else None."""
    offered = [value for name, value in headers if name == REQUEST_ID_NAME]
    return sane_request_id(offered[0].decode("latin-1")) if len(offered) == 1 else None


def request_id_of(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The id of a request with these headers: the client's (:func:`offered_request_id`) or a new one."""
    return offered_request_id(headers) or new_request_id()


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (of the current request, or None) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, request_id, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        entry.update(getattr(record, FIELDS_ATTR, None) or {})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """Human-readable lines; request lines list their fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, FIELDS_ATTR, None)
        if fields:
            line += " " + " ".join(f"{name}={value}" for name, value in fields.items())
        request_id = getattr(record, "request_id", None)
        if request_id is not None and not (fields and "request_id" in fields):
            line += f" request_id={request_id}"
        return line


def configure_logging(level: str, fmt: str) -> None:
    """Send every logger (uvicorn's and Python warnings included) to stderr in ``fmt`` at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        named = logging.getLogger(name)
        named.handlers = []
        named.propagate = True
    logging.captureWarnings(True)


def log_request(fields: dict[str, Any]) -> None:
    """Write the line of one finished request (at INFO, so ``log_level=warning`` silences it)."""
    logging.getLogger(ACCESS_LOGGER).info("request", extra={FIELDS_ATTR: fields})


def elapsed_ms(started: float) -> float:
    """Milliseconds since ``started`` (a ``time.perf_counter()``), rounded to 0.1 ms."""
    return round((time.perf_counter() - started) * 1000.0, 1)
