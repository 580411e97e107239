"""Tiled coding of large images in bounded memory.

Whole-image coding keeps full-resolution activations of g_a and g_s in memory (about 0.4 GB per
tensor at 3840x2160 in the first stage), which does not fit a small machine at 8K. Images larger than
``MAX_TILE_PIXELS`` are cut into a grid of at most ``tile x tile`` pixel tiles (sides multiples of
64, as equal as possible, no overlap), and each tile is coded as its own complete LALIC stream.
The outer container records the tiling (``Header.tiling = (tile_h, tile_w, 0)``) and carries the
tiles' streams in raster order; its symbol checksum is the CRC32 of the tiles' own checksums.

Tiles are independent, so memory is bounded by one tile. The cost, measured in BENCHMARKS.md on a
3840x2160 mosaic of Kodak images: the rate grows by the tiles' side information and the quality
drops only near the seams.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import numpy as np

from model.bitstream import BitstreamError, Container, Header, pack

TILE = 2048
"""Largest tile side in pixels."""
MAX_TILE_PIXELS = TILE * TILE
"""Images with more pixels than this are tiled."""


def tile_grid(height: int, width: int, tile: int = TILE) -> tuple[int, int]:
    """Tile height and width (multiples of 64, <= ``tile``) splitting the image as evenly as possible."""

    def side(n: int) -> int:
        parts = math.ceil(n / tile)
        return min(tile, math.ceil(math.ceil(n / parts) / 64) * 64)

    return side(height), side(width)


def tiles(height: int, width: int, tile_h: int, tile_w: int) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right) of every tile in raster order."""
    return [
        (top, left, min(top + tile_h, height), min(left + tile_w, width))
        for top in range(0, height, tile_h)
        for left in range(0, width, tile_w)
    ]


def needs_tiling(height: int, width: int) -> bool:
    return height * width > MAX_TILE_PIXELS


def compress_tiled(
    image: np.ndarray,
    quality: float,
    compress: Callable[[np.ndarray, float], Container],
    tile: int = TILE,
) -> Container:
    """Code ``image`` tile by tile with ``compress`` and wrap the tiles' streams in one container."""
    h, w = image.shape[:2]
    tile_h, tile_w = tile_grid(h, w, tile)
    coded = [
        compress(np.ascontiguousarray(image[top:bottom, left:right]), quality)
        for top, left, bottom, right in tiles(h, w, tile_h, tile_w)
    ]
    first = coded[0].header
    crcs = b"".join(c.header.symbol_crc32.to_bytes(4, "little") for c in coded)
    header = Header(
        model_id=first.model_id,
        weights_digest=first.weights_digest,
        quality=first.quality,
        height=h,
        width=w,
        y_shape=first.y_shape,
        z_shape=first.z_shape,
        tiling=(tile_h, tile_w, 0),
        symbol_crc32=zlib.crc32(crcs),
        version=first.version,
    )
    return Container(header, [pack(*c) for c in coded])


def decompress_tiled(
    header: Header,
    streams: list[bytes],
    decompress: Callable[[Container], np.ndarray],
    unpack: Callable[[bytes], Container],
) -> np.ndarray:
    """Decode every tile (each parsed once with ``unpack``) and place it; any inconsistency raises
    :class:`BitstreamError`."""
    tile_h, tile_w, overlap = header.tiling
    if overlap != 0 or tile_h % 64 or tile_w % 64:
        raise BitstreamError(f"unsupported tiling {header.tiling}")
    boxes = tiles(header.height, header.width, tile_h, tile_w)
    if len(streams) != len(boxes):
        raise BitstreamError(f"tiling {header.tiling} needs {len(boxes)} tiles, got {len(streams)}")
    inner = [unpack(s) for s in streams]
    crcs = b"".join(c.header.symbol_crc32.to_bytes(4, "little") for c in inner)
    if zlib.crc32(crcs) != header.symbol_crc32:
        raise BitstreamError("tile checksums do not match the container's")
    out = np.empty((header.height, header.width, 3), dtype=np.uint8)
    for (top, left, bottom, right), tile in zip(boxes, inner, strict=True):
        h = tile.header
        same_model = (h.model_id, h.weights_digest, h.quality, h.version) == (
            header.model_id,
            header.weights_digest,
            header.quality,
            header.version,
        )
        if not same_model or (h.height, h.width) != (bottom - top, right - left) or h.tiling != (0, 0, 0):
            raise BitstreamError(f"tile at ({top}, {left}) does not belong to this image")
        out[top:bottom, left:right] = decompress(tile)
    return out
