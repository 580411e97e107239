"""Image input rules shared by the CLI and the service.

Conversion to 8-bit RGB (the only thing the codec codes):

- EXIF orientation is applied first (the pixels are turned the way a viewer shows them).
- Animated images (GIF, APNG, WebP, ...): the first frame is coded.
- Grayscale (L, 1, I, I;16, F): the gray value is copied to R, G and B; 16-bit and float images
  are scaled to 8 bits (I;16 by >> 8, I and F clipped to 0..255).
- Palette (P, PA): expanded through the palette.
- With alpha (RGBA, LA, PA, RGBa): composited onto white; the alpha channel is not stored.
- CMYK, YCbCr, LAB, HSV: converted to RGB by Pillow.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from model.bitstream import ORIENTATIONS


class ImageError(ValueError):
    """The input is not a decodable image."""


def to_rgb(image: Image.Image) -> np.ndarray:
    """Apply the rules above; returns uint8 (H, W, 3)."""
    if getattr(image, "is_animated", False):
        image.seek(0)
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        image = Image.fromarray(arr, mode="L")
    elif mode in ("I", "F"):
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64), 0, 255).astype(np.uint8))
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La")
    if has_alpha or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def load_image(source: str | Path | bytes) -> np.ndarray:
    """Read an image file (or bytes) and convert it with :func:`to_rgb`."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im.load()
            return to_rgb(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode image: {exc}") from exc


def save_image(array: np.ndarray, path: str | Path, format: str | None = None) -> None:
    Image.fromarray(array).save(path, format=format)


def is_orientation(value: object) -> bool:
    """Whether ``value`` is an integer (not a bool or float) of :data:`model.bitstream.ORIENTATIONS`."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value in ORIENTATIONS


def flip(image: np.ndarray, orientation: int) -> np.ndarray:
    """``image`` (H, W, ...) in one of the bitstream's orientations (:data:`model.bitstream.ORIENTATIONS`):
    bit 0 mirrors it left-right, bit 1 flips it top-bottom. Each orientation is its own inverse, so
    the same call turns a decoded image back. Returns a contiguous copy (or the image itself for 0)."""
    if not is_orientation(orientation):
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    if orientation == 0:
        return image
    rows = slice(None, None, -1 if orientation & 2 else 1)
    cols = slice(None, None, -1 if orientation & 1 else 1)
    return np.ascontiguousarray(image[rows, cols])
