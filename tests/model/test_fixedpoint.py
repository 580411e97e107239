"""The reproducible kernels of model.fixedpoint: exact products, no overflow, defined roundings."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model.fixedpoint as fx
from model.bitstream import BitstreamError, Container, Header, pack, symbols_crc32
from model.codec import Codec
from model.coder import SymbolEncoder
from model.context import SelectingNetworks, anchor_mask
from model.exact import LATENT_LIMIT, LatentRangeError, exact_entropy_path
from model.layers import biwkv_reference

EXP_TABLES_DIGEST = "279b0c068e03da52"
"""The digest of the exp and sigmoid tables: every stream of version 2 depends on these bits."""


@pytest.fixture(scope="module")
def shipped() -> Codec:
    return Codec.from_pretrained()


def reference_product(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rule 1's product of integer mantissas in int64: ``2**7 hi hi + hi lo + lo hi`` (no ``lo lo``)."""
    qh, ql = (t.to(torch.int64) for t in fx.int8_digits(q))
    wh, wl = (t.to(torch.int64) for t in fx.int8_digits(w))
    return 128 * (qh @ wh) + qh @ wl + ql @ wh


def test_tables_are_pinned_and_accurate() -> None:
    assert fx.exp_table_digest() == EXP_TABLES_DIGEST
    units = torch.arange(-fx.EXP_RANGE << 16, (fx.EXP_RANGE << 16) + 1, 977, dtype=torch.int32)
    got = fx.exp_units(units).double()
    want = torch.exp(units.double() / 65536)
    assert float(((got - want) / want).abs().max()) < 2.5e-7
    x = torch.linspace(-20, 20, 100_001)
    assert float((fx.sigmoid(x).double() - torch.sigmoid(x.double())).abs().max()) < 2**-12 + 1e-7


@pytest.mark.parametrize("extreme", [False, True])
def test_products_are_exact_in_int8_and_float64(extreme: bool) -> None:
    """Both kernels return the exact int32 of rule 1 rounded once to float32, up to the largest
    fan-in: int32 cannot overflow (all digits at +-64 is the worst case)."""
    gen = torch.Generator().manual_seed(1)
    m, k, n = (33, fx.MAX_FAN_IN, 17) if extreme else (200, 417, 130)
    if extreme:
        q = torch.full((m, k), 8192.0)
        q[1::2] = -8192.0
        w = torch.full((k, n), 8192.0)
        w[:, 1::2] = -8192.0
    else:
        q = torch.randint(-8192, 8193, (m, k), generator=gen).float()
        w = torch.randint(-8192, 8193, (k, n), generator=gen).float()
    product = fx.ExactProduct(w)
    both = fx.int8_digit_rows(q)
    want = reference_product(q, w)
    assert int(want.abs().max()) < 2**31
    for use_int8 in (True, False):
        assert torch.equal(product(both, use_int8=use_int8), want.to(torch.float32))


def test_digits_stay_within_seven_bits() -> None:
    q = torch.arange(-8192, 8193).float()
    hi, lo = fx.int8_digits(q)
    assert torch.equal(hi.long() * 128 + lo.long(), q.long())
    assert int(hi.abs().max()) <= 64 and int(lo.abs().max()) <= 64


def test_linear_and_convolutions_match_their_float_versions_and_their_other_kernel() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 37, 50, generator=gen)
    weight, bias = torch.randn(30, 50, generator=gen), torch.randn(30, generator=gen)
    linear = fx.ExactLinear(weight, bias)
    out = linear(x)
    assert torch.equal(out, linear(x, use_int8=False))
    assert float((out - F.linear(x, weight, bias)).abs().max()) < 2e-3 * float(
        F.linear(x, weight).abs().max()
    )

    image = torch.randn(2, 12, 9, 11, generator=gen)
    for groups, cin in ((1, 12), (12, 1)):
        w = torch.randn(12, cin, 5, 5, generator=gen)
        b = torch.randn(12, generator=gen)
        conv = fx.ExactConv2d(w, b, 2, groups=groups)
        native = conv(image)
        assert torch.equal(native, conv(image, native=False))
        want = F.conv2d(image, w, b, padding=2, groups=groups).permute(0, 2, 3, 1)
        assert float((native - want).abs().max()) < 2e-3 * float(want.abs().max())
        # one image alone gives the same bits as inside the batch
        assert torch.equal(conv(image[1:]), native[1:])


def test_layer_norm_has_exact_moments() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 64, generator=gen) * torch.logspace(-3, 3, 5)[:, None]
    w, b = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    out = fx.layer_norm(x, w, b, 1e-5)
    # 12-bit rows: a deviation is off by at most one unit of 2**-11 of the row maximum (about 3 sigma)
    assert float((out - F.layer_norm(x, (64,), w, b, 1e-5)).abs().max()) < 2**-9 * float(w.abs().max())
    assert torch.equal(fx.layer_norm(x[2:3], w, b, 1e-5), out[2:3])  # rows are independent
    assert torch.equal(fx.layer_norm(x.flip(-1), w.flip(0), b.flip(0), 1e-5), out.flip(-1))  # no order


@pytest.mark.parametrize("t", [1, 7, 64, 300])
def test_biwkv_matches_the_definition(t: int) -> None:
    gen = torch.Generator().manual_seed(t)
    c = 6
    decay = torch.linspace(-3, 3, c)
    boost = torch.randn(c, generator=gen)
    k = torch.randn(2, c, t, generator=gen) * 3
    v = torch.randn(2, c, t, generator=gen)
    wkv = fx.BiWKV(decay, boost)
    got = wkv(k, v)
    want = biwkv_reference(decay.double() / t, boost.double() / t, k.double(), v.double())
    assert float((got.double() - want).abs().max()) < 2e-4
    assert torch.equal(wkv(k[1:], v[1:]), got[1:])
    assert torch.equal(wkv(k.flip(0), v.flip(0)), got.flip(0))


def test_every_layer_of_the_shipped_path_is_within_its_bounds(shipped: Codec) -> None:
    """Building the path checks every fan-in (an ``ExactProduct`` refuses one that could overflow)."""
    fx.check_fan_in(torch.zeros(1, fx.MAX_FAN_IN), "at the limit")
    with pytest.raises(ValueError, match="fan-in"):
        fx.check_fan_in(torch.zeros(1, fx.MAX_FAN_IN + 1), "beyond")
    exact_entropy_path(shipped.net)


def _path_outputs(codec: Codec, z_hat: torch.Tensor, symbols: int, seed: int) -> list:
    """Scales of every pass of the exact path and y_hat, decoding random symbols of magnitude
    ``symbols``; ends with the message of a ``LatentRangeError`` if the path refused its inputs."""
    rng = np.random.default_rng(seed)
    outs: list[torch.Tensor] = []

    def index_fn(scales: torch.Tensor) -> torch.Tensor:
        outs.append(scales.clone())
        return codec.net.gaussian.indexes(scales)

    def decode(i: int, indexes: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(rng.integers(-symbols, symbols + 1, indexes.shape).astype(np.int32))

    try:
        y_hat, _ = codec._entropy_parameters(z_hat, decode=decode, indexes=index_fn)
    except LatentRangeError as exc:
        return [*outs, str(exc)]
    return [*outs, y_hat]


@pytest.mark.parametrize("magnitude", [30, LATENT_LIMIT // 2])
def test_adversarial_latents_neither_overflow_nor_depend_on_the_kernel(
    shipped: Codec, monkeypatch, magnitude: int
) -> None:
    """Latents far beyond what images produce (fuzzed z and y up to half the range limit) give
    finite parameters, the same from the int8 and the float64 kernels (an int32 overflow would
    make them differ), until y_hat leaves the range and both refuse it at the same pass."""
    gen = torch.Generator().manual_seed(magnitude)
    z_hat = torch.randint(-magnitude, magnitude + 1, (1, 96, 2, 3), generator=gen).float()
    int8 = _path_outputs(shipped, z_hat, magnitude, 0)
    monkeypatch.setattr(fx, "use_int8_products", lambda device: False)
    wide = _path_outputs(shipped, z_hat, magnitude, 0)
    assert len(int8) == len(wide) > 1
    assert all(torch.isfinite(t).all() for t in int8 if isinstance(t, torch.Tensor))
    assert all(a == b if isinstance(a, str) else torch.equal(a, b) for a, b in zip(int8, wide, strict=True))
    refused = isinstance(int8[-1], str)
    assert refused == (magnitude > 1000)  # small latents pass; huge ones push y_hat out of range


def test_out_of_range_latents_from_a_corrupt_stream_are_refused(shipped: Codec) -> None:
    """A stream whose z symbols are beyond the path's range (a valid range code, checksums
    repaired) is refused with a BitstreamError, not computed with overflowing values."""
    z_shape, y_shape = (96, 1, 1), (160, 4, 4)
    z = np.zeros(z_shape, dtype=np.int32)
    z[5, 0, 0] = LATENT_LIMIT + 7  # an escaped value
    encoder = SymbolEncoder()
    encoder.encode(z, shipped._z_indexes(z_shape), shipped._z_tables)
    header = Header(
        model_id=shipped.model_id,
        weights_digest=shipped.digest,
        quality=3.0,
        height=64,
        width=64,
        y_shape=y_shape,
        z_shape=z_shape,
        symbol_crc32=symbols_crc32([z]),
    )
    data = pack(*Container(header, [encoder.finish()]))
    with pytest.raises(BitstreamError, match="beyond"):
        shipped.decompress(data)


def test_the_path_does_not_depend_on_threads(shipped: Codec) -> None:
    gen = torch.Generator().manual_seed(4)
    z_hat = torch.randint(-4, 5, (1, 96, 3, 4), generator=gen).float()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _path_outputs(shipped, z_hat, 3, 1)
        torch.set_num_threads(2)
        two = _path_outputs(shipped, z_hat, 3, 1)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    assert math.isfinite(float(one[-1].abs().max()))


def test_zero_leading_inputs_and_chosen_positions_change_no_bit() -> None:
    """The anchors' first projection without their zero spatial context, and the checkerboard
    context at the non-anchors only, give the bits of the whole computation (C kernels and the
    PyTorch reference alike): the row exponents ignore zeros and the exact sums drop zero terms."""
    gen = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(30, 50, generator=gen), torch.randn(30, generator=gen)
    weight[:, :8] *= 40  # the dropped rows hold some channels' largest weights: exponents must stay
    linear = fx.ExactLinear(weight, bias)
    short = linear.without_leading_inputs(8)
    rest = torch.randn(2, 37, 42, generator=gen)
    full = torch.cat([torch.zeros(2, 37, 8), rest], dim=-1)
    with pytest.raises(ValueError, match="cannot drop"):
        linear.without_leading_inputs(50)
    with fx.reference_kernels():
        want_reference = linear(full)
        assert torch.equal(short(rest), want_reference)
    assert torch.equal(short(rest), linear(full)) and torch.equal(linear(full), want_reference)

    taps = torch.arange(5)
    mask = ((taps[:, None] + taps[None, :]) % 2 == 1).float()
    conv = fx.ExactConv2d(torch.randn(6, 3, 5, 5, generator=gen) * mask, torch.randn(6, generator=gen), 2)
    image = torch.randn(2, 3, 9, 11, generator=gen)
    positions = torch.tensor([1, 3, 12, 50, 98, 0])
    for native in (True, False):
        with contextlib.nullcontext() if native else fx.reference_kernels():
            at = conv.at(image, positions)
            whole = conv(image)
        assert at.shape == (2, 6, 6)
        assert torch.equal(at, whole.reshape(2, 99, 6)[:, positions])
    depthwise = fx.ExactConv2d(torch.randn(3, 1, 5, 5, generator=gen), None, 2, groups=3)
    with pytest.raises(ValueError, match="dense"):
        depthwise.at(image, positions)


def test_the_entropy_path_computes_less_for_the_same_parameters(shipped: Codec) -> None:
    """ExactEntropyPath's anchor parameters and non-anchor spatial context equal what the generic
    route (zeros in the tokens, the whole map then the positions) computes, bit for bit."""
    path = shipped._exact
    generic = SelectingNetworks()
    gen = torch.Generator().manual_seed(9)
    for k, g in enumerate(shipped.net.context.slices):
        width = path._params[k].blocks[0][0].product.hi.shape[0]
        context = torch.randn(1, 48, width - 2 * g, generator=gen) * 3
        want = path.params(k, torch.cat([torch.zeros(1, 48, 2 * g), context], dim=-1))
        got = path.anchor_params(k, context, 2 * g)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        anchors = torch.round(torch.randn(1, g, 6, 8, generator=gen) * 4) * anchor_mask(6, 8)
        positions = (~anchor_mask(6, 8)).flatten().nonzero().squeeze(1)
        generic.spatial = path.spatial  # type: ignore[attr-defined]
        assert torch.equal(path.spatial_at(k, anchors, positions), generic.spatial_at(k, anchors, positions))
    with pytest.raises(ValueError, match="spatial context"):
        path.anchor_params(0, context, 3)
