"""Request image decoding: limits are checked from the header, and bad bytes only give 400/413."""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.errors import ServiceError
from service.images import configure_pillow, decode_image
from tests.service.helpers import encode, test_image

LIMITS = {"max_pixels": 10_000, "min_side": 2}
SAMPLES = {fmt: encode(test_image(24, 20, seed=1), fmt) for fmt in ("PNG", "JPEG", "WEBP", "TIFF", "BMP")}


@pytest.fixture(autouse=True, scope="module")
def pillow_limits() -> Iterator[None]:
    """Pillow's process-wide guard as a server with these limits sets it; restored afterwards."""
    saved_limit, saved_filters = Image.MAX_IMAGE_PIXELS, warnings.filters[:]
    configure_pillow(LIMITS["max_pixels"])
    yield
    Image.MAX_IMAGE_PIXELS, warnings.filters[:] = saved_limit, saved_filters


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_accepted_formats_decode_to_rgb(fmt: str) -> None:
    image = decode_image(SAMPLES[fmt], **LIMITS)
    assert image.shape == (24, 20, 3) and image.dtype == np.uint8


def test_alpha_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (4, 3), (0, 0, 0, 0))
    assert (decode_image(encode(rgba), **LIMITS) == 255).all()


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")  # as configure_pillow does
@pytest.mark.parametrize(("size", "status"), [((101, 100), 413), ((1, 50), 400), ((3000, 3000), 413)])
def test_size_limits(size: tuple[int, int], status: int) -> None:
    with pytest.raises(ServiceError) as error:
        decode_image(encode(Image.new("RGB", size)), **LIMITS)
    assert error.value.status == status


def test_gif_is_not_accepted() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    with pytest.raises(ServiceError) as error:
        decode_image(buffer.getvalue(), **LIMITS)
    assert error.value.status == 400


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow notes skipped TIFF tags of mangled files
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(sorted(SAMPLES)),
    position=st.integers(0, 10_000),
    replacement=st.binary(min_size=1, max_size=16),
    cut=st.integers(1, 10_000),
)
def test_mangled_images_only_give_client_errors(
    fmt: str, position: int, replacement: bytes, cut: int
) -> None:
    data = bytearray(SAMPLES[fmt])
    position %= len(data)
    data[position : position + len(replacement)] = replacement
    data = data[: max(1, len(data) - cut % len(data))] if cut % 3 == 0 else data
    try:
        image = decode_image(bytes(data), **LIMITS)
    except ServiceError as exc:
        assert exc.status in (400, 413)
    else:
        assert image.ndim == 3 and image.shape[2] == 3


def _pillow_rgb(data: bytes) -> np.ndarray:
    from model.image import to_rgb

    with Image.open(io.BytesIO(data)) as image:
        return to_rgb(image)


def test_plain_png_takes_libpng_and_every_png_decodes_as_pillow_does(monkeypatch) -> None:
    """8-bit RGB PNGs without orientation, animation or transparency are decoded by libpng
    (imagecodecs, about half of Pillow's time at 768x512); the pixels are Pillow's, and every
    other PNG (16-bit, palette, grey, tRNS, alpha, EXIF orientation) still goes through Pillow."""
    import imagecodecs

    import service.images as images

    calls: list[int] = []

    def spy(data: bytes, *args, **kwargs):
        calls.append(1)
        return imagecodecs.png_decode(data, *args, **kwargs)

    monkeypatch.setattr(images.imagecodecs, "png_decode", spy)
    rgb = test_image(30, 40, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    cases = {
        "plain": (encode(rgb), True),
        "16-bit": (imagecodecs.png_encode(rgb.astype(np.uint16) * 257 + 3), False),
        "palette": (encode(Image.fromarray(rgb).quantize(16)), False),
        "grey": (encode(Image.fromarray(rgb[..., 0])), False),
        "tRNS": (encode(Image.fromarray(rgb), transparency=(0, 0, 0)), False),
        "alpha": (encode(rgba), False),
        "orientation": (encode(Image.fromarray(rgb), exif=exif.tobytes()), False),
    }
    limits = {"max_pixels": 10_000, "min_side": 2}
    for name, (data, fast) in cases.items():
        calls.clear()
        assert np.array_equal(decode_image(data, **limits), _pillow_rgb(data)), name
        assert bool(calls) == fast, name
    assert decode_image(cases["orientation"][0], **limits).shape == (40, 30, 3)
