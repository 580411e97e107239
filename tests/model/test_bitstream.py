"""Tests for model.bitstream: the LALIC container format and its strict parser."""

from __future__ import annotations

import dataclasses
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.bitstream import (
    FORMAT_VERSION,
    MAGIC,
    BitstreamError,
    Container,
    Header,
    PixelLimitError,
    pack,
    read_header,
    symbols_crc32,
    unpack,
)

HEADER = Header(
    model_id="lalic-s",
    weights_digest=bytes(range(8)),
    quality=3.7,
    height=500,
    width=333,
    y_shape=(320, 32, 21),
    z_shape=(192, 8, 6),
    tiling=(256, 256, 32),
    symbol_crc32=0xDEADBEEF,
)
STREAMS = [b"z-stream", b"", b"y" * 40]
VALID = pack(HEADER, STREAMS)

ID_LEN = len(HEADER.model_id)
DIGEST_AT = 7 + ID_LEN
N_STREAMS_AT = 45 + ID_LEN
LENGTHS_AT = 47 + ID_LEN
PAYLOAD_AT = LENGTHS_AT + 4 * len(STREAMS) + 8


def refresh_crcs(raw: bytearray, n_streams: int) -> bytes:
    """Recompute both CRCs after a deliberate edit, so a test reaches the check behind them."""
    crc_at = LENGTHS_AT + 4 * n_streams
    payload_crc = zlib.crc32(bytes(raw[crc_at + 8 :]))
    struct.pack_into("<I", raw, crc_at, payload_crc)
    struct.pack_into("<I", raw, crc_at + 4, zlib.crc32(bytes(raw[4 : crc_at + 4])))
    return bytes(raw)


def edited(offset: int, fmt: str, value: object) -> bytes:
    raw = bytearray(VALID)
    struct.pack_into(fmt, raw, offset, value)
    return refresh_crcs(raw, len(STREAMS))


def parses_or_rejects(data: bytes, **limits: int) -> None:
    """Any input either parses or raises BitstreamError: no other exception escapes."""
    try:
        header, streams = unpack(data, **limits)
    except BitstreamError as exc:
        assert str(exc)
        return
    assert isinstance(header, Header) and all(isinstance(s, bytes) for s in streams)


# --- round trip -----------------------------------------------------------------------------------


def test_round_trip() -> None:
    header, streams = unpack(VALID)
    assert header == HEADER
    assert streams == STREAMS
    assert read_header(VALID) == HEADER
    assert read_header(VALID[:PAYLOAD_AT]) == HEADER  # a prefix is enough for the header
    assert VALID.startswith(MAGIC) and VALID[4] == FORMAT_VERSION
    assert len(VALID) == PAYLOAD_AT + sum(map(len, STREAMS))


def test_quality_stored_as_float32() -> None:
    assert HEADER.quality == float(np.float32(3.7))
    assert unpack(VALID)[0].quality == HEADER.quality


def test_defaults_and_no_streams() -> None:
    header = dataclasses.replace(HEADER, tiling=(0, 0, 0))
    assert Header(**{**dataclasses.asdict(header), "tiling": (0, 0, 0)}) == header
    assert unpack(pack(header, [])) == (header, [])


# --- header validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("model_id", ""),
        ("model_id", "x" * 33),
        ("model_id", "lalic-ß"),
        ("model_id", "tab\there"),
        ("model_id", 5),
        ("weights_digest", b"1234567"),
        ("weights_digest", "12345678"),
        ("quality", 0.5),
        ("quality", 6.5),
        ("quality", float("nan")),
        ("quality", float("inf")),
        ("quality", "3"),
        ("height", 0),
        ("width", 65536),
        ("height", 2.0),
        ("height", True),
        ("y_shape", (0, 4, 4)),
        ("y_shape", (4097, 4, 4)),
        ("z_shape", (4, 65536, 4)),
        ("z_shape", (4, 4)),
        ("y_shape", None),
        ("tiling", (256, 0, 0)),
        ("tiling", (0, 0, 8)),
        ("tiling", (64, 64, 64)),
        ("symbol_crc32", -1),
        ("symbol_crc32", 2**32),
    ],
)
def test_header_rejects_bad_fields(field: str, value: object) -> None:
    with pytest.raises(BitstreamError):
        dataclasses.replace(HEADER, **{field: value})


def test_header_accepts_numpy_scalars() -> None:
    header = dataclasses.replace(
        HEADER, height=np.int64(500), y_shape=np.array([320, 32, 21]), quality=np.float32(3.7)
    )
    assert header == HEADER
    assert type(header.height) is int and type(header.y_shape) is tuple


def mostly_valid(valid: st.SearchStrategy, wild: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(valid, valid, valid, valid, wild)


DIM = mostly_valid(st.integers(1, 65535), st.integers(-5, 70_000))
SHAPE = st.tuples(mostly_valid(st.integers(1, 4096), st.integers(-1, 5000)), DIM, DIM)


@settings(max_examples=200, deadline=None)
@given(
    model_id=mostly_valid(
        st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=32),
        st.text(max_size=40),
    ),
    quality=mostly_valid(st.floats(1.0, 6.0), st.floats(allow_nan=True, allow_infinity=True)),
    height=DIM,
    width=DIM,
    y_shape=SHAPE,
    tiling=st.tuples(DIM, DIM, mostly_valid(st.integers(0, 64), st.integers(0, 70_000))),
    crc=mostly_valid(st.integers(0, 2**32 - 1), st.integers(-(2**40), 2**40)),
)
def test_random_header_fields(
    model_id: str,
    quality: float,
    height: int,
    width: int,
    y_shape: tuple[int, int, int],
    tiling: tuple[int, int, int],
    crc: int,
) -> None:
    try:
        header = Header(
            model_id=model_id,
            weights_digest=b"\x00" * 8,
            quality=quality,
            height=height,
            width=width,
            y_shape=y_shape,
            z_shape=(8, 2, 2),
            tiling=tiling,
            symbol_crc32=crc,
        )
    except BitstreamError:
        return
    data = pack(header, [b"abc"])
    try:
        assert unpack(data, max_pixels=10**12) == (header, [b"abc"])
    except BitstreamError as exc:
        assert "limit" in str(exc)
    parses_or_rejects(data)


@settings(max_examples=300, deadline=None)
@given(fields=st.binary(min_size=40, max_size=40), id_len=st.integers(0, 255))
def test_random_header_bytes_with_valid_crc(fields: bytes, id_len: int) -> None:
    raw = bytearray(VALID)
    raw[DIGEST_AT : DIGEST_AT + 38] = fields[:38]  # every fixed field but the stream count
    raw[6] = id_len
    parses_or_rejects(refresh_crcs(raw, len(STREAMS)))


# --- malformed streams ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes(data: bytes) -> None:
    parses_or_rejects(data)
    parses_or_rejects(MAGIC + bytes([FORMAT_VERSION]) + data)


def test_every_truncation_and_trailing_bytes() -> None:
    for n in range(len(VALID)):
        with pytest.raises(BitstreamError):
            unpack(VALID[:n])
    with pytest.raises(BitstreamError, match="trailing"):
        unpack(VALID + b"\x00")


def test_every_bit_flip() -> None:
    for pos in range(len(VALID)):
        for bit in range(8):
            flipped = bytearray(VALID)
            flipped[pos] ^= 1 << bit
            with pytest.raises(BitstreamError):
                unpack(bytes(flipped))


def test_wrong_magic_version_flags() -> None:
    with pytest.raises(BitstreamError, match="magic"):
        unpack(b"LALD" + VALID[4:])
    with pytest.raises(BitstreamError, match="version"):
        unpack(edited(4, "<B", FORMAT_VERSION + 1))
    for flags in (0x04, 0x80, 0xFF):  # bits 0-1 are the orientation; the others are undefined
        with pytest.raises(BitstreamError, match="flags"):
            unpack(edited(5, "<B", flags))
    with pytest.raises(BitstreamError, match="CRC"):
        unpack(VALID[:-1] + bytes([VALID[-1] ^ 1]))


def test_orientation_lives_in_the_flags_byte() -> None:
    assert VALID[5] == 0 and HEADER.orientation == 0  # streams without a flip: flags stay 0
    for orientation in (1, 2, 3):
        data = pack(dataclasses.replace(HEADER, orientation=orientation), STREAMS)
        assert data[5] == orientation
        assert data == edited(5, "<B", orientation)  # only the flags byte and the CRCs differ
        header, streams = unpack(data)
        assert header == dataclasses.replace(HEADER, orientation=orientation) and streams == STREAMS
    for bad in (-1, 4, 1.0, True, None):
        with pytest.raises(BitstreamError, match="orientation"):
            dataclasses.replace(HEADER, orientation=bad)


def test_non_bytes_input() -> None:
    for bad in ("LALC", None, 12, [1, 2]):
        with pytest.raises(BitstreamError):
            unpack(bad)  # type: ignore[arg-type]
    assert unpack(bytearray(VALID)) == unpack(memoryview(VALID)) == (HEADER, STREAMS)


def test_non_ascii_model_id_with_valid_crc() -> None:
    with pytest.raises(BitstreamError, match="ASCII"):
        unpack(edited(7, "<B", 0xC3))


@pytest.mark.parametrize(
    "offset,fmt,value,match",
    [
        (DIGEST_AT + 8, "<f", float("nan"), "quality"),
        (DIGEST_AT + 8, "<f", 100.0, "quality"),
        (DIGEST_AT + 12, "<H", 0, "height"),
        (DIGEST_AT + 16, "<H", 5000, "channels"),
        (DIGEST_AT + 18, "<H", 0, "y_shape"),
        (DIGEST_AT + 28, "<H", 7, "tiling"),
        (6, "<B", 0, "model id length"),
        (6, "<B", 200, "model id length"),
    ],
)
def test_inconsistent_fields_with_valid_crc(offset: int, fmt: str, value: object, match: str) -> None:
    with pytest.raises(BitstreamError, match=match):
        unpack(edited(offset, fmt, value))


def test_pixel_and_stream_limits() -> None:
    with pytest.raises(BitstreamError, match="limit"):
        unpack(VALID, max_pixels=100_000)  # 500 * 333 pixels
    with pytest.raises(BitstreamError, match="limit"):
        read_header(VALID, max_streams=2)
    big = dataclasses.replace(HEADER, height=65535, width=65535)
    with pytest.raises(BitstreamError, match="image"):
        unpack(pack(big, []))
    fat_latent = dataclasses.replace(HEADER, y_shape=(4096, 2000, 2000))
    with pytest.raises(BitstreamError, match="y latent") as latent:
        unpack(pack(fat_latent, []))
    assert not isinstance(latent.value, PixelLimitError)


def test_an_image_over_the_pixel_limit_carries_its_header() -> None:
    """The one limit a client can fix by sending a smaller image: the service answers 413 from the
    header this error carries, without parsing the stream a second time."""
    for parse in (unpack, read_header):
        with pytest.raises(PixelLimitError, match="image has 166500 elements") as error:
            parse(VALID, max_pixels=166_499)
        assert error.value.header == HEADER and error.value.max_pixels == 166_499
    assert read_header(VALID, max_pixels=215_040) == HEADER  # the y latent (320x32x21) is the larger


def test_unpack_returns_a_container() -> None:
    container = unpack(VALID)
    assert isinstance(container, Container)
    assert container.header == HEADER and container == (HEADER, container.streams)
    assert pack(*container) == VALID


def test_huge_declared_sizes_rejected_quickly() -> None:
    cases = [
        edited(LENGTHS_AT, "<I", 2**32 - 1),
        edited(LENGTHS_AT + 8, "<I", 2**32 - 1),
        edited(N_STREAMS_AT, "<H", 65535),
        edited(N_STREAMS_AT, "<H", 64),
    ]
    for data in cases:
        t0 = time.perf_counter()
        with pytest.raises(BitstreamError):
            unpack(data)
        assert time.perf_counter() - t0 < 0.05
    t0 = time.perf_counter()
    with pytest.raises(BitstreamError, match="only"):
        unpack(edited(LENGTHS_AT, "<I", 2**32 - 1))
    with pytest.raises(BitstreamError, match="limit"):
        unpack(edited(N_STREAMS_AT, "<H", 65535), max_streams=64)
    assert time.perf_counter() - t0 < 0.05


def test_pack_rejects_bad_arguments() -> None:
    with pytest.raises(BitstreamError):
        pack("not a header", [])  # type: ignore[arg-type]
    with pytest.raises(BitstreamError):
        pack(HEADER, [b""] * 65536)


# --- symbol checksum ------------------------------------------------------------------------------


def test_symbols_crc32() -> None:
    rng = np.random.default_rng(0)
    z = rng.integers(-100, 100, (192, 4, 4)).astype(np.int32)
    y = rng.integers(-100, 100, (320, 8, 8)).astype(np.int32)
    base = symbols_crc32([z, y])
    assert base == zlib.crc32(y.astype("<i4").tobytes(), zlib.crc32(z.astype("<i4").tobytes()))
    assert symbols_crc32([z.astype(np.int64), y.astype(np.int16)]) == base  # any int dtype, same values
    assert symbols_crc32([y, z]) != base  # order matters
    for index in [(0, 0, 0), (191, 3, 3), (100, 2, 1)]:
        changed = z.copy()
        changed[index] += 1
        assert symbols_crc32([changed, y]) != base
    assert symbols_crc32([]) == 0 == symbols_crc32([np.zeros(0, np.int32)])
    assert symbols_crc32([np.asfortranarray(y)]) == symbols_crc32([y])  # C order regardless of layout
    with pytest.raises(ValueError):
        symbols_crc32([np.array([2**40])])
    with pytest.raises(ValueError):
        symbols_crc32([np.zeros(3, np.float32)])
