"""BiWKV against float64 references; Omni-Shift folding; Bi-RWKV block shapes."""

from __future__ import annotations

import pytest
import torch

from model.layers import BiRWKVBlock, ChannelMix, OmniShift, biwkv, biwkv_reference, reparameterize


def _inputs(batch: int, channels: int, t: int, seed: int, k_span: float = 40.0, decay_max: float = 8.0):
    g = torch.Generator().manual_seed(seed)
    decay = (torch.rand(channels, generator=g) * 2 - 1) * decay_max
    boost = torch.randn(channels, generator=g) * 3
    k = (torch.rand(batch, channels, t, generator=g) * 2 - 1) * k_span
    v = torch.randn(batch, channels, t, generator=g)
    return decay, boost, k, v


def biwkv_scan64(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Float64 reference through prefix sums (scans) in linear space; exact enough in float64
    because |i * w| <= |decay| <= 8 and |k| <= 40 keep every term within e^{±48}."""
    t = k.shape[-1]
    i = torch.arange(t, dtype=torch.float64)
    ek = torch.exp(k)
    fwd_w = ek * torch.exp(i * w[:, None])  # sum_{i<t} e^{-(t-i-1) w + k_i} = e^{-(t-1) w} sum e^{i w + k_i}
    bwd_w = ek * torch.exp(-i * w[:, None])  # sum_{i>t} e^{-(i-t-1) w + k_i} = e^{(t+1) w} sum e^{-i w + k_i}

    def excl_cumsum(x: torch.Tensor, reverse: bool) -> torch.Tensor:
        if reverse:
            x = x.flip(-1)
        c = torch.cumsum(x, -1) - x
        return c.flip(-1) if reverse else c

    num = (
        torch.exp(-(i - 1) * w[:, None]) * excl_cumsum(fwd_w * v, False)
        + torch.exp((i + 1) * w[:, None]) * excl_cumsum(bwd_w * v, True)
        + torch.exp(u[:, None] + k) * v
    )
    den = (
        torch.exp(-(i - 1) * w[:, None]) * excl_cumsum(fwd_w, False)
        + torch.exp((i + 1) * w[:, None]) * excl_cumsum(bwd_w, True)
        + torch.exp(u[:, None] + k)
    )
    return num / den


def _compare(t: int, reference, seed: int = 0, batch: int = 2, channels: int = 3) -> dict[str, float]:
    decay, boost, k, v = _inputs(batch, channels, t, seed)
    ours = [x.clone().requires_grad_() for x in (decay, boost, k, v)]
    ref = [x.double().clone().requires_grad_() for x in (decay, boost, k, v)]
    out = biwkv(ours[0] / t, ours[1] / t, ours[2], ours[3])
    expected = reference(ref[0] / t, ref[1] / t, ref[2], ref[3])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    (out * g).sum().backward()
    (expected * g.double()).sum().backward()
    errors = {"out": (out.detach().double() - expected.detach()).abs().max().item()}
    for name, a, b in zip(("decay", "boost", "k", "v"), ours, ref, strict=True):
        # Errors are absolute, or relative to the gradient's largest magnitude where that is > 1.
        err = (a.grad.double() - b.grad).abs().max().item()
        errors[name] = err / max(1.0, b.grad.abs().max().item())
    return errors


@pytest.mark.parametrize(
    ("t", "seed"), [(t, 0) for t in (1, 2, 7, 63, 64, 65, 200)] + [(1000, 0), (1000, 1), (4096, 0), (4096, 1)]
)
def test_biwkv_matches_quadratic_reference(t: int, seed: int) -> None:
    errors = _compare(t, biwkv_reference, seed=seed)
    assert all(e <= 1e-5 for e in errors.values()), errors


@pytest.mark.parametrize("t", [8192, 16384])
def test_biwkv_matches_float64_scan_on_long_sequences(t: int) -> None:
    errors = _compare(t, biwkv_scan64, batch=1, channels=4)
    assert all(e <= 1e-5 for e in errors.values()), errors


@pytest.mark.parametrize("t", [65, 4096, 16384])
def test_biwkv_inference_path_matches_float64_reference(t: int) -> None:
    """Without autograd, biwkv takes its float32, in-place path: the forward bound holds there too."""
    decay, boost, k, v = _inputs(1, 4, t, seed=3)
    with torch.no_grad():
        out = biwkv(decay / t, boost / t, k, v)
    reference = biwkv_reference if t <= 4096 else biwkv_scan64
    expected = reference(decay.double() / t, boost.double() / t, k.double(), v.double())
    assert (out.double() - expected).abs().max().item() <= 1e-5


def test_scan_reference_agrees_with_quadratic_reference() -> None:
    decay, boost, k, v = (x.double() for x in _inputs(1, 3, 300, seed=5))
    a = biwkv_scan64(decay / 300, boost / 300, k, v)
    b = biwkv_reference(decay / 300, boost / 300, k, v)
    assert (a - b).abs().max().item() < 1e-10


def test_biwkv_is_a_weighted_mean_and_stays_finite_for_extreme_inputs() -> None:
    t = 5000
    k = torch.full((1, 2, t), -60.0)
    k[..., 1234] = 60.0  # one token dominates everything
    v = torch.randn(1, 2, t)
    w = torch.tensor([20.0, -20.0]) / t
    out = biwkv(w, torch.zeros(2), k, v)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[..., 2000], v[..., 1234], atol=1e-5)
    # adding a constant to v shifts the output by that constant
    shifted = biwkv(w, torch.zeros(2), k, v + 3.0)
    assert torch.allclose(shifted, out + 3.0, atol=1e-5)


def test_omnishift_fold_is_exact_and_idempotent() -> None:
    torch.manual_seed(0)
    shift = OmniShift(8)
    x = torch.randn(2, 8, 11, 13)
    before = {k: v.clone() for k, v in shift.state_dict().items() if v is not None}
    y_branches = shift(x)
    assert all(torch.equal(before[k], v) for k, v in shift.state_dict().items() if v is not None), (
        "forward must not change parameters"
    )
    shift.reparameterize()
    kernel = shift.fused.clone()
    shift.reparameterize()  # second call does nothing
    assert torch.equal(kernel, shift.fused)
    assert set(shift.state_dict()) == {"fused"}
    assert torch.allclose(shift(x), y_branches, atol=1e-5)


def test_block_fold_keeps_output_and_shape() -> None:
    torch.manual_seed(0)
    block = BiRWKVBlock(16).eval()
    x = torch.randn(2, 6 * 10, 16)
    with torch.no_grad():
        y = block(x, 6, 10)
        reparameterize(block)
        y2 = block(x, 6, 10)
    assert y.shape == x.shape
    assert torch.allclose(y, y2, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_mix_slabs(dtype: torch.dtype) -> None:
    """Inference computes the Channel Mix in slabs of ``slab_tokens`` (MIX_TOKENS), the last one
    partial; the result equals the unsliced function's."""
    torch.manual_seed(4)
    mix = ChannelMix(8).eval().to(dtype)
    x = torch.randn(1, 5 * 7, 8).to(dtype)
    rows: list[int] = []
    mix.key.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    with torch.no_grad():
        mix.slab_tokens = 1 << 30
        whole = mix(x, 5, 7)
        assert rows == [35]
        rows.clear()
        mix.slab_tokens = 10
        sliced = mix(x, 5, 7)
    assert rows == [10, 10, 10, 5]
    torch.testing.assert_close(sliced, whole, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
