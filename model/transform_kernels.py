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
