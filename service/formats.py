"""Output image formats of /decompress: choosing one (``format`` parameter or ``Accept``) and encoding."""

from __future__ import annotations

import io
from enum import StrEnum

import numpy as np
from PIL import Image


class OutputFormat(StrEnum):
    """Formats /decompress can return; the value is the ``format`` query parameter."""

    PNG = "png"
    WEBP = "webp"
    JPEG = "jpeg"

    @property
    def media_type(self) -> str:
        """The response Content-Type."""
        return f"image/{self.value}"


FORMAT_ALIASES = {
    "png": OutputFormat.PNG,
    "webp": OutputFormat.WEBP,
    "jpeg": OutputFormat.JPEG,
    "jpg": OutputFormat.JPEG,
}
"""Accepted values of the ``format`` query parameter."""
_MEDIA_TYPES = {fmt.media_type: fmt for fmt in OutputFormat} | {"image/jpg": OutputFormat.JPEG}
_WILDCARDS = ("*/*", "image/*")
DEFAULT_FORMAT = OutputFormat.PNG
PNG_COMPRESS_LEVEL = 1
"""zlib level for PNG output: level 1 is several times faster than the default 6, a little larger."""
LOSSY_QUALITY = 95
"""Quality of JPEG and WebP output (the decoded image is already lossy; keep it close)."""


def _parse_accept(accept: str) -> list[tuple[float, int, str]]:
    """(q, -position, media type) for each Accept entry."""
    entries = []
    for position, item in enumerate(accept.split(",")):
        media_type, *params = (part.strip() for part in item.split(";"))
        weight = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        if media_type and weight == weight and weight > 0:  # skips NaN and refused types
            entries.append((weight, -position, media_type.lower()))
    return entries


def negotiate(format_param: OutputFormat | None, accept: str | None) -> OutputFormat:
    """The explicit ``format`` wins; else the best supported type in ``Accept``; else PNG.

    Wildcards and unsupported types fall back to PNG (never 406: any client can read PNG).
    """
    if format_param is not None:
        return format_param
    if not accept:
        return DEFAULT_FORMAT
    for _, _, media_type in sorted(_parse_accept(accept), reverse=True):
        if media_type in _MEDIA_TYPES:
            return _MEDIA_TYPES[media_type]
        if media_type in _WILDCARDS:
            return DEFAULT_FORMAT
    return DEFAULT_FORMAT


def encode_image(image: np.ndarray, fmt: OutputFormat) -> bytes:
    """Encode uint8 RGB (H, W, 3) as ``fmt``."""
    buffer = io.BytesIO()
    pil_image = Image.fromarray(np.ascontiguousarray(image))
    if fmt is OutputFormat.PNG:
        pil_image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif fmt is OutputFormat.WEBP:
        pil_image.save(buffer, format="WEBP", quality=LOSSY_QUALITY, method=4)
    else:
        pil_image.save(buffer, format="JPEG", quality=LOSSY_QUALITY, subsampling=0)
    return buffer.getvalue()
