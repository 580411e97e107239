"""Output format negotiation and encoding, multipart extraction, metric labels."""

from __future__ import annotations

import io
import zlib

import httpx
import imagecodecs
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from service import formats
from service.body import extract_form_file, media_type_of
from service.errors import ServiceError
from service.formats import (
    MAX_SIDE,
    Choice,
    FormatLimitError,
    OutputFormat,
    encode_image,
    negotiate,
)
from service.metrics import endpoint_label, quality_label, status_class


@pytest.mark.parametrize(
    ("format_param", "accept", "expected"),
    [
        (None, None, OutputFormat.PNG),
        (None, "*/*", OutputFormat.PNG),
        (None, "image/webp", OutputFormat.WEBP),
        (None, "image/avif,image/webp,image/*,*/*;q=0.8", OutputFormat.WEBP),
        (None, "image/png;q=0.5, image/jpeg", OutputFormat.JPEG),
        (None, "image/jpeg;q=0, image/webp;q=0.1", OutputFormat.WEBP),
        (None, "text/html", OutputFormat.PNG),
        (OutputFormat.JPEG, "image/webp", OutputFormat.JPEG),
    ],
)
def test_negotiate(format_param: OutputFormat | None, accept: str | None, expected: OutputFormat) -> None:
    assert negotiate(format_param, accept, 768, 512) == Choice(expected)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.integers(1, 100_000), st.integers(1, 100_000))
def test_negotiate_never_fails(accept: str, width: int, height: int) -> None:
    choice = negotiate(None, accept, width, height)
    assert choice.format in OutputFormat and max(width, height) <= MAX_SIDE[choice.format]


def test_every_encoder_limit_is_pillows() -> None:
    """Each format holds exactly MAX_SIDE pixels a side; one more is refused before Pillow fails."""
    assert MAX_SIDE == {OutputFormat.PNG: 2**31 - 1, OutputFormat.WEBP: 16383, OutputFormat.JPEG: 65500}
    for fmt in (OutputFormat.WEBP, OutputFormat.JPEG):
        side = MAX_SIDE[fmt]
        for shape in ((1, side, 3), (side, 1, 3)):
            decoded = Image.open(io.BytesIO(encode_image(np.zeros(shape, dtype=np.uint8), fmt)))
            assert decoded.size == (shape[1], shape[0])
        for shape in ((1, side + 1, 3), (side + 1, 1, 3)):
            with pytest.raises(FormatLimitError, match=f"at most {side} pixels"):
                encode_image(np.zeros(shape, dtype=np.uint8), fmt)
            buffer = io.BytesIO()  # what encode_image spares the service: Pillow's own failure
            with pytest.raises((ValueError, OSError)):
                Image.fromarray(np.zeros(shape, dtype=np.uint8)).save(buffer, format=fmt.name)
    assert Image.open(io.BytesIO(encode_image(np.zeros((1, 70_000, 3), np.uint8), OutputFormat.PNG)))


@pytest.mark.parametrize("shape", [(1, 1, 3), (7, 1, 3), (3, 1_000_001, 3), (512, 768, 3)])
def test_png_output_is_exact(shape: tuple[int, int, int], monkeypatch) -> None:
    """Our PNG writer (SUB filter, ISA-L): Pillow and libpng read back the very pixels, at any
    width (libpng stops at a million pixels a side, its default user limit: Pillow reads wider ones)
    and with the stream split over several IDATs; large images in parts deflated on two threads."""
    monkeypatch.setattr(formats, "PNG_IDAT_BYTES", 1000)
    image = np.random.default_rng(shape[1]).integers(0, 256, shape, dtype=np.uint8)
    image[: shape[0] // 2] //= 16  # some runs that compress
    data = encode_image(image, OutputFormat.PNG)
    if len(data) > 3000:
        assert data.count(b"IDAT") >= 2  # split (the compressed bytes may hold the word too)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), image)
    if shape[1] <= 1_000_000:
        assert np.array_equal(imagecodecs.png_decode(data), image)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_rows_deflated_in_parts_form_one_zlib_stream(parts: int, monkeypatch) -> None:
    """deflate_rows: below the size threshold one zlib stream; above it, ``parts`` runs of whole rows,
    all but the last ending in a sync flush (the empty stored block 00 00 ff ff), joined into one
    stream that zlib inflates to the very bytes and checks (Adler-32); a part boundary falls on a
    row boundary even when the rows do not divide evenly."""
    monkeypatch.setattr(formats, "PNG_PARTS", parts)
    rng = np.random.default_rng(parts)
    rows = rng.integers(0, 8, (301, 1537), dtype=np.uint8)  # 462 637 bytes: above the threshold
    stream = formats.deflate_rows(rows)
    assert zlib.decompress(stream) == rows.tobytes()
    assert (b"\x00\x00\xff\xff" in stream) == (parts > 1)
    small = rows[:10]  # below the threshold: one part whatever PNG_PARTS says
    assert zlib.decompress(formats.deflate_rows(small)) == small.tobytes()
    assert zlib.decompress(formats.deflate_rows(rows[:0])) == b""  # no rows at all


@pytest.mark.parametrize(
    ("accept", "width", "height", "expected"),
    [
        ("image/webp", 16384, 8, Choice(OutputFormat.PNG, (OutputFormat.WEBP,))),
        ("image/webp", 8, 16384, Choice(OutputFormat.PNG, (OutputFormat.WEBP,))),
        ("image/webp", 16383, 8, Choice(OutputFormat.WEBP)),
        ("image/webp, image/jpeg;q=0.5", 20000, 8, Choice(OutputFormat.JPEG, (OutputFormat.WEBP,))),
        (
            "image/webp, image/jpeg;q=0.5",
            65501,
            8,
            Choice(OutputFormat.PNG, (OutputFormat.WEBP, OutputFormat.JPEG)),
        ),
        ("image/jpeg, image/jpg", 65501, 8, Choice(OutputFormat.PNG, (OutputFormat.JPEG,))),
        ("image/webp;q=0.9, */*", 20000, 8, Choice(OutputFormat.PNG)),
        ("image/webp, */*;q=0.1", 20000, 8, Choice(OutputFormat.PNG, (OutputFormat.WEBP,))),
    ],
)
def test_negotiation_passes_over_formats_too_small_for_the_image(
    accept: str, width: int, height: int, expected: Choice
) -> None:
    assert negotiate(None, accept, width, height) == expected


def test_an_explicit_format_too_small_for_the_image_is_refused() -> None:
    with pytest.raises(FormatLimitError, match="format=webp cannot hold a 16384x8 image"):
        negotiate(OutputFormat.WEBP, "image/png", 16384, 8)
    with pytest.raises(FormatLimitError, match="JPEG sides are at most 65500"):
        negotiate(OutputFormat.JPEG, None, 8, 65501)
    assert negotiate(OutputFormat.JPEG, None, 8, 65500) == Choice(OutputFormat.JPEG)
    assert negotiate(OutputFormat.PNG, "image/webp", 16384, 8) == Choice(OutputFormat.PNG)


@pytest.mark.parametrize("fmt", list(OutputFormat))
def test_encode_image(fmt: OutputFormat) -> None:
    image = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    decoded = Image.open(io.BytesIO(encode_image(image, fmt)))
    assert decoded.format == fmt.name and decoded.size == (23, 17)
    if fmt is OutputFormat.PNG:
        assert np.array_equal(np.asarray(decoded.convert("RGB")), image)


def multipart(files: dict[str, tuple[str | None, bytes, str | None]]) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", files=files)
    return request.read(), request.headers["content-type"]


def test_extract_form_file() -> None:
    body, content_type = multipart(
        {"other": ("a.txt", b"x", "text/plain"), "image": ("a.png", b"\x89PNG\r\n", "image/png")}
    )
    part = extract_form_file(body, content_type, "image")
    assert part.data == b"\x89PNG\r\n" and part.media_type == "image/png"
    body, content_type = multipart({"image": (None, b"raw\r\n--bytes", None)})
    assert extract_form_file(body, content_type, "image").data == b"raw\r\n--bytes"


def test_extract_form_file_errors() -> None:
    body, content_type = multipart({"picture": ("a.png", b"data", "image/png")})
    with pytest.raises(ServiceError) as missing:
        extract_form_file(body, content_type, "image")
    assert missing.value.status == 422
    with pytest.raises(ServiceError) as no_boundary:
        extract_form_file(body, "multipart/form-data", "image")
    assert no_boundary.value.status == 400


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_extract_form_file_only_raises_service_errors(body: bytes) -> None:
    try:
        extract_form_file(b"--b\r\n" + body, "multipart/form-data; boundary=b", "image")
    except ServiceError as exc:
        assert exc.status in (400, 422)


def test_labels_are_bounded() -> None:
    assert media_type_of("Image/PNG; charset=x") == "image/png" and media_type_of(None) == ""
    assert [quality_label(q) for q in (1.0, 1.49, 2.5, 3.5, 6.0, None)] == ["1", "1", "2", "4", "6", "none"]
    assert endpoint_label("/compress") == "compress" and endpoint_label("/v1/models/") == "models"
    assert endpoint_label("/etc/passwd") == "other"
    assert [status_class(s) for s in (200, 304, 404, 503)] == ["2xx", "2xx", "4xx", "5xx"]
