"""Hostile and unusual images through HTTP: each gets its documented 4xx or a correct result, never a 500.

A correct result means: the declared size is the image's size after the documented rules
(model.image: EXIF orientation applied, first frame of animations, alpha composited on white,
16-bit scaled to 8 bits, palettes expanded), the bitstream is byte-identical to what the codec
gives in-process for ``model.image.to_rgb`` of the same file, and /decompress returns what the
codec decodes from it. Where a case pins the rule itself (rotation, white background, first
frame, ``>> 8``), the expected pixels are also built independently of ``to_rgb``.

Cases already covered elsewhere are not repeated: the 100000x100000 PNG and the 2100x2000 PNG over
the limit, plain truncated PNG, garbage, GIF sent as PNG (tests/service/test_http_errors.py),
plain L/LA/RGBA/P dimensions (test_http_roundtrip.py), and mangled bytes in-process (test_images.py).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, features

from model.image import to_rgb
from service.images import PILLOW_FORMATS
from tests.service.helpers import (
    LALIC,
    Server,
    assert_error,
    decode,
    encode,
    jpeg_declaring,
    ready_server,
    test_image,
)

QUALITY = 3.0
HOSTILE_SERVER_SETTINGS: dict[str, Any] = {
    "qualities": "3",
    "max_batch_delay_ms": 0,
    "max_body_bytes": 2_000_000,
    "max_pixels": 4_000_000,
    "min_side": 1,  # the main server refuses 1-pixel sides; here slivers must be coded
}
HAS_AVIF = features.check("avif")
MEDIA_TYPES = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "AVIF": "image/avif",
    "TIFF": "image/tiff",
    "BMP": "image/bmp",
    "GIF": "image/gif",
}


@pytest.fixture(scope="module")
def hostile_server(server_logs: Path) -> Iterator[Server]:
    with ready_server(server_logs, **HOSTILE_SERVER_SETTINGS) as server:
        yield server


# -- building hostile files ----------------------------------------------------------------------


def rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return test_image(height, width, seed=seed)


def with_exif_orientation(fmt: str, orientation: int, height: int = 24, width: int = 40) -> bytes:
    pil = Image.fromarray(rgb(height, width, seed=orientation))
    exif = Image.Exif()
    exif[0x0112] = orientation
    options = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    return encode(pil, fmt, exif=exif, **options)


def animated(fmt: str) -> tuple[bytes, np.ndarray]:
    """Two frames of different content; returns the file and the first frame."""
    frames = [rgb(20, 30, seed=1), 255 - rgb(20, 30, seed=2)]
    pils = [Image.fromarray(frame) for frame in frames]
    options: dict[str, Any] = {"save_all": True, "append_images": pils[1:], "duration": 100, "loop": 0}
    if fmt == "WEBP":
        options["lossless"] = True
    return encode(pils[0], fmt, **options), frames[0]


def png_16bit_rgb(array16: np.ndarray) -> bytes:
    """An RGB PNG with 16 bits per sample (Pillow cannot write one)."""
    height, width, _ = array16.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + array16[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def ztxt_bomb_png() -> bytes:
    """A PNG whose zTXt chunk inflates to 64 MB (Pillow caps text chunks)."""
    data = encode(rgb(16, 16))
    text = b"Comment\0\0" + zlib.compress(b"\0" * 64_000_000, 9)
    chunk = struct.pack(">I", len(text)) + b"zTXt" + text + struct.pack(">I", zlib.crc32(b"zTXt" + text))
    return data[:33] + chunk + data[33:]  # after the signature and IHDR


def bmp_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(rgb(16, 16), "BMP"))
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


def tiff_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(rgb(16, 16), "TIFF"))
    assert data[:2] == b"II"
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag, kind = struct.unpack_from("<HH", data, entry)
        if tag in (256, 257):
            value = width if tag == 256 else height
            struct.pack_into("<H" if kind == 3 else "<I", data, entry + 8, value)
    return bytes(data)


def webp_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(rgb(16, 16), "WEBP", lossless=True))
    assert data[12:16] == b"VP8L" and data[20] == 0x2F
    (bits,) = struct.unpack_from("<I", data, 21)
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    struct.pack_into("<I", data, 21, bits)
    return bytes(data)


def avif_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(rgb(16, 16), "AVIF"))
    box = data.index(b"ispe")
    struct.pack_into(">II", data, box + 8, width, height)
    return bytes(data)


def truncated(data: bytes, keep: float) -> bytes:
    return data[: max(1, int(len(data) * keep))]


def corrupted(data: bytes, seed: int = 0) -> bytes:
    """Scramble a run of bytes in the middle (headers intact, payload garbage)."""
    rng = np.random.default_rng(seed)
    out = bytearray(data)
    start = len(out) // 2
    out[start : start + 64] = rng.integers(0, 256, min(64, len(out) - start), dtype=np.uint8).tobytes()
    return bytes(out)


def samples() -> dict[str, bytes]:
    image = rgb(48, 40, seed=11)
    out = {
        "PNG": encode(image),
        "JPEG": encode(image, "JPEG", quality=90),
        "WEBP": encode(image, "WEBP", quality=90),
        "TIFF": encode(image, "TIFF"),
        "BMP": encode(image, "BMP"),
    }
    if HAS_AVIF:
        out["AVIF"] = encode(image, "AVIF")
    return out


# -- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One request body and what must come back."""

    name: str
    data: Callable[[], bytes]
    fmt: str
    status: int | None = None
    """200, a 4xx, or None: whatever the in-process rules give (200 if ``to_rgb`` decodes, else 400)."""
    code: str | None = None
    size: tuple[int, int] | None = None
    """Expected (width, height) of a 200."""
    pixels: Callable[[], np.ndarray] | None = None
    """Expected RGB pixels, built without to_rgb, for cases that pin a rule."""


def _alpha_image() -> Image.Image:
    array = np.dstack([rgb(20, 24, seed=5), np.zeros((20, 24), np.uint8)])
    array[:, 12:, 3] = 255  # left half transparent, right half opaque
    return Image.fromarray(array, "RGBA")


def _alpha_expected() -> np.ndarray:
    expected = rgb(20, 24, seed=5).copy()
    expected[:, :12] = 255
    return expected


def _palette_transparent() -> Image.Image:
    pil = Image.fromarray(rgb(18, 22, seed=6)).quantize(16)
    array = np.asarray(pil).copy()
    array[:9] = 0  # top half: the transparent index
    out = Image.fromarray(array, "P")
    out.putpalette(pil.getpalette())
    return out


def _palette_transparent_expected() -> np.ndarray:
    pil = _palette_transparent()
    expected = np.asarray(pil.convert("RGB")).copy()
    expected[np.asarray(pil) == 0] = 255  # every pixel of the transparent index, the top half included
    return expected


GRAY16 = (np.arange(30 * 20, dtype=np.uint32).reshape(20, 30) * 109 % 65536).astype(np.uint16)
RGB16 = np.stack([GRAY16, GRAY16[::-1], 65535 - GRAY16], axis=-1)
_ANIMATED = {fmt: animated(fmt) for fmt in ("WEBP", "PNG", "GIF")}
_SAMPLES = samples()

SUCCESS_CASES = [
    Case("1-bit PNG", lambda: encode(Image.fromarray(rgb(21, 17)).convert("1")), "PNG", 200, size=(17, 21)),
    Case(
        "16-bit grayscale PNG",
        lambda: encode(Image.fromarray(GRAY16)),
        "PNG",
        200,
        size=(30, 20),
        pixels=lambda: np.repeat((GRAY16 >> 8).astype(np.uint8)[..., None], 3, axis=2),
    ),
    Case(
        "16-bit RGB PNG",
        lambda: png_16bit_rgb(RGB16),
        "PNG",
        200,
        size=(30, 20),
        pixels=lambda: (RGB16 >> 8).astype(np.uint8),
    ),
    Case(
        "16-bit grayscale TIFF",
        lambda: encode(Image.fromarray(GRAY16), "TIFF"),
        "TIFF",
        200,
        size=(30, 20),
    ),
    Case(
        "float TIFF",
        lambda: encode(
            Image.fromarray(np.linspace(-50, 300, 20 * 30, dtype=np.float32).reshape(20, 30)), "TIFF"
        ),
        "TIFF",
        200,
        size=(30, 20),
    ),
    Case("RGBA PNG", lambda: encode(_alpha_image()), "PNG", 200, size=(24, 20), pixels=_alpha_expected),
    Case(
        "RGBA WebP",
        lambda: encode(_alpha_image(), "WEBP", lossless=True),
        "WEBP",
        200,
        pixels=_alpha_expected,
    ),
    Case("RGBA TIFF", lambda: encode(_alpha_image(), "TIFF"), "TIFF", 200, pixels=_alpha_expected),
    Case("LA PNG", lambda: encode(_alpha_image().convert("LA")), "PNG", 200, size=(24, 20)),
    Case(
        "palette PNG with transparency",
        lambda: encode(_palette_transparent(), transparency=0),
        "PNG",
        200,
        pixels=_palette_transparent_expected,
    ),
    Case(
        "palette BMP",
        lambda: encode(Image.fromarray(rgb(18, 22)).quantize(8), "BMP"),
        "BMP",
        200,
        size=(22, 18),
    ),
    Case(
        "CMYK JPEG",
        lambda: encode(Image.fromarray(rgb(26, 30)).convert("CMYK"), "JPEG"),
        "JPEG",
        200,
        size=(30, 26),
    ),
    Case(
        "CMYK TIFF",
        lambda: encode(Image.fromarray(rgb(26, 30)).convert("CMYK"), "TIFF"),
        "TIFF",
        200,
        size=(30, 26),
    ),
    Case("grayscale JPEG", lambda: encode(Image.fromarray(rgb(26, 30)).convert("L"), "JPEG"), "JPEG", 200),
    Case(
        "EXIF orientation 6 JPEG (rotate 90)",
        lambda: with_exif_orientation("JPEG", 6),
        "JPEG",
        200,
        size=(24, 40),
    ),
    Case(
        "EXIF orientation 8 PNG (rotate 270)",
        lambda: with_exif_orientation("PNG", 8),
        "PNG",
        200,
        size=(24, 40),
        pixels=lambda: np.rot90(rgb(24, 40, seed=8), 1),
    ),
    Case(
        "EXIF orientation 3 WebP (rotate 180)",
        lambda: with_exif_orientation("WEBP", 3),
        "WEBP",
        200,
        size=(40, 24),
        pixels=lambda: rgb(24, 40, seed=3)[::-1, ::-1],
    ),
    Case(
        "EXIF orientation 2 TIFF (mirror)",
        lambda: with_exif_orientation("TIFF", 2),
        "TIFF",
        200,
        size=(40, 24),
        pixels=lambda: rgb(24, 40, seed=2)[:, ::-1],
    ),
    Case(
        "EXIF orientation 9 (invalid: ignored)",
        lambda: with_exif_orientation("PNG", 9),
        "PNG",
        200,
        size=(40, 24),
    ),
    Case(
        "animated WebP: first frame",
        lambda: _ANIMATED["WEBP"][0],
        "WEBP",
        200,
        pixels=lambda: _ANIMATED["WEBP"][1],
    ),
    Case("APNG: first frame", lambda: _ANIMATED["PNG"][0], "PNG", 200, pixels=lambda: _ANIMATED["PNG"][1]),
    Case(
        "multi-page TIFF: first page",
        lambda: encode(
            Image.fromarray(rgb(20, 30, seed=1)),
            "TIFF",
            save_all=True,
            append_images=[Image.new("RGB", (30, 20))],
        ),
        "TIFF",
        200,
        pixels=lambda: rgb(20, 30, seed=1),
    ),
    Case("1x1", lambda: encode(rgb(1, 1)), "PNG", 200, size=(1, 1)),
    Case("5x7", lambda: encode(rgb(7, 5)), "PNG", 200, size=(5, 7)),
    Case("63x63", lambda: encode(rgb(63, 63), "WEBP", lossless=True), "WEBP", 200, size=(63, 63)),
    Case("65x1 (crosses a padding block)", lambda: encode(rgb(1, 65)), "PNG", 200, size=(65, 1)),
    Case("1x700 sliver", lambda: encode(rgb(700, 1)), "PNG", 200, size=(1, 700)),
    Case("700x1 sliver", lambda: encode(rgb(1, 700), "BMP"), "BMP", 200, size=(700, 1)),
    Case("2x900 sliver (JPEG)", lambda: encode(rgb(900, 2), "JPEG"), "JPEG", 200, size=(2, 900)),
    Case("zTXt bomb PNG (text capped)", ztxt_bomb_png, "PNG", None),
    Case("EXIF-looking garbage", lambda: corrupted(with_exif_orientation("JPEG", 6), seed=3), "JPEG", None),
]

BOMBS = [
    Case("JPEG declaring 60000x60000", lambda: jpeg_declaring(60000, 60000), "JPEG", 413, "too_many_pixels"),
    Case("BMP declaring 50000x50000", lambda: bmp_declaring(50000, 50000), "BMP", 413, "too_many_pixels"),
    Case("BMP declaring 2001x2000", lambda: bmp_declaring(2001, 2000), "BMP", 413, "too_many_pixels"),
    Case("TIFF declaring 60000x60000", lambda: tiff_declaring(60000, 60000), "TIFF", 413, "too_many_pixels"),
    Case("WebP declaring 16384x16384", lambda: webp_declaring(16384, 16384), "WEBP", 413, "too_many_pixels"),
    Case("AVIF declaring 60000x60000", lambda: avif_declaring(60000, 60000), "AVIF", None),
]

BROKEN = [
    case
    for fmt in ("PNG", "JPEG", "WEBP", "AVIF", "TIFF", "BMP")
    for case in (
        Case(f"{fmt} cut after 16 bytes", lambda fmt=fmt: _SAMPLES[fmt][:16], fmt, 400, "bad_image"),
        Case(f"{fmt} truncated to 60%", lambda fmt=fmt: truncated(_SAMPLES[fmt], 0.6), fmt, None),
        Case(f"{fmt} missing its last byte", lambda fmt=fmt: _SAMPLES[fmt][:-1], fmt, None),
        Case(f"{fmt} with a corrupt payload", lambda fmt=fmt: corrupted(_SAMPLES[fmt]), fmt, None),
        Case(
            f"{fmt} header with a zero payload", lambda fmt=fmt: _SAMPLES[fmt][:40] + b"\0" * 4000, fmt, None
        ),
    )
]

REFUSED = [
    Case(
        "animated GIF (GIF is not accepted)",
        lambda: _ANIMATED["GIF"][0],
        "GIF",
        415,
        "unsupported_media_type",
    ),
]


def expected_rgb(data: bytes) -> np.ndarray | None:
    """The image the rules give for ``data`` in-process (None: not decodable, so a 400)."""
    try:
        with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as pil:
            return to_rgb(pil)
    except Exception:
        return None


def _skip_without_avif(case: Case) -> None:
    if case.fmt == "AVIF" and not HAS_AVIF:
        pytest.skip("Pillow without AVIF")


def check(server: Server, codec: Any, case: Case) -> None:
    """Post ``case`` to /compress and check the answer against the rules."""
    _skip_without_avif(case)
    data = case.data()
    with server.client() as http:
        response = http.post(
            f"/compress?quality={QUALITY:g}", content=data, headers={"content-type": MEDIA_TYPES[case.fmt]}
        )
        assert response.status_code < 500, f"{case.name}: {response.status_code} {response.text}"
        expected = expected_rgb(data) if case.status in (None, 200) else None
        status = case.status if case.status is not None else (200 if expected is not None else 400)
        if status != 200:
            code = case.code or ("bad_image" if status == 400 else None)
            if case.status is None and response.status_code == 413:
                code = "too_many_pixels"  # a corrupt header that declares a huge image
            assert_error(response, response.status_code if case.status is None else status, code or "")
            return
        assert expected is not None, f"{case.name}: not decodable in-process"
        assert response.status_code == 200, f"{case.name}: {response.text}"
        height, width = expected.shape[:2]
        declared = (int(response.headers["x-lalic-width"]), int(response.headers["x-lalic-height"]))
        assert declared == (width, height), case.name
        if case.size is not None:
            assert declared == case.size, case.name
        if case.pixels is not None:
            assert np.array_equal(expected, case.pixels()), f"{case.name}: the rule does not hold"
        assert response.content == codec.compress(expected, QUALITY), f"{case.name}: not the codec's stream"
        restored = http.post("/decompress", content=response.content, headers=LALIC)
        assert restored.status_code == 200, restored.text
        assert np.array_equal(decode(restored.content), codec.decompress(response.content)), case.name


@pytest.mark.parametrize("case", SUCCESS_CASES, ids=lambda case: case.name)
def test_unusual_images_follow_the_rules(hostile_server: Server, codec: Any, case: Case) -> None:
    check(hostile_server, codec, case)


@pytest.mark.parametrize("case", BOMBS, ids=lambda case: case.name)
def test_decompression_bombs_are_refused(hostile_server: Server, codec: Any, case: Case) -> None:
    check(hostile_server, codec, case)


@pytest.mark.parametrize("case", BROKEN, ids=lambda case: case.name)
def test_truncated_and_corrupt_files(hostile_server: Server, codec: Any, case: Case) -> None:
    check(hostile_server, codec, case)


@pytest.mark.parametrize("case", REFUSED, ids=lambda case: case.name)
def test_refused_formats(hostile_server: Server, codec: Any, case: Case) -> None:
    check(hostile_server, codec, case)


def test_no_hostile_image_was_a_500(hostile_server: Server) -> None:
    samples_5xx = {
        key: value
        for key, value in hostile_server.metrics().items()
        if key[0] == "lalic_requests_total"
        and ("status_class", "5xx") in key[1]
        and ("endpoint", "readyz") not in key[1]  # 503 while the model was loading
        and value
    }
    assert samples_5xx == {}
