"""Tiled coding of large images: exact assembly of independently coded tiles, strict parsing."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import model.tiling as tiling
from model.bitstream import BitstreamError, Header, pack, unpack
from model.codec import Codec


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec.random("lalic-s", seed=0)


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tile anything above 128 x 128 into 128-pixel tiles, so tests stay small."""
    monkeypatch.setattr(tiling, "MAX_TILE_PIXELS", 128 * 128)
    monkeypatch.setattr(tiling, "TILE", 128)
    monkeypatch.setattr(tiling.compress_tiled, "__defaults__", (128,))


def _image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx * 3) % 256, (yy * 5) % 256, ((xx + yy) * 2) % 256], -1).astype(np.uint8)


def test_tile_grid_is_even_and_aligned() -> None:
    assert tiling.tile_grid(2160, 3840) == (1088, 1920)
    assert tiling.tile_grid(4320, 7680) == (1472, 1920)
    assert tiling.tile_grid(512, 768) == (512, 768)
    boxes = tiling.tiles(2160, 3840, 1088, 1920)
    assert len(boxes) == 4 and boxes[-1] == (1088, 1920, 2160, 3840)


def test_large_image_is_tiled_and_decodes_exactly_to_its_tiles(codec: Codec, small_tiles: None) -> None:
    image = _image(200, 300)
    data = codec.compress(image, 3)
    header, streams = unpack(data)
    assert header.tiling == (128, 128, 0) and len(streams) == 6  # 2 rows x 3 columns
    out = codec.decompress(data)
    assert out.shape == image.shape
    for (t, left, b, r), s in zip(tiling.tiles(200, 300, 128, 128), streams, strict=True):
        np.testing.assert_array_equal(out[t:b, left:r], codec.decompress(s))
        assert s == codec.compress(np.ascontiguousarray(image[t:b, left:r]), 3)


def test_a_tiled_image_can_be_coded_flipped(codec: Codec, small_tiles: None) -> None:
    image = _image(200, 300)
    data = codec.compress(image, 3, orientations=(3,))
    header, streams = unpack(data)
    upright = codec.compress(np.ascontiguousarray(image[::-1, ::-1]), 3)
    assert header.tiling == (128, 128, 0) and header.orientation == 3 and streams == unpack(upright)[1]
    assert all(unpack(s)[0].orientation == 0 for s in streams)  # the tiles themselves are upright
    np.testing.assert_array_equal(codec.decompress(data), codec.decompress(upright)[::-1, ::-1])


def test_inconsistent_tilings_are_rejected(codec: Codec, small_tiles: None) -> None:
    header, streams = unpack(codec.compress(_image(200, 300), 2))
    fields = {f: getattr(header, f) for f in Header.__dataclass_fields__}
    bad = [
        pack(header, streams[:-1]),  # a tile missing
        pack(header, [streams[1], streams[0], *streams[2:]]),  # tiles swapped
        pack(Header(**{**fields, "tiling": (128, 128, 16)}), streams),  # overlap not supported
        pack(Header(**{**fields, "tiling": (100, 128, 0)}), streams),  # not a multiple of 64
        pack(Header(**{**fields, "weights_digest": b"\1" * 8}), streams),
        pack(Header(**{**fields, "tiling": (128, 128, 0)}), [pack(header, streams[:1])] * 4),  # nested
    ]
    for data in bad:
        with pytest.raises(BitstreamError):
            codec.decompress(data)


class StopError(Exception):
    """Raised by a test checkpoint."""


def test_checkpoints_run_between_stages_and_tiles_and_abandon_the_call(
    codec: Codec, small_tiles: None
) -> None:
    image = _image(200, 300)  # 2 x 3 tiles of at most 128 x 128
    calls: list[int] = []

    def count() -> None:
        calls.append(len(calls))

    stream = codec.compress_batch([image], 3.0, checkpoint=count)[0]
    assert len(calls) == 6 * 3  # per tile: before analysis, hyper-analysis, entropy parameters
    assert stream == codec.compress(image, 3.0)  # checkpoints change nothing
    calls.clear()
    decoded = codec.decompress_batch([stream], checkpoint=count)[0]
    assert len(calls) == 6 * 2  # per tile: before entropy decoding, before synthesis
    assert np.array_equal(decoded, codec.decompress(stream))

    pair = [_image(64, 96), _image(64, 96)[::-1].copy()]  # untiled, one batch
    calls.clear()
    streams = codec.compress_batch(pair, 3.0, checkpoint=count)
    assert len(calls) == 2 + 1 + 2  # analysis per image, hyper, entropy parameters per image
    calls.clear()
    codec.decompress_batch(streams, checkpoint=count)
    assert len(calls) == 2 + 2

    def stop_after(limit: int) -> Callable[[], None]:
        def checkpoint() -> None:
            count()
            if len(calls) > limit:
                raise StopError

        return checkpoint

    calls.clear()
    with pytest.raises(StopError):
        codec.compress_batch([image], 3.0, checkpoint=stop_after(3))
    assert len(calls) == 4  # the first tile's three stages, then the second tile stopped at once
    calls.clear()
    with pytest.raises(StopError):
        codec.decompress_batch([stream], checkpoint=stop_after(2))
    assert len(calls) == 3
