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
- ``torch.ops.lalic.residual(x, gamma, branch)``, ``layer_norm(x, weight, bias, eps)`` and
  ``residual_layer_norm(...)`` (both in one pass): a Bi-RWKV block's residuals and LayerNorms (Sec.
  3.2) over the last dim of a float32 or bfloat16 token map, float32 statistics, rounded once to
  the map's dtype. :class:`model.layers.BiRWKVBlock` takes them for bfloat16 blocks, where
  PyTorch's passes are slowest (g_a 5-6 % faster; BENCHMARKS.md).
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


def _require_built() -> None:
    """Raise if the extension was not built: the operators are registered, but cannot run."""
    if _native is None:
        raise RuntimeError("model._transform_kernels was not built (pip install . compiles it)")


def usable(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether the kernels serve tensors of ``dtype`` on ``device`` (CPU, a supported dtype, built)."""
    return available() and torch.device(device).type == "cpu" and dtype in SUPPORTED_DTYPES


@torch.library.custom_op("lalic::biwkv_gated", mutates_args=(), device_types="cpu")
def biwkv_gated(kvr: Tensor, decay: Tensor, boost: Tensor) -> Tensor:
    """``sigmoid(r) * BiWKV(k, v)`` for channels-last ``[k | v | r]`` (B, T, 3C) (module docstring)."""
    _require_built()
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
    _require_built()
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


def _float_vector(v: Tensor, n: int, what: str) -> Tensor:
    """``v`` as a contiguous float32 vector of length ``n`` (a ValueError naming ``what`` otherwise)."""
    vector = v.detach().to(torch.float32).contiguous()
    if vector.shape != (n,):
        raise ValueError(f"{what}: ({n},), got {tuple(vector.shape)}")
    return vector


def _token_rows(x: Tensor, what: str) -> Tensor:
    """``x`` contiguous, if the kernels are built and take its dtype."""
    _require_built()
    if x.dtype not in SUPPORTED_DTYPES or x.dim() < 1:
        raise ValueError(f"{what}: a float32 or bfloat16 token map, got {x.dtype} {tuple(x.shape)}")
    return x.contiguous()


def _residual_norm(
    x: Tensor,
    gamma: Tensor | None,
    branch: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor | None, Tensor | None]:
    """The C pass behind :func:`residual`, :func:`layer_norm` and :func:`residual_layer_norm`."""
    x = _token_rows(x, "residual_norm")
    c = x.shape[-1]
    rows = x.numel() // c if c else 0
    ptrs = [0, 0, 0, 0]
    keep = []  # the float32 vectors must live until the kernel returns
    total = normed = None
    if branch is not None:
        if gamma is None or branch.shape != x.shape or branch.dtype != x.dtype:
            raise ValueError(
                f"residual: branch {branch.dtype} {tuple(branch.shape)} for x {x.dtype} {tuple(x.shape)}"
            )
        branch = branch.contiguous()
        keep += [branch, _float_vector(gamma, c, "residual gamma")]
        ptrs[0], ptrs[1] = branch.data_ptr(), keep[-1].data_ptr()
        total = torch.empty_like(x)
    if weight is not None:
        if bias is None:
            raise ValueError("layer_norm: a weight needs a bias")
        keep += [_float_vector(weight, c, "layer_norm weight"), _float_vector(bias, c, "layer_norm bias")]
        ptrs[2], ptrs[3] = keep[-2].data_ptr(), keep[-1].data_ptr()
        normed = torch.empty_like(x)
    if rows:
        _native.residual_norm(
            x.data_ptr(), ptrs[0], ptrs[1], ptrs[2], ptrs[3], eps, rows, c, x.dtype == torch.bfloat16,
            0 if total is None else total.data_ptr(), 0 if normed is None else normed.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
    return total, normed


@torch.library.custom_op("lalic::residual", mutates_args=(), device_types="cpu")
def residual(x: Tensor, gamma: Tensor, branch: Tensor) -> Tensor:
    """``x + gamma * branch`` over the last dim (a Bi-RWKV block's residual, Sec. 3.2), rounded once
    to ``x``'s dtype (float32 or bfloat16): PyTorch's ``addcmul`` without its slow bfloat16 path."""
    total, _ = _residual_norm(x, gamma, branch, None, None, 0.0)
    assert total is not None
    return total


@residual.register_fake
def _(x: Tensor, gamma: Tensor, branch: Tensor) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("lalic::layer_norm", mutates_args=(), device_types="cpu")
def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dim (float32 statistics, output in ``x``'s dtype), one pass per row."""
    _, normed = _residual_norm(x, None, None, weight, bias, eps)
    assert normed is not None
    return normed


@layer_norm.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("lalic::residual_layer_norm", mutates_args=(), device_types="cpu")
def residual_layer_norm(
    x: Tensor, gamma: Tensor, branch: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """``s = x + gamma * branch`` (rounded to ``x``'s dtype) and ``layer_norm(s)``, in one pass:
    the residual of a Bi-RWKV block's first half and the LayerNorm its second half reads."""
    total, normed = _residual_norm(x, gamma, branch, weight, bias, eps)
    assert total is not None and normed is not None
    return total, normed


@residual_layer_norm.register_fake
def _(
    x: Tensor, gamma: Tensor, branch: Tensor, weight: Tensor, bias: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(x), torch.empty_like(x)
