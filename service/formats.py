"""Output image formats of /decompress: choosing one (``format`` parameter or ``Accept``) and encoding.

Each encoder has a largest side (:data:`MAX_SIDE`). An explicit ``format`` that cannot hold the
decoded image is refused (:class:`FormatLimitError`, HTTP 422) before any decoding: the client named
exactly what it wants. A format negotiated from ``Accept`` is chosen among those that can hold the
image; the acceptable ones passed over are named in the ``X-Lalic-Format-Fallback`` header, and
PNG, which holds any size the service decodes, is the fallback.
"""

from __future__ import annotations

import io
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from itertools import pairwise

import numpy as np
from isal import isal_zlib
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
PNG_COMPRESS_LEVEL = 3
"""ISA-L's deflate level (0 to 3) for PNG output (:func:`encode_png`): its highest, 2 % fewer bytes
than its level 1 on Kodak for 0.2-0.4 ms more per image, and still faster than zlib's level 1."""
PNG_PARTS = 2
"""Parts of a large PNG's rows deflated at once, on as many threads (this machine's two cores are
idle once the codec has finished)."""
PNG_PART_MIN_BYTES = 1 << 18
"""Filtered rows below this size are deflated in one part (a thread hand-off costs more than it
saves)."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IDAT_BYTES = 1 << 24
"""Largest IDAT chunk written (PNG allows 2**31 - 1; smaller chunks keep each CRC pass in cache)."""
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


def _png_chunk(kind: bytes, data: bytes | memoryview) -> bytes:
    """One PNG chunk: length, type, data and the CRC-32 of type and data."""
    crc = isal_zlib.crc32(data, isal_zlib.crc32(kind))
    return b"".join((struct.pack(">I", len(data)), kind, data, struct.pack(">I", crc)))


def png_filtered_rows(image: np.ndarray) -> np.ndarray:
    """The rows of a uint8 (H, W, C) image as PNG stores them before compression, each with the SUB
    filter (PNG spec. Sec. 9.2: each byte minus the byte one pixel to its left, modulo 256):
    (H, 1 + W C) uint8, the filter type first."""
    height, width, channels = image.shape
    rows = np.empty((height, width * channels + 1), dtype=np.uint8)
    rows[:, 0] = 1  # filter type 1: SUB
    flat = image.reshape(height, width * channels)
    rows[:, 1 : 1 + channels] = flat[:, :channels]
    np.subtract(flat[:, channels:], flat[:, :-channels], out=rows[:, 1 + channels :])
    return rows


def png_file(width: int, height: int, stream: bytes | memoryview) -> bytes:
    """An 8-bit truecolour PNG around the zlib ``stream`` of its filtered rows."""
    stream = memoryview(stream)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    idat = (
        _png_chunk(b"IDAT", stream[start : start + PNG_IDAT_BYTES])
        for start in range(0, max(len(stream), 1), PNG_IDAT_BYTES)
    )
    return b"".join((PNG_SIGNATURE, _png_chunk(b"IHDR", header), *idat, _png_chunk(b"IEND", b"")))


_deflate_pool = ThreadPoolExecutor(max_workers=max(1, PNG_PARTS - 1), thread_name_prefix="png-deflate")
"""Deflates the runs before the last (:func:`deflate_rows`); its thread starts at the first use."""


def _raw_deflate(data: memoryview, last: bool) -> bytes:
    """Raw DEFLATE blocks of ``data``: the final ones (``last``), or ending in a sync flush (an empty
    stored block: byte-aligned, not final) that further blocks may follow (RFC 1951 Sec. 3.2.3)."""
    compressor = isal_zlib.compressobj(PNG_COMPRESS_LEVEL, isal_zlib.DEFLATED, -15)
    head = compressor.compress(data)
    return head + compressor.flush(isal_zlib.Z_FINISH if last else isal_zlib.Z_SYNC_FLUSH)


def deflate_rows(rows: np.ndarray) -> bytes:
    """One zlib stream (RFC 1950) of the bytes of ``rows`` (2-D uint8), by ISA-L (isal) at
    :data:`PNG_COMPRESS_LEVEL`.

    Large inputs are cut into :data:`PNG_PARTS` runs of whole rows deflated at once on threads (the
    library releases the GIL), each run's blocks ending in a sync flush except the last's, so that
    they join into one DEFLATE stream (pigz's method; a run's matches never reach into an earlier
    run); the Adler-32 of all the bytes closes the stream."""
    data = memoryview(np.ascontiguousarray(rows).reshape(-1))  # flat uint8 (also when empty)
    if data.nbytes < PNG_PART_MIN_BYTES or PNG_PARTS < 2 or rows.shape[0] < PNG_PARTS:
        return isal_zlib.compress(data, PNG_COMPRESS_LEVEL)
    cuts = [rows.shape[1] * (rows.shape[0] * i // PNG_PARTS) for i in range(PNG_PARTS + 1)]
    parts = [data[lo:hi] for lo, hi in pairwise(cuts)]
    pending = [_deflate_pool.submit(_raw_deflate, part, False) for part in parts[:-1]]
    tail = _raw_deflate(parts[-1], True)
    checksum = struct.pack(">I", isal_zlib.adler32(data))
    return b"".join((b"\x78\x01", *(job.result() for job in pending), tail, checksum))


def encode_png(image: np.ndarray) -> bytes:
    """8-bit RGB PNG of a uint8 (H, W, 3) image: SUB-filtered rows (:func:`png_filtered_rows`)
    deflated by :func:`deflate_rows` (ISA-L, two threads for large images): about a third of the
    time of libdeflate's level 1 on one thread, 1 % more bytes (BENCHMARKS.md, "g_s's last layer as
    one kernel, and PNG on two threads")."""
    height, width, _ = image.shape
    return png_file(width, height, deflate_rows(png_filtered_rows(image)))


def encode_image(image: np.ndarray, fmt: OutputFormat) -> bytes:
    """Encode uint8 RGB (H, W, 3) as ``fmt``.

    Raises:
        FormatLimitError: ``fmt`` cannot hold the image (check with :func:`negotiate` first).
    """
    height, width = image.shape[:2]
    if not fits(fmt, width, height):
        raise FormatLimitError(fmt, width, height)
    image = np.ascontiguousarray(image)
    if fmt is OutputFormat.PNG:
        return encode_png(image)
    buffer = io.BytesIO()
    pil_image = Image.fromarray(image)
    if fmt is OutputFormat.WEBP:
        pil_image.save(buffer, format="WEBP", quality=LOSSY_QUALITY, method=4)
    else:
        pil_image.save(buffer, format="JPEG", quality=LOSSY_QUALITY, subsampling=0)
    return buffer.getvalue()
