"""Self-describing LALIC container: one per image, a header plus the entropy-coded streams.

Layout (all integers little-endian; ``L`` = model id length, ``N`` = number of streams):

====================  ==========  ==============================================================
offset                size        field
====================  ==========  ==============================================================
0                     4           magic ``b"LALC"``
4                     1           format version (u8): 2 (``FORMAT_VERSION``, written) or 1
                                  (still read); see "Versions" below
5                     1           flags (u8): bits 0-1 the orientation the image was coded in
                                  (bit 0 mirrored left-right, bit 1 flipped top-bottom; the
                                  decoder flips the image back), bits 2-7 must be 0
6                     1           ``L``, model id length (u8), 1..32
7                     L           model id, printable ASCII
7+L                   8           weights digest (short sha256 of the weights)
15+L                  4           quality (float32), finite, 1.0..6.0
19+L                  2+2         image height, width (u16 each), 1..65535
23+L                  2+2+2       y_shape: channels, h, w (u16 each)
29+L                  2+2+2       z_shape: channels, h, w (u16 each)
35+L                  2+2+2       tiling: tile_h, tile_w, overlap in pixels (u16 each)
41+L                  4           symbol CRC32 (u32) of the encoder's symbols
45+L                  2           ``N``, number of streams (u16)
47+L                  4*N         length of each stream in bytes (u32 each)
47+L+4N               4           payload CRC32 (u32) over all streams concatenated
51+L+4N               4           header CRC32 (u32) over bytes 4 .. 51+L+4N (everything after
                                  the magic up to here, the payload CRC included)
55+L+4N               sum(len)    the streams, concatenated; nothing may follow
====================  ==========  ==============================================================

Versions: the layout is the same; the version says how the entropy parameters (the coding
distributions) were computed. Version 1: in float32 by the networks of the chosen backend, so a
stream decodes only where the arithmetic matches the encoder's (other CPUs and backends refuse it
by its symbol checksum). Version 2: by :mod:`model.exact` (``EXACT_PATH_VERSION`` 1), the same bits
on every CPU, backend and device. Decoders that read only version 1 refuse version 2 with
"unsupported format version 2".

Flags were all zero until 2026-12-06 (the orientation was added without a version bump): older
decoders refuse any stream whose flags are not zero, with a clear error, and streams with zero
flags are read the same way by both.

Latent shapes are only bounded (channels 1..4096, spatial dims 1..65535, ``c*h*w`` within the
pixel limit), not tied to the image size.  Tiling is either all zeros (whole image) or positive
tile sizes with ``overlap < min(tile_h, tile_w)``.

:func:`unpack` and :func:`read_header` raise :class:`BitstreamError` (and nothing else) for any
malformed, truncated, oversized or inconsistent input, before allocating anything large.
"""

from __future__ import annotations

import math
import operator
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "FLOAT_PATH_VERSION",
    "FORMAT_VERSION",
    "MAGIC",
    "READ_VERSIONS",
    "ORIENTATIONS",
    "BitstreamError",
    "Container",
    "Header",
    "ModelMismatchError",
    "PixelLimitError",
    "pack",
    "read_header",
    "symbols_crc32",
    "unpack",
]

MAGIC = b"LALC"
FORMAT_VERSION = 2
"""The version this code writes: entropy parameters by the reproducible path of :mod:`model.exact`."""
FLOAT_PATH_VERSION = 1
"""Streams whose entropy parameters came from the float32 networks (read, no longer written)."""
READ_VERSIONS = (FLOAT_PATH_VERSION, FORMAT_VERSION)

ORIENTATIONS = (0, 1, 2, 3)
"""The orientations a stream can record: 0 as is, 1 mirrored left-right, 2 flipped top-bottom,
3 both (turned 180 degrees). Each is its own inverse (:func:`model.image.flip`)."""
_ORIENTATION_BITS = 0x03

MAX_MODEL_ID = 32
MAX_CHANNELS = 4096
MAX_DIM = 65535
MAX_STREAMS = 65535  # format limit (u16); unpack's max_streams is usually much lower
MIN_QUALITY, MAX_QUALITY = 1.0, 6.0
DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_STREAMS = 64

_PREFIX = struct.Struct("<4sBBB")  # magic, version, flags, model id length
_FIXED = struct.Struct("<8sf2H3H3H3HIH")  # digest .. number of streams
_CRCS = struct.Struct("<II")  # payload CRC, header CRC
_U32_MAX = 0xFFFFFFFF


class BitstreamError(ValueError):
    """The one documented exception for every malformed, truncated, oversized or inconsistent stream."""


@dataclass(frozen=True, kw_only=True)
class Header:
    """Everything the decoder needs besides the coded streams (validated on construction).

    ``quality`` is rounded to float32 on construction, so it survives a round trip exactly.
    ``orientation`` is the flip (:data:`ORIENTATIONS`) the encoder applied before coding;
    ``height`` and ``width`` are those of the image either way (flips keep the shape).
    ``version`` is the container version (:data:`READ_VERSIONS`), which names the arithmetic of
    the entropy parameters.
    Raises :class:`BitstreamError` if any field is out of range.
    """

    model_id: str
    weights_digest: bytes
    quality: float
    height: int
    width: int
    y_shape: tuple[int, int, int]
    z_shape: tuple[int, int, int]
    tiling: tuple[int, int, int] = (0, 0, 0)
    symbol_crc32: int
    orientation: int = 0
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        set_field = object.__setattr__  # frozen dataclass: normalise fields in place
        set_field(self, "model_id", _check_model_id(self.model_id))
        set_field(self, "weights_digest", _check_digest(self.weights_digest))
        set_field(self, "quality", _check_quality(self.quality))
        set_field(self, "height", _check_int("height", self.height, 1, MAX_DIM))
        set_field(self, "width", _check_int("width", self.width, 1, MAX_DIM))
        set_field(self, "y_shape", _check_shape("y_shape", self.y_shape))
        set_field(self, "z_shape", _check_shape("z_shape", self.z_shape))
        set_field(self, "tiling", _check_tiling(self.tiling))
        set_field(self, "symbol_crc32", _check_int("symbol_crc32", self.symbol_crc32, 0, _U32_MAX))
        set_field(self, "orientation", _check_int("orientation", self.orientation, 0, ORIENTATIONS[-1]))
        set_field(self, "version", _check_version(self.version))

    @property
    def pixels(self) -> int:
        """Number of pixels of the original image."""
        return self.height * self.width


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool | float):
        raise BitstreamError(f"{name} must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise BitstreamError(f"{name} must be an integer, got {type(value).__name__}") from None
    if not low <= number <= high:
        raise BitstreamError(f"{name} must be in {low}..{high}, got {number}")
    return number


def _check_version(value: Any) -> int:
    number = _check_int("version", value, 0, 255)
    if number not in READ_VERSIONS:
        raise BitstreamError(f"unsupported format version {number} (this decoder reads {READ_VERSIONS})")
    return number


def _check_model_id(value: Any) -> str:
    if not isinstance(value, str):
        raise BitstreamError(f"model_id must be a str, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_MODEL_ID or not all(" " <= ch <= "~" for ch in value):
        raise BitstreamError(f"model_id must be 1..{MAX_MODEL_ID} printable ASCII characters, got {value!r}")
    return value


def _check_digest(value: Any) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview) or len(bytes(value)) != 8:
        raise BitstreamError(f"weights_digest must be 8 bytes, got {value!r:.40}")
    return bytes(value)


def _check_quality(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise BitstreamError(f"quality must be a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or not MIN_QUALITY <= number <= MAX_QUALITY:
        raise BitstreamError(f"quality must be finite and in {MIN_QUALITY}..{MAX_QUALITY}, got {number}")
    return float(np.float32(number))


def _check_triple(name: str, value: Any) -> tuple[Any, Any, Any]:
    try:
        items = tuple(value)
    except TypeError:
        raise BitstreamError(f"{name} must be a 3-tuple of integers, got {value!r}") from None
    if len(items) != 3:
        raise BitstreamError(f"{name} must have 3 entries, got {len(items)}")
    return items[0], items[1], items[2]


def _check_shape(name: str, value: Any) -> tuple[int, int, int]:
    c, h, w = _check_triple(name, value)
    return (
        _check_int(f"{name} channels", c, 1, MAX_CHANNELS),
        _check_int(f"{name} height", h, 1, MAX_DIM),
        _check_int(f"{name} width", w, 1, MAX_DIM),
    )


def _check_tiling(value: Any) -> tuple[int, int, int]:
    th, tw, overlap = (_check_int("tiling", v, 0, MAX_DIM) for v in _check_triple("tiling", value))
    if (th, tw, overlap) != (0, 0, 0) and not (th > 0 and tw > 0 and overlap < min(th, tw)):
        raise BitstreamError(
            "tiling must be (0, 0, 0) or positive tile sizes with overlap < tile size, "
            f"got {(th, tw, overlap)}"
        )
    return th, tw, overlap


class PixelLimitError(BitstreamError):
    """A well-formed header whose image has more pixels than the limit (the service answers 413)."""

    def __init__(self, header: Header, max_pixels: int) -> None:
        super().__init__(f"image has {header.pixels} elements, above the limit of {max_pixels}")
        self.header = header
        self.max_pixels = max_pixels


class ModelMismatchError(BitstreamError):
    """A well-formed stream made by another model or by other weights than the decoder's."""


class Container(NamedTuple):
    """A parsed container: its header and its coded streams (what :func:`unpack` returns)."""

    header: Header
    streams: list[bytes]


def _check_limits(header: Header, max_pixels: int) -> None:
    if header.pixels > max_pixels:
        raise PixelLimitError(header, max_pixels)
    for name, count in (("y latent", math.prod(header.y_shape)), ("z latent", math.prod(header.z_shape))):
        if count > max_pixels:
            raise BitstreamError(f"{name} has {count} elements, above the limit of {max_pixels}")


def pack(header: Header, streams: list[bytes]) -> bytes:
    """Serialise ``header`` and the coded ``streams`` into one container.

    Raises:
        BitstreamError: a field or stream cannot be represented in the format.
    """
    if not isinstance(header, Header):
        raise BitstreamError(f"header must be a Header, got {type(header).__name__}")
    chunks = [bytes(s) for s in streams]
    if len(chunks) > MAX_STREAMS:
        raise BitstreamError(f"at most {MAX_STREAMS} streams fit in the format, got {len(chunks)}")
    if any(len(c) > _U32_MAX for c in chunks):
        raise BitstreamError("a stream is longer than 2**32 - 1 bytes")
    model_id = header.model_id.encode("ascii")
    body = b"".join(
        (
            _PREFIX.pack(MAGIC, header.version, header.orientation, len(model_id)),
            model_id,
            _FIXED.pack(
                header.weights_digest,
                header.quality,
                header.height,
                header.width,
                *header.y_shape,
                *header.z_shape,
                *header.tiling,
                header.symbol_crc32,
                len(chunks),
            ),
            struct.pack(f"<{len(chunks)}I", *(len(c) for c in chunks)),
        )
    )
    payload_crc = _crc_chunks(chunks)
    header_crc = zlib.crc32(struct.pack("<I", payload_crc), zlib.crc32(body[len(MAGIC) :]))
    return b"".join((body, _CRCS.pack(payload_crc, header_crc), *chunks))


def _crc_chunks(chunks: Iterable[bytes | memoryview]) -> int:
    crc = 0
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
    return crc


def _parse_header(data: Any, max_pixels: int, max_streams: int) -> tuple[Header, list[int], int, int]:
    """Parse and validate the header; returns (header, stream lengths, payload CRC, payload offset)."""
    try:
        buf = memoryview(data).cast("B")
    except TypeError:
        raise BitstreamError(f"expected a bytes-like object, got {type(data).__name__}") from None
    if len(buf) < len(MAGIC) or buf[: len(MAGIC)] != MAGIC:
        raise BitstreamError("not a LALIC stream (bad magic)")
    if len(buf) < _PREFIX.size:
        raise BitstreamError("truncated header")
    _, version, flags, id_len = _PREFIX.unpack_from(buf, 0)
    _check_version(version)
    if flags & ~_ORIENTATION_BITS:
        raise BitstreamError(f"unsupported flags 0x{flags:02x} (only bits 0-1, the orientation, are defined)")
    if not 1 <= id_len <= MAX_MODEL_ID:
        raise BitstreamError(f"model id length {id_len} not in 1..{MAX_MODEL_ID}")
    pos = _PREFIX.size + id_len
    if len(buf) < pos + _FIXED.size:
        raise BitstreamError("truncated header")
    model_id_bytes = bytes(buf[_PREFIX.size : pos])
    fields = _FIXED.unpack_from(buf, pos)
    pos += _FIXED.size
    n_streams = fields[-1]
    if n_streams > max_streams:
        raise BitstreamError(f"{n_streams} streams declared, above the limit of {max_streams}")
    if len(buf) < pos + 4 * n_streams + _CRCS.size:
        raise BitstreamError("truncated header (stream lengths)")
    lengths = list(struct.unpack_from(f"<{n_streams}I", buf, pos))
    pos += 4 * n_streams
    payload_crc, header_crc = _CRCS.unpack_from(buf, pos)
    if zlib.crc32(buf[len(MAGIC) : pos + 4]) != header_crc:
        raise BitstreamError("header CRC mismatch (corrupted header)")
    pos += _CRCS.size

    if not all(0x20 <= b <= 0x7E for b in model_id_bytes):
        raise BitstreamError("model id is not printable ASCII")
    digest, quality, height, width = fields[:4]
    header = Header(
        model_id=model_id_bytes.decode("ascii"),
        weights_digest=digest,
        quality=quality,
        height=height,
        width=width,
        y_shape=fields[4:7],
        z_shape=fields[7:10],
        tiling=fields[10:13],
        symbol_crc32=fields[13],
        orientation=flags & _ORIENTATION_BITS,
        version=version,
    )
    _check_limits(header, max_pixels)
    return header, lengths, payload_crc, pos


def read_header(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_streams: int = DEFAULT_MAX_STREAMS
) -> Header:
    """Parse and validate only the header (up to and including the header CRC).

    ``data`` may be just a prefix of a container; the payload is neither read nor checked, so use
    :func:`unpack` before trusting the streams.

    Raises:
        BitstreamError: anything wrong with the header, or a limit exceeded.
    """
    return _parse_header(data, max_pixels, max_streams)[0]


def unpack(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_streams: int = DEFAULT_MAX_STREAMS
) -> Container:
    """Parse a whole container strictly: header, stream lengths, payload size and both CRCs.

    Args:
        data: the container bytes.
        max_pixels: limit on the image's ``height * width`` and on each latent's ``c * h * w``.
        max_streams: limit on the number of streams.

    Raises:
        PixelLimitError: a well-formed header declares an image above ``max_pixels``.
        BitstreamError: anything malformed, truncated, trailing, oversized or inconsistent.
    """
    header, lengths, payload_crc, pos = _parse_header(data, max_pixels, max_streams)
    buf = memoryview(data).cast("B")
    available = len(buf) - pos
    declared = sum(lengths)
    if declared > available:
        raise BitstreamError(f"streams declare {declared} bytes but only {available} follow the header")
    if declared < available:
        raise BitstreamError(f"{available - declared} trailing bytes after the streams")
    views = []
    for length in lengths:
        views.append(buf[pos : pos + length])
        pos += length
    if _crc_chunks(views) != payload_crc:
        raise BitstreamError("payload CRC mismatch (corrupted streams)")
    return Container(header, [bytes(v) for v in views])


def symbols_crc32(arrays: Iterable[np.ndarray]) -> int:
    """CRC32 over the int32 little-endian bytes of each array, in order (C order within an array).

    Raises:
        ValueError: an array is not integer or holds values outside int32.
    """
    crc = 0
    for array in arrays:
        a = np.asarray(array)
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"symbols must be integers, got {a.dtype}")
        if a.dtype != np.dtype("<i4"):
            if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
                raise ValueError("symbols must fit in int32")
            a = a.astype("<i4")
        crc = zlib.crc32(np.ascontiguousarray(a).data.cast("B"), crc)
    return crc
