"""Request bodies: media type parsing, bounded reading, and the ``image`` field of multipart forms."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.errors import ErrorCode, ServiceError
from service.middleware import request_started

MULTIPART_FORM = "multipart/form-data"


def media_type_of(content_type: str | None) -> str:
    """The lower-case media type of a Content-Type header, without parameters ("" if absent)."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def too_large(limit: int) -> ServiceError:
    """The 413 for a body over ``limit`` bytes; the connection is closed after it."""
    return ServiceError(
        413, ErrorCode.PAYLOAD_TOO_LARGE, f"the body is larger than {limit} bytes", {"Connection": "close"}
    )


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """Read the body, refusing on Content-Length or as soon as more than ``max_bytes`` arrived, or
    when it is not complete ``timeout_s`` after the request's headers arrived.

    Raises:
        ServiceError: 413 over the limit, 408 too slow (the connection is closed after both), 400 for
            a bad Content-Length or a client that went away.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise ServiceError(400, ErrorCode.BAD_REQUEST, "invalid Content-Length") from None
        if length > max_bytes:
            raise too_large(max_bytes)
    received = bytearray()
    left = request_started(request.scope) + timeout_s - time.monotonic()
    try:
        async with asyncio.timeout(max(left, 0.0)):
            async for chunk in request.stream():
                if len(received) + len(chunk) > max_bytes:
                    raise too_large(max_bytes)
                received += chunk
    except ClientDisconnect:
        raise ServiceError(400, ErrorCode.BAD_REQUEST, "the client disconnected while sending") from None
    except TimeoutError:
        raise ServiceError(
            408,
            ErrorCode.REQUEST_TIMEOUT,
            f"the request body did not arrive within {timeout_s:g} s",
            {"Connection": "close"},
        ) from None
    return bytes(received)


@dataclass
class _Part:
    headers: dict[str, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True)
class FormFile:
    """One part of a multipart form: its bytes and its declared media type ("" if none)."""

    data: bytes
    media_type: str


def _parse_parts(body: bytes, boundary: bytes) -> list[_Part]:
    """Split a multipart body into parts (headers and raw bytes)."""
    parts: list[_Part] = []
    header_name = bytearray()
    header_value = bytearray()

    def on_part_begin() -> None:
        parts.append(_Part())

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].data += data[start:end]

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_name.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        parts[-1].headers[header_name.decode("latin-1").lower()] = bytes(header_value)
        header_name.clear()
        header_value.clear()

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
        },
    )
    parser.write(body)
    parser.finalize()
    return parts


def extract_form_file(body: bytes, content_type: str, name: str) -> FormFile:
    """The form field ``name`` of a multipart/form-data body (with or without a filename).

    Raises:
        ServiceError: 400 malformed multipart, 422 no such field.
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ServiceError(400, ErrorCode.BAD_REQUEST, "multipart body without a boundary")
    try:
        parts = _parse_parts(body, boundary)
    except (FormParserError, ValueError, IndexError) as exc:
        raise ServiceError(400, ErrorCode.BAD_REQUEST, f"malformed multipart body: {exc}") from None
    for part in parts:
        _, disposition = parse_options_header(part.headers.get("content-disposition", b""))
        if disposition.get(b"name") == name.encode():
            media_type = media_type_of(part.headers.get("content-type", b"").decode("latin-1"))
            return FormFile(bytes(part.data), media_type)
    raise ServiceError(422, ErrorCode.INVALID_PARAMETER, f"the multipart form has no '{name}' field")
