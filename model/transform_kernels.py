"""Fused CPU kernels of g_a and g_s (``model/_transform_kernels.c``) as PyTorch operators.

The analysis and synthesis transforms are outside the entropy path: their results must be close to
the float32 network's, not reproducible to the bit, so these kernels use fast float arithmetic
(unlike :mod:`model.fixedpoint`'s). The operators are registered whether or not the extension was
built, so that modules calling them can be scripted; :func:`available` says whether they run.

- ``torch.ops.lalic.biwkv_gated(kvr, decay, boost)``: ``sigmoid(r) * BiWKV(k, v)`` (LALIC Eq. 2-3)
  for a channels-last ``[k | v | r]`` (B, T, 3C) in float32 or bfloat16, with ``w = decay / T`` and
  ``u = boost / T`` as in :func:`model.layers.biwkv`; (B, T, C) in the input's dtype. Two linear
  recurrences over the tokens (float32 inside chunks of 64, double between them), instead of
  chunked matrix products.
- ``torch.ops.lalic.subpixel_conv(x, packed_weight, bias, bf16_products)``: g_s's last layer, the
  sub-pixel form of a stride-2 transposed convolution (an S x S 'same' convolution to 4 cout
  channels, then ``pixel_shuffle(2)``; :class:`model.transforms.ConvTranspose2d`) in one pass over a
  channels-last float32 or bfloat16 map, float32 out: no widened copy of a bfloat16 map, no
  shuffled copy. A bfloat16 map on a CPU with AVX512-BF16 is multiplied in bfloat16 pairs (the
  weights rounded to bfloat16, exact products, float32 sums) unless ``bf16_products`` is False;
  otherwise float32 FMAs.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # built by `pip install` (setup.py); a checkout without it runs model.layers' PyTorch code
    from model import _transform_kernels as _native
except ImportError:
    _native = None

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
"""Dtypes of the token maps the kernels read and write."""

SUBPIXEL_MAX_OUTPUTS = 16
"""Most output channels (4 per channel of the shuffled map) of :func:`subpixel_conv`: its
accumulators stay in vector registers."""
SUBPIXEL_MAX_SIZE = 15
"""Largest (odd) kernel side of :func:`subpixel_conv`."""


def available() -> bool:
    """Whether the fused kernels were built for this installation."""
    return _native is not None


def usable(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether the kernels serve tensors of ``dtype`` on ``device`` (CPU, a supported dtype, built)."""
    return available() and torch.device(device).type == "cpu" and dtype in SUPPORTED_DTYPES


@torch.library.custom_op("lalic::biwkv_gated", mutates_args=(), device_types="cpu")
def biwkv_gated(kvr: Tensor, decay: Tensor, boost: Tensor) -> Tensor:
    """``sigmoid(r) * BiWKV(k, v)`` for channels-last ``[k | v | r]`` (B, T, 3C) (module docstring)."""
    if _native is None:
        raise RuntimeError("model._transform_kernels was not built (pip install . compiles it)")
    if kvr.dtype not in SUPPORTED_DTYPES or kvr.dim() != 3 or kvr.shape[-1] % 3:
        raise ValueError(f"biwkv_gated: (B, T, 3C) float32 or bfloat16, got {kvr.dtype} {tuple(kvr.shape)}")
    b, t, c3 = kvr.shape
    c = c3 // 3
    x = kvr.contiguous()
    w = decay.detach().to(torch.float32).contiguous()
    u = boost.detach().to(torch.float32).contiguous()
    if w.shape != (c,) or u.shape != (c,):
        got = f"{tuple(w.shape)}, {tuple(u.shape)}"
        raise ValueError(f"biwkv_gated: decay and boost of shape ({c},), got {got}")
    out = torch.empty((b, t, c), dtype=x.dtype)
    if out.numel():
        bf16, threads = x.dtype == torch.bfloat16, torch.get_num_threads()
        _native.biwkv_gated(x.data_ptr(), b, t, c, bf16, w.data_ptr(), u.data_ptr(), out.data_ptr(), threads)
    return out


@biwkv_gated.register_fake
def _(kvr: Tensor, decay: Tensor, boost: Tensor) -> Tensor:
    b, t, c3 = kvr.shape
    return kvr.new_empty((b, t, c3 // 3))


def bf16_dot_supported(x: Tensor) -> bool:
    """Whether :func:`subpixel_conv` multiplies ``x`` in bfloat16 pairs: a bfloat16 map on a CPU with
    AVX512-BF16 (and the extension built)."""
    return _native is not None and x.dtype == torch.bfloat16 and _native.bf16_dot_supported()


def pack_subpixel_weight(weight: Tensor) -> Tensor:
    """A sub-pixel kernel ``(N, C, S, S)`` (:func:`model.transforms.subpixel_kernel`) in the layout
    :func:`subpixel_conv` reads: ``(S, S, C, N)`` float32, contiguous."""
    return weight.detach().to(torch.float32).permute(2, 3, 1, 0).contiguous()


@torch.library.custom_op("lalic::subpixel_conv", mutates_args=(), device_types="cpu")
def subpixel_conv(x: Tensor, packed_weight: Tensor, bias: Tensor, bf16_products: bool = True) -> Tensor:
    """``pixel_shuffle(conv2d(x, w, bias, padding=S // 2), 2)`` in one pass: ``x`` (B, C, H, W) float32
    or bfloat16 (channels-last is read without a copy), ``packed_weight`` from
    :func:`pack_subpixel_weight` (``N = 4 cout`` outputs, at most 16), ``bias`` (N,); a
    channels-last float32 (B, cout, 2H, 2W) (the module docstring)."""
    if _native is None:
        raise RuntimeError("model._transform_kernels was not built (pip install . compiles it)")
    size, size2, c, n = packed_weight.shape
    if x.dtype not in SUPPORTED_DTYPES or x.dim() != 4 or x.shape[1] != c:
        raise ValueError(f"subpixel_conv: (B, {c}, H, W) float32 or bfloat16, got {x.dtype} {tuple(x.shape)}")
    if (
        size != size2
        or size % 2 == 0
        or size > SUBPIXEL_MAX_SIZE
        or n % 4
        or not 4 <= n <= SUBPIXEL_MAX_OUTPUTS
        or bias.shape != (n,)
    ):
        raise ValueError(
            f"subpixel_conv: packed weight (S, S, C, N), S odd up to 15, N in 4..16 and a multiple of 4, "
            f"bias (N,); got {tuple(packed_weight.shape)}, {tuple(bias.shape)}"
        )
    b, _, h, w = x.shape
    image = x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C): no copy for a channels-last map
    weight = packed_weight.to(torch.float32).contiguous()
    shift = bias.detach().to(torch.float32).contiguous()
    out = torch.empty((b, 2 * h, 2 * w, n // 4), dtype=torch.float32)
    if out.numel():
        _native.subpixel_conv(
            image.data_ptr(), b, h, w, c, image.dtype == torch.bfloat16, weight.data_ptr(), shift.data_ptr(),
            size, n, out.data_ptr(), torch.get_num_threads(), bf16_products and bf16_dot_supported(x),
        )  # fmt: skip
    return out.permute(0, 3, 1, 2)


@subpixel_conv.register_fake
def _(x: Tensor, packed_weight: Tensor, bias: Tensor, bf16_products: bool = True) -> Tensor:
    b, _, h, w = x.shape
    n = packed_weight.shape[-1]
    return x.new_empty((b, 2 * h, 2 * w, n // 4), dtype=torch.float32).permute(0, 3, 1, 2)
