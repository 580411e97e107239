"""OpenAPI description of the service: JSON bodies, request bodies and the documented responses."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.formats import FORMAT_FALLBACK_HEADER
from service.images import INPUT_MEDIA_TYPES

BITSTREAM_MEDIA_TYPE = "application/x-lalic"
BINARY = {"type": "string", "format": "binary"}


class ErrorBody(BaseModel):
    """Every error response: a fixed machine-readable code, a human-readable detail and the request id."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "error": "bad_image",
                    "detail": "not a decodable image",
                    "request_id": "0f8e3c2a9b7d4e61a5c3f2e1d0b9a877",
                }
            ]
        }
    )

    error: str = Field(description="Error code, e.g. bad_image, too_many_pixels, queue_full.")
    detail: str = Field(description="What went wrong, for people.")
    request_id: str | None = Field(
        default=None, description="The request id, as in the X-Request-ID response header (for the logs)."
    )


class NotReadyBody(ErrorBody):
    """/readyz while the model is not (or no longer) serving."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"error": "not_ready", "detail": "warming up (2/6 qualities ready)", "status": "warming_up"}
            ]
        }
    )

    status: str = Field(description="loading, warming_up, failed or shutting_down.")


class HealthBody(BaseModel):
    """/healthz: the process serves HTTP."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: str = Field(description="Always ok.")


class ReadyBody(BaseModel):
    """/readyz once every configured quality is loaded and warmed up."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"status": "ready", "qualities": [1, 2, 3, 4, 5, 6], "loaded": [1, 2, 3, 4, 5, 6]}]
        }
    )

    status: str = Field(description="Always ready.")
    qualities: list[float] = Field(description="The quality anchors served.")
    loaded: list[float] = Field(
        description="The anchors whose network is loaded and warmed up: all of them, except with "
        "lazy_weights and a weight set of per-quality networks, which loads each on first use."
    )


class ModelInfo(BaseModel):
    """One loaded model."""

    id: str = Field(description="Model configuration name, written into every bitstream.")
    weights_digest: str | None = Field(
        description="16 hex digits identifying the weights (also in every bitstream); null for a "
        "network of a lazy weight set that is not loaded yet."
    )
    qualities: list[float] = Field(description="Quality anchors served.")
    quality_range: list[float] = Field(description="[lowest, highest] quality served (any value between).")
    device: str = Field(description="cpu or cuda.")
    backend: str = Field(description="torch, torchscript or onnxruntime.")
    loaded: bool = Field(
        description="Whether the network is loaded and warmed up (false until first use for a lazy "
        "weight set, setting lazy_weights)."
    )


class ModelsBody(BaseModel):
    """/v1/models."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "models": [
                        {
                            "id": "lalic-s",
                            "weights_digest": "0123456789abcdef",
                            "qualities": [1, 2, 3, 4, 5, 6],
                            "quality_range": [1, 6],
                            "device": "cpu",
                            "backend": "torchscript",
                            "loaded": True,
                        }
                    ]
                }
            ]
        }
    )

    models: list[ModelInfo]


def error(description: str, model: type[BaseModel] = ErrorBody) -> dict[str, Any]:
    """A documented error response."""
    return {"model": model, "description": description}


UNAVAILABLE = error(
    "not_ready, queue_full, deadline_exceeded (at once when the estimated wait plus run time exceeds "
    "the request's deadline, or once the deadline passed) or shutting_down; Retry-After (seconds) "
    "comes from the estimated time for the queue to drain."
)
REQUEST_TIMEOUT = error("request_timeout: the body did not arrive within body_timeout_s; then closed.")
TOO_LARGE_FOR_TIME = (
    "too_many_pixels also when the cost model estimates that the image cannot be coded within "
    "request_timeout_s even on an idle worker (the detail names the largest size served)"
)
LALIC_HEADERS = {
    "X-Lalic-Quality": {"description": "Quality of the stream.", "schema": {"type": "string"}},
    "X-Lalic-Width": {"description": "Image width in pixels.", "schema": {"type": "string"}},
    "X-Lalic-Height": {"description": "Image height in pixels.", "schema": {"type": "string"}},
    "X-Lalic-Bytes": {"description": "Bitstream size in bytes.", "schema": {"type": "string"}},
    "X-Lalic-Bpp": {"description": "Bits per pixel of the stream.", "schema": {"type": "string"}},
}
DECOMPRESS_HEADERS = {
    **LALIC_HEADERS,
    FORMAT_FALLBACK_HEADER: {
        "description": "Only when Accept named formats that cannot hold the image's size (WebP sides "
        "are at most 16383 pixels, JPEG 65500): those formats, comma-separated; the body is in the "
        "best acceptable format that can (PNG at worst).",
        "schema": {"type": "string"},
    },
}

COMPRESS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {BITSTREAM_MEDIA_TYPE: {"schema": BINARY}},
        "description": "The LALIC bitstream.",
        "headers": LALIC_HEADERS,
    },
    400: error("bad_image, image_too_small or bad_request (malformed body)."),
    408: REQUEST_TIMEOUT,
    413: error(f"payload_too_large (body) or too_many_pixels (image); {TOO_LARGE_FOR_TIME}."),
    415: error("unsupported_media_type."),
    422: error("invalid_parameter: quality missing, out of range or not served; no 'image' form field."),
    503: UNAVAILABLE,
}
DECOMPRESS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "image/png": {"schema": BINARY},
            "image/webp": {"schema": BINARY},
            "image/jpeg": {"schema": BINARY},
        },
        "description": "The decoded image.",
        "headers": DECOMPRESS_HEADERS,
    },
    400: error("bad_bitstream, model_mismatch or bad_request."),
    408: REQUEST_TIMEOUT,
    413: error(
        f"payload_too_large (body) or too_many_pixels (declared in the stream header); {TOO_LARGE_FOR_TIME}."
    ),
    415: error("unsupported_media_type."),
    422: error(
        "invalid_parameter: unknown format, or an explicit format that cannot hold the image's size "
        "(WebP sides are at most 16383 pixels, JPEG 65500; PNG holds any)."
    ),
    503: UNAVAILABLE,
}
COMPRESS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            **{media_type: {"schema": BINARY} for media_type in INPUT_MEDIA_TYPES},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"image": BINARY}, "required": ["image"]}
            },
        },
    }
}
DECOMPRESS_BODY = {
    "requestBody": {
        "required": True,
        "content": {BITSTREAM_MEDIA_TYPE: {"schema": BINARY}, "application/octet-stream": {"schema": BINARY}},
    }
}
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text format."}
}
READY_RESPONSES: dict[int | str, dict[str, Any]] = {503: error("Not ready (yet).", NotReadyBody)}
AUTH_RESPONSES: dict[str, dict[str, Any]] = {
    "401": {"description": "unauthorized: no or malformed 'Authorization: Bearer <key>'."},
    "403": {"description": "forbidden: the key is not valid."},
}


def add_security(schema: dict[str, Any], protected: set[str]) -> dict[str, Any]:
    """Declare bearer keys in an OpenAPI document: the scheme, and 401/403 on ``protected`` paths."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key of the service (api_keys / api_keys_file).",
    }
    error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for path, operations in schema.get("paths", {}).items():
        if path not in protected:
            continue
        for operation in operations.values():
            operation["security"] = [{"bearer": []}]
            for status, response in AUTH_RESPONSES.items():
                operation.setdefault("responses", {})[status] = {**response, "content": error_ref}
    return schema
