"""Output image formats of /decompress: choosing one (``format`` parameter or ``Accept``) and encoding.

Each encoder has a largest side (:data:`MAX_SIDE`). An explicit ``format`` that cannot hold the
decoded image is refused (:class:`FormatLimitError`, HTTP 422) before any decoding: the client named
exactly what it wants. A format negotiated from ``Accept`` is chosen among those that can hold the
image; the acceptable ones passed over are named in the ``X-Lalic-Format-Fallback`` header, and
PNG, which holds any size the service decodes, is the fallback.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from enum import StrEnum

import imagecodecs
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
LIBPNG_MAX_SIDE = 1_000_000
"""Widest or tallest image libpng writes (its default user limit); PNGs beyond it go through Pillow.
Below it PNG output goes through libpng (imagecodecs) with the SUB filter and zlib's RLE strategy:
about 0.45x Pillow's time at level 1 for a few percent more bytes (BENCHMARKS.md, "HTTP path")."""
LOSSY_QUALITY = 95
"""Quality of JPEG and WebP output (the decoded image is already lossy; keep it close)."""
MAX_SIDE = {
    OutputFormat.PNG: 2**31 - 1,
    OutputFormat.WEBP: 16383,
    OutputFormat.JPEG: 65500,
}
"""Largest width or height each encoder writes: PNG's 31-bit size fields, libwebp's
WEBP_MAX_DIMENSION and libjpeg's JPEG_MAX_DIMENSION (Pillow raises beyond them)."""
FORMAT_FALLBACK_HEADER = "X-Lalic-Format-Fallback"
"""Response header naming the acceptable formats passed over because they cannot hold the image."""


class FormatLimitError(ValueError):
    """The requested output format cannot hold an image of this size."""

    def __init__(self, fmt: OutputFormat, width: int, height: int) -> None:
        super().__init__(
            f"format={fmt.value} cannot hold a {width}x{height} image ({fmt.name} sides are at most "
            f"{MAX_SIDE[fmt]} pixels); ask for png, which holds any size"
        )
        self.format = fmt


@dataclass(frozen=True)
class Choice:
    """The negotiated output format, and the acceptable formats passed over for the image's size."""

    format: OutputFormat
    passed_over: tuple[OutputFormat, ...] = ()


def fits(fmt: OutputFormat, width: int, height: int) -> bool:
    """Whether ``fmt`` can hold a ``width`` x ``height`` image."""
    return max(width, height) <= MAX_SIDE[fmt]


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


def negotiate(format_param: OutputFormat | None, accept: str | None, width: int, height: int) -> Choice:
    """The format for a ``width`` x ``height`` image: the explicit ``format`` if given; else the best
    supported type in ``Accept`` that can hold the image; else PNG.

    Wildcards and unsupported types fall back to PNG (never 406: any client can read PNG).

    Raises:
        FormatLimitError: the explicit ``format`` (or, past every other choice, PNG) cannot hold it.
    """
    if format_param is not None:
        if not fits(format_param, width, height):
            raise FormatLimitError(format_param, width, height)
        return Choice(format_param)
    passed_over: list[OutputFormat] = []
    for _, _, media_type in sorted(_parse_accept(accept or ""), reverse=True):
        if media_type in _WILDCARDS:
            break
        fmt = _MEDIA_TYPES.get(media_type)
        if fmt is not None and fits(fmt, width, height):
            return Choice(fmt, tuple(passed_over))
        if fmt is not None and fmt not in passed_over:
            passed_over.append(fmt)
    if not fits(DEFAULT_FORMAT, width, height):
        raise FormatLimitError(DEFAULT_FORMAT, width, height)
    return Choice(DEFAULT_FORMAT, tuple(passed_over))


def encode_image(image: np.ndarray, fmt: OutputFormat) -> bytes:
    """Encode uint8 RGB (H, W, 3) as ``fmt``.

    Raises:
        FormatLimitError: ``fmt`` cannot hold the image (check with :func:`negotiate` first).
    """
    height, width = image.shape[:2]
    if not fits(fmt, width, height):
        raise FormatLimitError(fmt, width, height)
    image = np.ascontiguousarray(image)
    if fmt is OutputFormat.PNG and max(height, width) <= LIBPNG_MAX_SIDE:
        return imagecodecs.png_encode(
            image,
            level=PNG_COMPRESS_LEVEL,
            strategy=imagecodecs.PNG.STRATEGY.RLE,
            filter=imagecodecs.PNG.FILTER.SUB,
        )
    buffer = io.BytesIO()
    pil_image = Image.fromarray(image)
    if fmt is OutputFormat.PNG:
        pil_image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif fmt is OutputFormat.WEBP:
        pil_image.save(buffer, format="WEBP", quality=LOSSY_QUALITY, method=4)
    else:
        pil_image.save(buffer, format="JPEG", quality=LOSSY_QUALITY, subsampling=0)
    return buffer.getvalue()
