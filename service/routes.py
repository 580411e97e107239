"""HTTP endpoints: /compress, /decompress, /v1/models, /healthz, /readyz, /metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from model.bitstream import MAX_QUALITY, MIN_QUALITY, BitstreamError, ModelMismatchError, PixelLimitError
from model.metrics import bits_per_pixel
from service.body import MULTIPART_FORM, extract_form_file, media_type_of, read_body
from service.errors import ErrorCode, ServiceError, error_body
from service.formats import (
    FORMAT_ALIASES,
    FORMAT_FALLBACK_HEADER,
    FormatLimitError,
    encode_image,
    negotiate,
)
from service.images import INPUT_MEDIA_TYPES, decode_image, is_input_media_type
from service.metrics import quality_label
from service.middleware import QUALITY_STATE_KEY, QUALITY_VALUE_STATE_KEY
from service.runtime import Runtime, get_runtime
from service.schemas import (
    BITSTREAM_MEDIA_TYPE,
    COMPRESS_BODY,
    COMPRESS_RESPONSES,
    DECOMPRESS_BODY,
    DECOMPRESS_RESPONSES,
    METRICS_RESPONSES,
    READY_RESPONSES,
    UNAVAILABLE,
    HealthBody,
    ModelsBody,
    ReadyBody,
)
from service.timeline import DECODE_IMAGE, ENCODE_IMAGE, PARSE, READ_BODY, timeline_of

BITSTREAM_INPUT_TYPES = frozenset({BITSTREAM_MEDIA_TYPE, "application/octet-stream", ""})
IMAGE_FIELD = "image"

router = APIRouter()
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def _set_quality_label(request: Request, quality: float) -> str:
    """Label the request's metrics with ``quality`` and return the label."""
    label = quality_label(quality)
    setattr(request.state, QUALITY_STATE_KEY, label)
    setattr(request.state, QUALITY_VALUE_STATE_KEY, float(quality))
    return label


def format_quality(quality: float) -> str:
    """The quality a stream holds (float32), as the shortest text that reads back to it: ``3``, ``3.37``."""
    return np.format_float_positional(np.float32(quality), trim="-")


def _unsupported_media_type(media_type: str, accepted: list[str]) -> ServiceError:
    shown = media_type or "none"
    return ServiceError(
        415,
        ErrorCode.UNSUPPORTED_MEDIA_TYPE,
        f"Content-Type {shown} is not accepted; use one of {', '.join(accepted)}",
    )


async def _read_image_bytes(request: Request, runtime: Runtime) -> bytes:
    """The encoded image: the raw body (image/* type) or the ``image`` field of a multipart form."""
    content_type = request.headers.get("content-type", "")
    media_type = media_type_of(content_type)
    accepted = [*INPUT_MEDIA_TYPES, MULTIPART_FORM]
    if media_type == MULTIPART_FORM:
        body = await read_body(request, runtime.settings.max_body_bytes, runtime.settings.body_timeout_s)
        part = await run_in_threadpool(extract_form_file, body, content_type, IMAGE_FIELD)
        if part.media_type not in ("", "application/octet-stream") and not is_input_media_type(
            part.media_type
        ):
            raise _unsupported_media_type(part.media_type, accepted)
        return part.data
    if not is_input_media_type(media_type):
        raise _unsupported_media_type(media_type, accepted)
    return await read_body(request, runtime.settings.max_body_bytes, runtime.settings.body_timeout_s)


@router.post(
    "/compress",
    response_class=Response,
    responses=COMPRESS_RESPONSES,
    openapi_extra=COMPRESS_BODY,
    summary="Compress an image to a LALIC bitstream",
)
async def compress(
    request: Request,
    runtime: RuntimeDep,
    quality: Annotated[
        float,
        Query(
            ge=MIN_QUALITY,
            le=MAX_QUALITY,
            allow_inf_nan=False,
            description="Quality 1 (smallest) .. 6 (best); any value between.",
        ),
    ],
) -> Response:
    """Compress the request image (raw image body or multipart field ``image``) at ``quality``."""
    with runtime.preparing() as submitting:
        return await _compress(request, runtime, quality, submitting)


async def _compress(
    request: Request, runtime: Runtime, quality: float, submitting: Callable[[], None]
) -> Response:
    """/compress; ``submitting`` is called when its job goes to the worker (:meth:`Runtime.preparing`)."""
    label = _set_quality_label(request, quality)
    settings = runtime.settings
    if not settings.quality_served(quality):
        raise ServiceError(
            422,
            ErrorCode.INVALID_PARAMETER,
            f"quality {quality:g} is not served (loaded: {list(settings.qualities)})",
        )
    engine = runtime.require_ready()
    if not engine.quality_served(quality):  # a set of fixed-rate networks: no values between
        raise ServiceError(
            422,
            ErrorCode.INVALID_PARAMETER,
            f"quality {quality:g} is not served (one network per quality: {list(settings.qualities)})",
        )
    deadline = runtime.deadline_of(request)
    timeline = timeline_of(request.scope)
    data = await _read_image_bytes(request, runtime)
    timeline.mark(READ_BODY)

    def admit(height: int, width: int) -> None:  # before the pixels are decoded
        runtime.admit(engine.compress_key(height, width, quality), height, width, deadline)

    image = await run_in_threadpool(
        decode_image, data, max_pixels=settings.max_pixels, min_side=settings.min_side, check_size=admit
    )
    timeline.mark(DECODE_IMAGE)
    height, width = image.shape[:2]
    key = engine.compress_key(height, width, quality)
    stream: bytes = await runtime.run(key, image, deadline, height, width, timeline, submitting)
    bpp = bits_per_pixel(len(stream), height, width)
    runtime.metrics.bits_per_pixel.labels(quality=label).observe(bpp)
    headers = {
        "X-Lalic-Quality": format_quality(quality),
        "X-Lalic-Width": str(width),
        "X-Lalic-Height": str(height),
        "X-Lalic-Bytes": str(len(stream)),
        "X-Lalic-Bpp": f"{bpp:.6f}",
    }
    return Response(stream, media_type=BITSTREAM_MEDIA_TYPE, headers=headers)


@router.post(
    "/decompress",
    response_class=Response,
    responses=DECOMPRESS_RESPONSES,
    openapi_extra=DECOMPRESS_BODY,
    summary="Decompress a LALIC bitstream to an image",
)
async def decompress(
    request: Request,
    runtime: RuntimeDep,
    output_format: Annotated[
        Literal["png", "webp", "jpeg", "jpg"] | None,
        Query(alias="format", description="Output format; overrides Accept. Default PNG."),
    ] = None,
) -> Response:
    """Decode the bitstream body; the image format follows ``format``, else ``Accept``, else PNG."""
    with runtime.preparing() as submitting:
        return await _decompress(request, runtime, output_format, submitting)


async def _decompress(
    request: Request, runtime: Runtime, output_format: str | None, submitting: Callable[[], None]
) -> Response:
    """/decompress; ``submitting`` is called when its job goes to the worker (:meth:`Runtime.preparing`)."""
    engine = runtime.require_ready()
    deadline = runtime.deadline_of(request)
    media_type = media_type_of(request.headers.get("content-type"))
    if media_type not in BITSTREAM_INPUT_TYPES:
        raise _unsupported_media_type(media_type, [BITSTREAM_MEDIA_TYPE, "application/octet-stream"])
    timeline = timeline_of(request.scope)
    data = await read_body(request, runtime.settings.max_body_bytes, runtime.settings.body_timeout_s)
    timeline.mark(READ_BODY)
    try:
        container = engine.parse(data)  # the one parse: the worker decodes this container
    except PixelLimitError as exc:
        declared = f"the stream declares {exc.header.width}x{exc.header.height} pixels"
        raise ServiceError(
            413, ErrorCode.TOO_MANY_PIXELS, f"{declared}, above the limit of {runtime.settings.max_pixels}"
        ) from None
    except ModelMismatchError as exc:
        raise ServiceError(400, ErrorCode.MODEL_MISMATCH, str(exc)) from None
    except BitstreamError as exc:
        raise ServiceError(400, ErrorCode.BAD_BITSTREAM, f"malformed bitstream: {exc}") from None
    timeline.mark(PARSE)
    header = container.header
    _set_quality_label(request, header.quality)
    requested = FORMAT_ALIASES[output_format] if output_format else None
    try:  # before decoding: the header knows the size
        choice = negotiate(requested, request.headers.get("accept"), header.width, header.height)
    except FormatLimitError as exc:
        raise ServiceError(422, ErrorCode.INVALID_PARAMETER, str(exc)) from None
    try:
        key = engine.decompress_key(header)
        image = await runtime.run(key, container, deadline, header.height, header.width, timeline, submitting)
    except ModelMismatchError as exc:  # a lazy set checks the weights digest once the network loads
        raise ServiceError(400, ErrorCode.MODEL_MISMATCH, str(exc)) from None
    except ValueError as exc:  # BitstreamError, or the codec refusing what the stream asks for
        raise ServiceError(400, ErrorCode.BAD_BITSTREAM, f"malformed bitstream: {exc}") from None
    body = await run_in_threadpool(encode_image, image, choice.format)
    timeline.mark(ENCODE_IMAGE)
    headers = {
        "Vary": "Accept",
        "X-Lalic-Quality": format_quality(header.quality),
        "X-Lalic-Width": str(header.width),
        "X-Lalic-Height": str(header.height),
        "X-Lalic-Bytes": str(len(data)),
        "X-Lalic-Bpp": f"{bits_per_pixel(len(data), header.height, header.width):.6f}",
    }
    if choice.passed_over:
        headers[FORMAT_FALLBACK_HEADER] = ", ".join(fmt.value for fmt in choice.passed_over)
    return Response(body, media_type=choice.format.media_type, headers=headers)


@router.get("/v1/models", summary="The loaded model", responses={503: UNAVAILABLE})
async def models(runtime: RuntimeDep) -> ModelsBody:
    """Model id, weights digest, qualities, device and backend (503 until loaded); a weight set of
    per-quality networks (``lalic import``) lists each network with its one quality."""
    engine = runtime.require_ready()
    return ModelsBody.model_validate({"models": engine.models()})


@router.get("/healthz", summary="Liveness")
async def healthz() -> HealthBody:
    """200 while the process serves HTTP."""
    return HealthBody(status="ok")


@router.get("/readyz", summary="Readiness", response_model=ReadyBody, responses=READY_RESPONSES)
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    """200 once every quality is loaded and warmed up (with ``lazy_weights`` and a weight set: the
    first one; ``loaded`` lists those loaded so far); 503 before (or when loading failed)."""
    engine = runtime.engine
    if engine.ready and not runtime.worker.closing:
        qualities = list(runtime.settings.qualities)
        return JSONResponse({"status": "ready", "qualities": qualities, "loaded": list(engine.warmed)})
    state = "shutting_down" if runtime.worker.closing else engine.state.value
    detail = "the service is shutting down" if runtime.worker.closing else engine.describe_state()
    return JSONResponse(
        {**error_body(ErrorCode.NOT_READY, detail), "status": state},
        status_code=503,
        headers={"Retry-After": "5"},
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response, responses=METRICS_RESPONSES)
async def metrics(runtime: RuntimeDep) -> Response:
    """Prometheus text exposition of this app's registry."""
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)
