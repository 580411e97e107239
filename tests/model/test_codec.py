"""Codec round trips, rate accounting, determinism and strict rejection of bad streams."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.bitstream import ORIENTATIONS, BitstreamError, Header, pack, unpack
from model.codec import Codec, torch_threads
from model.image import flip
from model.refine import lambda_for_quality


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec.random("lalic-s", seed=0)


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like test image: smooth gradients plus texture (random noise codes poorly)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1) * 80 + 128
    texture = rng.normal(0, 12, (height, width, 3))
    return np.clip(base + texture, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("quality", [1, 2, 3, 4, 5, 6])
def test_round_trip_symbols_and_reconstruction(codec: Codec, quality: int) -> None:
    image = smooth_image(96, 128, seed=quality)
    data = codec.compress(image, quality)
    enc = codec.encoder_latents(image, quality)
    y_hat, decoded = codec.decode_latents(data)
    expected = [enc["z_symbols"].numpy()] + [s[0].numpy() for s, _ in enc["passes"]]
    assert len(decoded) == len(expected) == 1 + codec.net.context.num_passes
    for got, want in zip(decoded, expected, strict=True):
        np.testing.assert_array_equal(got.reshape(want.shape), want)
    # the recorded continuous scales are the ones the coded table indexes were picked from
    assert len(enc["scales"]) == len(enc["passes"])
    for (_, indexes), scales in zip(enc["passes"], enc["scales"], strict=True):
        assert torch.equal(codec.net.gaussian.indexes(scales), indexes)
    # the decoder's y_hat is the encoder's, and the image is g_s of it
    assert torch.allclose(y_hat, enc["y_hat"], atol=1e-5)
    x_enc = codec.reconstruct(enc["y_hat"], quality)[0, :, :96, :128]
    out = codec.decompress(data)
    assert out.shape == image.shape and out.dtype == np.uint8
    x_dec = torch.from_numpy(out).permute(2, 0, 1).float() / 255
    assert (x_dec - x_enc).abs().max().item() <= 0.5 / 255 + 1e-5


def _table_bits(values: np.ndarray, pmf: np.ndarray, offset: int) -> float:
    """Information content of values under one table; values outside it cost the overflow
    symbol plus their escape (a zigzag LEB128 varint)."""
    coded = values.astype(np.int64) - offset
    inside = (coded >= 0) & (coded < len(pmf) - 1)
    bits = -np.log2(pmf[coded[inside]]).sum()
    outside = values[~inside].astype(np.int64)
    zigzag = (outside << 1) ^ (outside >> 63)
    varint_bytes = np.maximum(1, np.ceil(np.log2(zigzag + 1) / 7))
    return float(bits + (-np.log2(pmf[-1]) * outside.size) + 8 * varint_bytes.sum())


@pytest.mark.parametrize("quality", [1.0, 6.0])
def test_size_matches_information_content(codec: Codec, quality: float) -> None:
    image = smooth_image(256, 256, seed=7)
    data = codec.compress(image, quality)
    enc = codec.encoder_latents(image, quality)
    bits = 0.0
    z_tables, y_tables = codec._z_tables, codec._y_tables
    z = enc["z_symbols"].numpy()
    for ch in range(z.shape[0]):
        pmf = z_tables.pmf(ch)
        bits += _table_bits(z[ch].ravel(), pmf, int(z_tables.offsets[ch]))
    for symbols, indexes in enc["passes"]:
        s, ix = symbols[0].numpy().ravel(), indexes[0].numpy().ravel()
        for table in np.unique(ix):
            bits += _table_bits(s[ix == table], y_tables.pmf(int(table)), int(y_tables.offsets[table]))
    payload = sum(len(s) for s in unpack(data)[1])
    assert abs(payload * 8 - bits) <= 0.03 * bits, (payload * 8, bits)


def test_fractional_quality_lies_between_neighbours(codec: Codec) -> None:
    image = smooth_image(128, 128, seed=3)
    sizes = [len(codec.compress(image, q)) for q in (2.0, 2.5, 3.0)]
    assert sizes[0] != sizes[1] != sizes[2]
    assert min(sizes[0], sizes[2]) <= sizes[1] <= max(sizes[0], sizes[2])


def test_batch_of_eight_is_byte_identical_to_single(codec: Codec) -> None:
    images = [smooth_image(100, 120, seed=s) for s in range(8)]  # one padded shape: 128 x 128
    solo = [codec.compress(im, 3.5) for im in images]
    batched = codec.compress_batch(images, 3.5)
    assert batched == solo
    decoded_solo = [codec.decompress(d) for d in solo]
    decoded_batch = codec.decompress_batch(solo)
    for a, b in zip(decoded_solo, decoded_batch, strict=True):
        np.testing.assert_array_equal(a, b)


def test_thread_count_does_not_change_streams(codec: Codec) -> None:
    image = smooth_image(128, 192, seed=11)
    with torch_threads(1):
        one = codec.compress(image, 4)
        img_one = codec.decompress(one)
    with torch_threads(2):
        two = codec.compress(image, 4)
        img_two = codec.decompress(two)
    assert one == two
    # g_s runs with the caller's threads: documented to differ by at most one level
    assert np.abs(img_one.astype(int) - img_two.astype(int)).max() <= 1


def onednn_avx512() -> bool:
    """Whether oneDNN runs AVX-512 kernels: the CPU has them and the environment does not narrow it."""
    isa = os.environ.get("DNNL_MAX_CPU_ISA", os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL")).upper()
    narrowed = isa not in ("ALL", "DEFAULT") and not isa.startswith(("AVX512", "AVX10", "AMX"))
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512f" in flags.split() and not narrowed


@pytest.mark.skipif(
    not onednn_avx512(),
    reason="with oneDNN's AVX2 kernels, 1 and 2 entropy threads gave other streams (measured "
    "2026-12-06 under DNNL_MAX_CPU_ISA=AVX2); exact everywhere once the entropy path is integer (issue 38)",
)
def test_entropy_thread_count_does_not_change_streams(codec: Codec) -> None:
    """The pinned entropy-parameter path gives the same streams with 1 or 2 threads (checked by hand
    on 4 Kodak images x 7 qualities, shipped and random weights: 56 of 56 streams identical). The
    means behind y_hat are bit-identical on the AMD EPYCs, not on an Intel Xeon (Sapphire Rapids):
    there one decoded value of 147 456 differed by one level, so the images may differ by that."""
    one_thread = Codec(codec.net, entropy_threads=1)
    assert codec.entropy_threads == 2
    for quality, seed in ((1, 1), (3.5, 2), (6, 3)):
        image = smooth_image(192, 256, seed=seed)
        stream = codec.compress(image, quality)
        assert one_thread.compress(image, quality) == stream
        a, b = one_thread.decompress(stream), codec.decompress(stream)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
        assert np.count_nonzero(a != b) <= a.size // 10_000


@pytest.mark.parametrize("shape", [(1, 1), (5, 70), (64, 64), (63, 65), (130, 17)])
def test_any_size_round_trips_at_original_size(codec: Codec, shape: tuple[int, int]) -> None:
    image = smooth_image(*shape, seed=1)
    data = codec.compress(image, 2)
    header = codec.read_header(data)
    assert (header.height, header.width) == shape
    assert codec.decompress(data).shape == (*shape, 3)


def test_quality_out_of_range_is_rejected(codec: Codec) -> None:
    image = smooth_image(64, 64, seed=0)
    for q in (0.99, 6.01, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            codec.compress(image, q)


def test_flip_mirrors_by_bit_and_is_its_own_inverse() -> None:
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    assert flip(image, 0) is image
    np.testing.assert_array_equal(flip(image, 1), image[:, ::-1])
    np.testing.assert_array_equal(flip(image, 2), image[::-1])
    np.testing.assert_array_equal(flip(image, 3), image[::-1, ::-1])
    for orientation in ORIENTATIONS:
        assert flip(image, orientation).flags.c_contiguous
        np.testing.assert_array_equal(flip(flip(image, orientation), orientation), image)
    for bad in (-1, 4, 1.0, True):
        with pytest.raises(ValueError, match="orientation"):
            flip(image, bad)  # type: ignore[arg-type]


def test_each_orientation_codes_the_flipped_image_and_decodes_it_the_right_way_up(codec: Codec) -> None:
    image = smooth_image(72, 104, seed=7)
    for orientation in ORIENTATIONS:
        data = codec.compress(image, 3, orientations=(orientation,))
        upright = codec.compress(flip(image, orientation), 3)
        header, streams = unpack(data)
        assert header.orientation == orientation and streams == unpack(upright)[1]
        np.testing.assert_array_equal(codec.decompress(data), flip(codec.decompress(upright), orientation))
        assert codec.decompress(data).shape == image.shape


def test_orientation_search_keeps_the_stream_of_lowest_rate_distortion_cost(codec: Codec) -> None:
    image = smooth_image(72, 104, seed=8)
    lmbda = lambda_for_quality(codec.net.config.lambdas, 2.5)
    streams = {o: codec.compress(image, 2.5, orientations=(o,)) for o in ORIENTATIONS}
    costs = {}
    for o, data in streams.items():
        mse = np.mean((codec.decompress(data).astype(np.float64) - image) ** 2)
        costs[o] = 8 * len(data) / image[..., 0].size + lmbda * mse
    assert len(set(costs.values())) == len(ORIENTATIONS)  # the search has a real choice to make
    best = min(costs, key=costs.__getitem__)
    assert codec.compress(image, 2.5, orientations=ORIENTATIONS) == streams[best]
    assert codec.compress(image, 2.5, orientations=ORIENTATIONS[::-1]) == streams[best]
    worst = max(costs, key=costs.__getitem__)
    assert codec.compress_batch([image, image], 2.5, orientations=(worst, best)) == [streams[best]] * 2
    assert codec.compress(image, 2.5) == streams[0]  # the default codes the image as it is


def test_bad_orientation_lists_are_rejected(codec: Codec) -> None:
    image = smooth_image(64, 64, seed=0)
    for bad in ((), (4,), (-1,), (0, 0), (True,), (1.0,), None, 3):
        with pytest.raises(ValueError, match="orientations"):
            codec.compress(image, 3, orientations=bad)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def small_stream(codec: Codec) -> bytes:
    return codec.compress(smooth_image(64, 64, seed=2), 1)


def test_every_truncation_is_rejected(codec: Codec, small_stream: bytes) -> None:
    for n in range(len(small_stream)):
        with pytest.raises(BitstreamError):
            codec.decompress(small_stream[:n])


def test_every_bit_flip_is_rejected(codec: Codec, small_stream: bytes) -> None:
    for i in range(len(small_stream) * 8):
        data = bytearray(small_stream)
        data[i // 8] ^= 1 << (i % 8)
        with pytest.raises(BitstreamError):
            codec.decompress(bytes(data))


def test_payload_with_valid_crc_but_wrong_symbols_is_reported(codec: Codec) -> None:
    """A desynchronised decode (here: altered coded words with recomputed container CRCs)
    must raise instead of returning an image: the symbol checksum catches it."""
    header, streams = unpack(codec.compress(smooth_image(128, 128, seed=4), 4))
    (coded,) = streams
    for position in np.linspace(8, len(coded) - 8, 6).astype(int):
        altered = bytearray(coded)
        altered[position] ^= 0x5A
        with pytest.raises(BitstreamError):
            codec.decompress(pack(header, [bytes(altered)]))


def test_streams_of_other_weights_or_shapes_are_refused(codec: Codec, small_stream: bytes) -> None:
    header, streams = unpack(small_stream)
    fields = {f: getattr(header, f) for f in Header.__dataclass_fields__}
    for change in (
        {"weights_digest": b"\x00" * 8},
        {"model_id": "lalic"},
        {"height": 200},
        {"y_shape": (160, 8, 8)},
        {"tiling": (256, 256, 16)},
    ):
        forged = pack(Header(**{**fields, **change}), streams)
        with pytest.raises(BitstreamError):
            codec.decompress(forged)
    with pytest.raises(BitstreamError):
        codec.decompress(pack(header, streams[:-1]))


def test_huge_declared_sizes_fail_fast(codec: Codec, small_stream: bytes) -> None:
    header, streams = unpack(small_stream)
    fields = {f: getattr(header, f) for f in Header.__dataclass_fields__}
    forged = pack(Header(**{**fields, "height": 65535, "width": 65535}), streams)
    start = time.perf_counter()
    with pytest.raises(BitstreamError):
        codec.decompress(forged)
    assert time.perf_counter() - start < 0.5


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=400))
def test_random_bytes_raise_the_documented_error(codec: Codec, data: bytes) -> None:
    with pytest.raises(BitstreamError):
        codec.decompress(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_mutations_never_escape(codec: Codec, small_stream: bytes, data: st.DataObject) -> None:
    header, streams = unpack(small_stream)
    k = data.draw(st.integers(0, len(streams) - 1))
    blob = bytearray(streams[k])
    for _ in range(data.draw(st.integers(1, 4))):
        if blob:
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    forged = pack(header, [*streams[:k], bytes(blob), *streams[k + 1 :]])
    try:
        out = codec.decompress(forged)
    except BitstreamError:
        return
    # only an unchanged symbol sequence may decode; then it is the original image
    np.testing.assert_array_equal(out, codec.decompress(small_stream))


def test_bpp_is_counted_over_original_pixels(codec: Codec) -> None:
    image = smooth_image(70, 90, seed=9)
    data = codec.compress(image, 3)
    assert math.isclose(8 * len(data) / (70 * 90), 8 * len(data) / image[..., 0].size)
