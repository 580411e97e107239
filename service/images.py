"""Request images: accepted media types, safe decoding with size limits, and response encoding."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable

import imagecodecs
import numpy as np
from PIL import Image, features

from service.errors import ErrorCode, ServiceError

logger = logging.getLogger("service.images")

_BASE_FORMATS = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/pjpeg": "JPEG",
    "image/webp": "WEBP",
    "image/tiff": "TIFF",
    "image/tiff-fx": "TIFF",
    "image/bmp": "BMP",
    "image/x-bmp": "BMP",
    "image/x-ms-bmp": "BMP",
}
INPUT_MEDIA_TYPES: dict[str, str] = dict(_BASE_FORMATS)
"""Accepted request media types and the Pillow format each names."""
if features.check("avif"):
    INPUT_MEDIA_TYPES["image/avif"] = "AVIF"
PILLOW_FORMATS: tuple[str, ...] = tuple(sorted(set(INPUT_MEDIA_TYPES.values())))
"""Pillow plugins allowed to open request images (nothing else is ever tried)."""


def configure_pillow(max_pixels: int) -> None:
    """Align Pillow's decompression-bomb guard with ``max_pixels`` and make its warning an error.

    Process-wide: Pillow keeps these limits in module globals.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def is_input_media_type(media_type: str) -> bool:
    """Whether a raw request body of this media type is accepted by /compress."""
    return media_type in INPUT_MEDIA_TYPES


def _too_many_pixels(detail: str) -> ServiceError:
    return ServiceError(413, ErrorCode.TOO_MANY_PIXELS, detail)


_IHDR_RGB8 = bytes([8, 2])
"""Bit depth and colour type in a PNG's IHDR (bytes 24 and 25 of the file): 8-bit truecolour."""
_PNG_CHUNKS_NEEDING_PILLOW = (b"eXIf", b"acTL", b"tRNS")
"""PNG chunks that :func:`model.image.to_rgb` acts on (EXIF orientation, animation, transparency):
an image that may hold one is decoded by Pillow (a match inside compressed data only costs speed)."""


def _plain_png(data: bytes, image: Image.Image) -> np.ndarray | None:
    """The pixels of an 8-bit RGB PNG without orientation, animation or transparency, decoded by
    libpng (imagecodecs: about half of Pillow's time, the same pixels); None for any other image,
    which :func:`model.image.to_rgb` decodes."""
    if image.format != "PNG" or image.mode != "RGB" or data[24:26] != _IHDR_RGB8:
        return None
    if any(chunk in data for chunk in _PNG_CHUNKS_NEEDING_PILLOW):
        return None
    try:
        pixels = imagecodecs.png_decode(data)
    except Exception:  # Pillow reports what is wrong with it
        return None
    width, height = image.size
    if pixels.dtype != np.uint8 or pixels.shape != (height, width, 3):  # e.g. 16 bits per sample
        return None
    return np.ascontiguousarray(pixels)


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    min_side: int,
    check_size: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Decode a request image to uint8 RGB (H, W, 3), checking its size before decoding pixels.

    ``check_size(height, width)`` runs once the declared size passed the limits, before any pixel
    is decoded (admission control: it raises to refuse).

    Raises:
        ServiceError: 413 too many pixels, 400 undecodable or too small; whatever ``check_size`` raises.
    """
    from model.image import to_rgb

    try:
        image = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(str(exc)) from None
    except Exception as exc:  # any failure to parse untrusted bytes is the client's
        logger.debug("cannot open request image: %s", type(exc).__name__)  # never the bytes
        raise ServiceError(
            400, ErrorCode.BAD_IMAGE, f"not a decodable image (accepted: {', '.join(PILLOW_FORMATS)})"
        ) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise _too_many_pixels(f"{width}x{height} is above the limit of {max_pixels} pixels")
        if min(width, height) < min_side:
            raise ServiceError(
                400, ErrorCode.IMAGE_TOO_SMALL, f"{width}x{height} is below the minimum side of {min_side}"
            )
        if check_size is not None:
            check_size(height, width)
        rgb = _plain_png(data, image)
        try:
            if rgb is None:
                rgb = to_rgb(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _too_many_pixels(str(exc)) from None
        except Exception as exc:
            logger.debug("cannot decode request image: %s", type(exc).__name__)
            raise ServiceError(
                400, ErrorCode.BAD_IMAGE, f"corrupt or unsupported {image.format} image"
            ) from None
    if rgb.shape[0] * rgb.shape[1] > max_pixels:  # e.g. EXIF rotation cannot change this, but be sure
        raise _too_many_pixels(f"{rgb.shape[1]}x{rgb.shape[0]} is above the limit of {max_pixels} pixels")
    return rgb
