"""Building blocks of LALIC: BiWKV linear attention, Omni-Shift and the Bi-RWKV block.

Tensors inside the transforms are kept as token sequences ``(B, T, C)`` in raster order
(``T = H * W``), which is the memory layout of a channels-last ``(B, C, H, W)`` map. The
helpers :func:`tokens_to_map` and :func:`map_to_tokens` switch views without copying.

References are to "Linear Attention Modeling for Learned Image Compression" (Feng et al.,
CVPR 2025, arXiv 2502.05741), Sec. 3.2 (Bi-RWKV block), Eq. (2)-(4) (Spatial Mix, BiWKV,
Channel Mix), and Vision-RWKV (Duan et al., 2024) for Omni-Shift.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import transform_kernels  # registers torch.ops.lalic.biwkv_gated, which scripting resolves

CHUNK = 64
"""Tokens per chunk in :func:`biwkv`."""

MIX_TOKENS = 2048
"""Tokens per slab in the inference Channel Mix (keeps the 4C hidden layer in cache). Larger slabs
(4 MiB of hidden layer) were 1-8 % faster for g_a, but made a float32 g_a's oneDNN products, and so
some streams, differ between one and two threads (BENCHMARKS.md, "g_s's last layer as one kernel,
and PNG on two threads")."""


def eager_inference() -> bool:
    """True in eager, no-grad execution: inference-only fast paths (in-place ops, token slabs) may run.

    False while autograd records (training), and while tracing or exporting (``torch.export``,
    ONNX), where the plain formulation keeps graphs free of shape-dependent Python loops.
    TorchScript takes the fast path whenever grad mode is off (its loops are real loops).
    """
    if torch.jit.is_scripting():
        return not torch.is_grad_enabled()
    if torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled()


def exporting_onnx() -> bool:
    """True while ``torch.onnx.export`` traces the model (Spatial Mix then emits :func:`biwkv_onnx_node`)."""
    if torch.jit.is_scripting():
        return False
    return torch.onnx.is_in_onnx_export()


def precise_decay_gradient(w: Tensor) -> bool:
    """True when eager autograd records a gradient for the BiWKV decay ``w`` (training).

    :func:`biwkv` then keeps its carried part and the final ratio in float64: the decay gradient
    sums ``B * T`` terms weighted by token distances up to ``T``, and float32 there left errors
    of 1-3e-5 relative (T = 1000-16 384); float64 brings them under 1e-6 for ~5 % of a training
    step. Inference, tracing and export keep the float32 path (and its exact bitstreams).
    """
    if torch.jit.is_scripting():
        return False
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        return False
    return torch.is_grad_enabled() and w.requires_grad


def tokens_to_map(x: Tensor, height: int, width: int) -> Tensor:
    """``(B, T, C)`` tokens -> ``(B, C, H, W)`` map in channels-last memory (a view)."""
    b, _, c = x.shape
    return x.view(b, height, width, c).permute(0, 3, 1, 2)


def map_to_tokens(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` map -> ``(B, T, C)`` tokens (a view when ``x`` is channels-last)."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def _decay_matrix(w: Tensor, u: Tensor, size: int) -> Tensor:
    """Per-channel ``(C, L, L)`` kernel ``e^{-(|t-i|-1) w}`` off the diagonal and ``e^{u}`` on it."""
    idx = torch.arange(size, device=w.device, dtype=w.dtype)
    dist = (idx[:, None] - idx[None, :]).abs()
    off = torch.exp(-(dist - 1.0)[None] * w[:, None, None])
    eye = torch.eye(size, device=w.device, dtype=torch.bool)
    return torch.where(eye[None], torch.exp(u)[:, None, None], off)


def _exclusive_logcumsumexp(x: Tensor, reverse: bool) -> Tensor:
    """``log sum_{j<i} e^{x_j}`` along the last dim (``j>i`` when ``reverse``); ``-inf`` when empty.

    In eager no-grad float64 use, rows whose values span less than 600 take ``log(cumsum(e^{x -
    max}))``: every term stays above e^-600 (float64 keeps them) and it is ~7x faster than
    ``logcumsumexp`` (3.6 -> 0.5 ms on (1, 48, 2, 1536)); other inputs use ``logcumsumexp``.
    """
    if x.dtype == torch.float64 and eager_inference() and not x.requires_grad:
        hi = x.amax(dim=-1, keepdim=True)
        if bool(((hi - x.amin(dim=-1, keepdim=True)) < 600).all()):
            terms = torch.exp(x - hi)
            if reverse:
                terms = terms.flip(-1)
            inclusive = torch.cumsum(terms, dim=-1)
            out = torch.cat([torch.zeros_like(inclusive[..., :1]), inclusive[..., :-1]], dim=-1)
            out = out.log_().add_(hi)
            return out.flip(-1) if reverse else out
    if reverse:
        x = x.flip(-1)
    inclusive = torch.logcumsumexp(x, dim=-1)
    pad = torch.full_like(inclusive[..., :1], float("-inf"))
    out = torch.cat([pad, inclusive[..., :-1]], dim=-1)
    return out.flip(-1) if reverse else out


def biwkv(w: Tensor, u: Tensor, k: Tensor, v: Tensor, chunk: int = CHUNK) -> Tensor:
    """Bidirectional WKV (paper Eq. 3), exactly, in O(T·C) time and float32-safe.

    ``wkv_t = (sum_{i!=t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t)
             / (sum_{i!=t} e^{-(|t-i|-1) w + k_i} + e^{u + k_t})``

    Args:
        w, u: per-channel decay and bonus, shape ``(C,)``, already divided by ``T``.
        k, v: ``(B, C, T)``.

    The sequence is cut into chunks of ``chunk`` tokens. Inside a chunk the sum is one batched
    matrix product with the ``(L, L)`` decay kernel, on ``e^{k - m}`` where ``m`` is the chunk's
    maximum of ``k``. Contributions from other chunks are carried as chunk summaries whose
    logarithms are accumulated with ``logcumsumexp``, so neither large ``|k|`` spreads nor long
    sequences overflow or underflow. Because the output is a convex combination of ``v``,
    ``v`` is shifted to be positive (``wkv(v + s) = wkv(v) + s``), which keeps every summary
    positive and its logarithm finite. Shifts are detached: the result does not depend on them.
    While training (:func:`precise_decay_gradient`) the carried part and the final ratio run in
    float64 and only the in-chunk product stays float32: gradients of every input, the decay
    included, then stay within 1e-6 of a float64 reference (tests/model/test_layers.py).
    """
    b, c, t = k.shape
    chunk = min(chunk, t)  # keeps every in-chunk distance times |w| below |decay|
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    v_min = v.detach().amin(dim=-1, keepdim=True)
    v_max = v.detach().amax(dim=-1, keepdim=True)
    # floor the span relative to |v| so that v - shift stays clearly positive in float32
    v_span = torch.maximum(v_max - v_min, 1e-4 * torch.maximum(v_max.abs(), v_min.abs())).clamp_min(1e-6)
    shift = v_min - 0.05 * v_span  # v - shift lies in [0.05 span, 1.05 span]: positive, small
    v = v - shift
    if pad:
        k = F.pad(k, (0, pad), value=-1e4)
        v = F.pad(v, (0, pad))
    k = k.reshape(b, c, n_chunks, chunk)
    v = v.reshape(b, c, n_chunks, chunk)
    m = k.detach().amax(dim=-1, keepdim=True)  # (B, C, n, 1)
    ek = torch.exp(k - m)
    both = torch.cat([ek * v, ek], dim=2)  # (B, C, 2n, L): numerator and denominator rows

    kernel = _decay_matrix(w, u, chunk)  # symmetric
    if n_chunks == 1:  # the whole sequence is one chunk: nothing to carry
        intra = torch.matmul(both, kernel)
        return intra[:, :, 0] / intra[:, :, 1] + shift
    precise = precise_decay_gradient(w)
    carry_dtype = torch.float64 if precise else k.dtype  # of the carried part and the final ratio
    pos = torch.arange(chunk, device=k.device, dtype=carry_dtype)
    w_carry = w.to(carry_dtype)
    # Chunk summaries, decayed to the chunk's last token (for later chunks) and first token.
    to_end = torch.exp(-(chunk - 1 - pos)[None] * w_carry[:, None])  # (C, L)
    to_start = torch.exp(-pos[None] * w_carry[:, None])
    summ = torch.matmul(both.to(carry_dtype), torch.stack([to_end, to_start], dim=-1))  # (B, C, 2n, 2)

    # The carry path works on (B, C, n) tensors only, so it runs in float64: exponents of
    # magnitude ~|k| would otherwise lose ~|k| * 6e-8 of relative precision per weight.
    w64 = w.double()[:, None]
    lw = chunk * w64  # decay across one whole chunk
    idx = torch.arange(n_chunks, device=k.device, dtype=torch.float64)
    m64 = m[..., 0].double()  # (B, C, n)
    log_s = torch.log(summ.double()).view(b, c, 2, n_chunks, 2)
    # forward carry into chunk c: sum_{c'<c} e^{m_c'} S_c' e^{-(c-c'-1) L w}; backward likewise
    alpha_f = m64[:, :, None] + log_s[..., 0] + idx * lw[:, None]
    alpha_b = m64[:, :, None] + log_s[..., 1] - idx * lw[:, None]
    carry_f = _exclusive_logcumsumexp(alpha_f, reverse=False) - (idx - 1) * lw[:, None]
    carry_b = _exclusive_logcumsumexp(alpha_b, reverse=True) + (idx + 1) * lw[:, None]
    ref = torch.maximum(m64, torch.maximum(carry_f[:, :, 1], carry_b[:, :, 1])).detach()[:, :, None]
    scale_local = torch.exp(m64[:, :, None] - ref).to(k.dtype)[..., None]  # (B, C, 1, n, 1)
    scale_f = torch.exp(carry_f - ref).to(carry_dtype)  # (B, C, 2, n)
    scale_b = torch.exp(carry_b - ref).to(carry_dtype)

    # Everything from other chunks is rank 2 per chunk: [scale_f, scale_b] @ [e^{-a w}; e^{-(L-1-a) w}].
    carries = torch.stack([scale_f, scale_b], dim=-1).view(b, c, 2 * n_chunks, 2)
    profiles = torch.stack([to_start, to_end], dim=1)  # (C, 2, L)
    total = torch.matmul(carries, profiles).view(b * c, 2 * n_chunks, chunk)
    scale_local = scale_local.expand(b, c, 2, n_chunks, 1).reshape(b, c, 2 * n_chunks, 1)
    # total += (scale_local * both) @ kernel: one GEMM accumulating in place (inference)
    kernel = kernel.expand(b, c, chunk, chunk).reshape(b * c, chunk, chunk)
    if eager_inference():
        total.baddbmm_(both.mul_(scale_local).view(b * c, 2 * n_chunks, chunk), kernel)
    elif precise:  # float32 in-chunk product, added to the float64 carries
        total = total + torch.bmm((both * scale_local).view(b * c, 2 * n_chunks, chunk), kernel)
    else:
        total = torch.baddbmm(total, (both * scale_local).view(b * c, 2 * n_chunks, chunk), kernel)
    total = total.view(b, c, 2, n_chunks, chunk)
    out = torch.div(total[:, :, 0], total[:, :, 1]).view(b, c, n_chunks * chunk)[..., :t]
    return out.add_(shift) if eager_inference() else (out + shift).to(k.dtype)


BIWKV_DOMAIN = "lalic"
"""ONNX domain of the ``BiWKV`` node that Spatial Mix emits while exporting (:func:`biwkv_onnx_node`)."""


def biwkv_branch_free(w: Tensor, u: Tensor, k: Tensor, v: Tensor, chunk: int = CHUNK) -> Tensor:
    """:func:`model.layers.biwkv` with a fixed chunk length and no shape-dependent branches.

    The same function (up to float rounding) for every sequence length, so that one exported
    graph serves all. For ``T < chunk`` the one padded chunk masks the decay kernel to distances
    below ``T`` (the eager code shortens the chunk instead), which keeps every exponent within
    ``|decay|``; for ``T >= chunk`` the masks are all true and the arithmetic is the eager one.
    """
    b, c, t = k.shape
    pad = (chunk - t % chunk) % chunk
    v_min = v.amin(dim=-1, keepdim=True)
    v_max = v.amax(dim=-1, keepdim=True)
    v_span = torch.maximum(v_max - v_min, 1e-4 * torch.maximum(v_max.abs(), v_min.abs())).clamp_min(1e-6)
    shift = v_min - 0.05 * v_span
    k = F.pad(k, (0, pad), value=-1e4).reshape(b, c, -1, chunk)
    v = F.pad(v - shift, (0, pad)).reshape(b, c, -1, chunk)
    n_chunks = k.shape[2]
    m = k.amax(dim=-1, keepdim=True)
    ek = torch.exp(k - m)
    both = torch.cat([ek * v, ek], dim=2)
    pos = torch.arange(chunk, device=k.device, dtype=k.dtype)
    dist = (pos[:, None] - pos[None, :]).abs()
    expo = torch.where(dist < t, -(dist - 1.0)[None] * w[:, None, None], float("-inf"))
    eye = torch.eye(chunk, device=w.device, dtype=torch.bool)
    kernel = torch.where(eye[None], torch.exp(u)[:, None, None], torch.exp(expo))
    intra = torch.matmul(both, kernel)
    back = chunk - 1 - pos
    to_end = torch.exp(torch.where(back < t, -back, 0.0)[None] * w[:, None])
    to_start = torch.exp(torch.where(pos < t, -pos, 0.0)[None] * w[:, None])
    summ = torch.matmul(both, torch.stack([to_end, to_start], dim=-1))
    w64 = w.double()[:, None]
    lw = chunk * w64
    idx = torch.arange(n_chunks, device=k.device, dtype=torch.float64)
    m64 = m[..., 0].double()
    log_s = torch.log(summ.double()).view(b, c, 2, n_chunks, 2)
    alpha_f = m64[:, :, None] + log_s[..., 0] + idx * lw[:, None]
    alpha_b = m64[:, :, None] + log_s[..., 1] - idx * lw[:, None]
    carry_f = _exclusive_logcumsumexp(alpha_f, reverse=False) - (idx - 1) * lw[:, None]
    carry_b = _exclusive_logcumsumexp(alpha_b, reverse=True) + (idx + 1) * lw[:, None]
    ref = torch.maximum(m64, torch.maximum(carry_f[:, :, 1], carry_b[:, :, 1]))[:, :, None]
    scale_local = torch.exp(m64[:, :, None] - ref).to(k.dtype)[..., None]
    scale_f = torch.exp(carry_f - ref).to(k.dtype)
    scale_b = torch.exp(carry_b - ref).to(k.dtype)
    carries = torch.stack([scale_f, scale_b], dim=-1).view(b, c, 2 * n_chunks, 2)
    profiles = torch.stack([to_start, to_end], dim=1)
    scale_local = scale_local.expand(b, c, 2, n_chunks, 1).reshape(b, c, 2 * n_chunks, 1)
    total = (torch.matmul(carries, profiles) + scale_local * intra).view(b, c, 2, n_chunks, chunk)
    out = (total[:, :, 0] / total[:, :, 1]).reshape(b, c, n_chunks * chunk)[..., :t]
    return out + shift


def biwkv_onnx_node(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """One opaque ``lalic.BiWKV(w, u, k, v)`` node in an ONNX export, in place of BiWKV's arithmetic.

    Tracing the chunk arithmetic with symbolic height and width costs the exporter ~4.5 s per
    call site (sympy), 14 times in lalic-s; :mod:`model.export` attaches the node's body, exported
    once from :func:`biwkv_branch_free`, as an ONNX model-local function.
    """
    return torch.onnx.ops.symbolic(
        f"{BIWKV_DOMAIN}::BiWKV", (w, u, k, v), dtype=v.dtype, shape=v.shape, version=1
    )


def biwkv_reference(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The O(T²) definition of Eq. 3, for tests (use float64)."""
    t = k.shape[-1]
    idx = torch.arange(t, device=k.device, dtype=k.dtype)
    dist = (idx[:, None] - idx[None, :]).abs()
    logits = -(dist - 1)[None] * w[:, None, None] + k[:, :, None, :]  # (B, C, T, I)
    diag = u[None, :, None] + k  # (B, C, T): the bonus term e^{u + k_t}
    eye = torch.eye(t, dtype=torch.bool, device=k.device)
    logits = torch.where(eye, diag[:, :, :, None].expand_as(logits), logits)
    weights = torch.softmax(logits, dim=-1)
    return torch.einsum("bcti,bci->bct", weights, v)


class OmniShift(nn.Module):
    """Omni-Shift (Vision-RWKV; LALIC Sec. 3.2): ``a0 x + a1 DW1x1(x) + a2 DW3x3(x) + a3 DW5x5(x)``.

    During training the four branches are folded functionally into one 5x5 depthwise kernel on
    every call (identical result, one convolution). :meth:`reparameterize` stores that kernel once
    and drops the branches, for inference and export; calling it again does nothing.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.alpha = nn.Parameter(torch.randn(4))
        self.conv1 = nn.Parameter(torch.empty(channels, 1, 1, 1))
        self.conv3 = nn.Parameter(torch.empty(channels, 1, 3, 3))
        self.conv5 = nn.Parameter(torch.empty(channels, 1, 5, 5))
        for p, fan_in in ((self.conv1, 1), (self.conv3, 9), (self.conv5, 25)):
            nn.init.uniform_(p, -(fan_in**-0.5), fan_in**-0.5)
        self.register_buffer("fused", None)

    @torch.jit.unused
    def fused_kernel(self) -> Tensor:
        """The single 5x5 depthwise kernel equal to the sum of the four branches (training path)."""
        identity = torch.zeros_like(self.conv5)
        identity[:, :, 2, 2] = 1.0
        a = self.alpha
        return (
            a[0] * identity
            + a[1] * F.pad(self.conv1, (2, 2, 2, 2))
            + a[2] * F.pad(self.conv3, (1, 1, 1, 1))
            + a[3] * self.conv5
        )

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the branches into ``self.fused`` and delete them (idempotent)."""
        if self.fused is not None:
            return
        self.fused = self.fused_kernel().detach().clone()
        del self.alpha, self.conv1, self.conv3, self.conv5

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.fused if self.fused is not None else self.fused_kernel()
        return F.conv2d(x, kernel, padding=2, groups=self.channels)


class SpatialMix(nn.Module):
    """Spatial Mix (Eq. 2): ``W_o(sigmoid(r) * BiWKV(decay/T, boost/T, k, v))`` after Omni-Shift.

    With ``fused`` set (:func:`use_fused_kernels`), inference on the CPU computes the gated BiWKV with
    ``torch.ops.lalic.biwkv_gated`` (:mod:`model.transform_kernels`: linear recurrences in C, in the
    activations' dtype) instead of :func:`biwkv`'s chunked matrix products; training, tracing and
    export keep the PyTorch formulation.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.shift = OmniShift(channels)
        self.kvr = nn.Linear(channels, 3 * channels, bias=False)  # fused W_k | W_v | W_r
        self.output = nn.Linear(channels, channels, bias=False)
        self.decay = nn.Parameter(torch.randn(channels))
        self.boost = nn.Parameter(torch.randn(channels))
        self.fused = False

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        b, t, c = x.shape
        x = map_to_tokens(self.shift(tokens_to_map(x, height, width)))
        weight = self.kvr.weight
        if not torch.is_grad_enabled():
            # matmul only folds the batch into one GEMM when no operand requires grad; a Parameter
            # does, so detach it at inference: 55 -> 17 ms at C=48, T=98304 on one core
            weight = weight.detach()
            if self.fused and not exporting_onnx():
                gated = torch.ops.lalic.biwkv_gated(F.linear(x, weight), self.decay, self.boost)
                return F.linear(gated, self.output.weight.detach())
        kvr = torch.matmul(weight, x.transpose(1, 2))  # (B, 3C, T): BiWKV's layout
        k, v, r = kvr.split(c, dim=1)
        if exporting_onnx():
            wkv = self._onnx_biwkv(self.decay / t, self.boost / t, k.float(), v.float())
        else:
            wkv = biwkv(self.decay / t, self.boost / t, k.float(), v.float())
        wkv = wkv.to(x.dtype)
        return torch.matmul((torch.sigmoid(r) * wkv).transpose(1, 2), self.output.weight.t())

    @torch.jit.unused  # never scripted: exporting_onnx() is False under TorchScript
    def _onnx_biwkv(self, w, u, k, v):  # unannotated: TorchScript cannot resolve postponed annotations here
        """:func:`biwkv_onnx_node` (every argument and the result are Tensors)."""
        return biwkv_onnx_node(w, u, k, v)


class ChannelMix(nn.Module):
    """Channel Mix (Eq. 4): ``sigmoid(W_r x) * W_v(relu(W_k x)^2)`` after its own Omni-Shift."""

    def __init__(self, channels: int, ratio: int = 4) -> None:
        super().__init__()
        self.shift = OmniShift(channels)
        self.key = nn.Linear(channels, ratio * channels, bias=False)
        self.value = nn.Linear(ratio * channels, channels, bias=False)
        self.receptance = nn.Linear(channels, channels, bias=False)
        self.slab_tokens = MIX_TOKENS

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        x = map_to_tokens(self.shift(tokens_to_map(x, height, width)))
        if eager_inference() and x.shape[1] > self.slab_tokens:
            return self._forward_slabs(x, self.slab_tokens)
        return torch.sigmoid(self.receptance(x)) * self.value(torch.relu(self.key(x)).square())

    def _forward_slabs(self, x: Tensor, n: int) -> Tensor:
        """The same function, computed in slabs of ``n`` tokens with in-place ops.

        The ``(n, ratio * C)`` hidden activation then stays in cache instead of making four
        trips through memory (measured 65 -> 40 ms at C=48, T=98304, one thread, with 2048 tokens).
        """
        out = torch.empty_like(x)
        for start in range(0, x.shape[1], n):
            xs = x[:, start : start + n]
            hidden = self.key(xs).relu_()
            hidden = hidden.mul_(hidden)
            gate = self.receptance(xs).sigmoid_()
            torch.mul(gate, self.value(hidden), out=out[:, start : start + n])
        return out


class BiRWKVBlock(nn.Module):
    """Bi-RWKV block (Sec. 3.2): pre-norm Spatial Mix and Channel Mix with per-channel layer scales."""

    def __init__(self, channels: int, ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.norm2 = nn.LayerNorm(channels)
        self.spatial = SpatialMix(channels)
        self.channel = ChannelMix(channels, ratio)
        self.gamma1 = nn.Parameter(torch.ones(channels))
        self.gamma2 = nn.Parameter(torch.ones(channels))
        self.fused_norms = False
        self.norm_eps = (self.norm1.eps, self.norm2.eps)  # plain floats: scripted code reads them here

    def use_fused_kernel(self) -> None:
        """Run the residuals and LayerNorms as fused passes at inference (``torch.ops.lalic.layer_norm``,
        ``residual_layer_norm``, ``residual``) if the block is bfloat16, where PyTorch's passes are
        slowest; a float32 block keeps them, and its results."""
        self.fused_norms = self.norm1.weight.dtype == torch.bfloat16

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        if self.fused_norms and not x.is_cuda and eager_inference() and not exporting_onnx():
            n1, n2 = self.norm1, self.norm2
            h = torch.ops.lalic.layer_norm(x, n1.weight, n1.bias, self.norm_eps[0])
            x, h = torch.ops.lalic.residual_layer_norm(
                x, self.gamma1, self.spatial(h, height, width), n2.weight, n2.bias, self.norm_eps[1]
            )
            return torch.ops.lalic.residual(x, self.gamma2, self.channel(h, height, width))
        x = torch.addcmul(x, self.gamma1, self.spatial(self.norm1(x), height, width))
        return torch.addcmul(x, self.gamma2, self.channel(self.norm2(x), height, width))


class BlockStage(nn.Module):
    """A stack of Bi-RWKV blocks applied to a ``(B, C, H, W)`` map; returns a channels-last map."""

    def __init__(self, channels: int, depth: int, ratio: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(BiRWKVBlock(channels, ratio) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        if not len(self.blocks):
            return x
        _, _, h, w = x.shape
        tokens = map_to_tokens(x.contiguous(memory_format=torch.channels_last))
        for block in self.blocks:
            tokens = block(tokens, h, w)
        return tokens_to_map(tokens, h, w)


@torch.no_grad()
def init_layer_scales(module: nn.Module, value: float) -> nn.Module:
    """Set every Bi-RWKV layer scale (gamma1, gamma2) of ``module`` to ``value``; returns ``module``."""
    for m in module.modules():
        if isinstance(m, BiRWKVBlock):
            m.gamma1.fill_(value)
            m.gamma2.fill_(value)
    return module


def use_fused_kernels(module: nn.Module) -> nn.Module:
    """Let every Spatial Mix of ``module`` run inference on the fused CPU kernel
    (:class:`SpatialMix`), and every module with a ``use_fused_kernel()`` method switch itself
    (:class:`model.transforms.ConvTranspose2d` in sub-pixel form; the residuals and LayerNorms of
    bfloat16 :class:`BiRWKVBlock` s); returns ``module``. Modules on
    another device, or with activations the kernels do not take, must not be switched
    (:func:`model.transform_kernels.usable`)."""
    if not transform_kernels.available():
        raise RuntimeError("model._transform_kernels was not built (pip install . compiles it)")
    for m in module.modules():
        if isinstance(m, SpatialMix):
            m.fused = True
        elif callable(getattr(m, "use_fused_kernel", None)):
            m.use_fused_kernel()
    return module


def reparameterize(module: nn.Module) -> nn.Module:
    """Fold every Omni-Shift of ``module`` into its 5x5 kernel (idempotent); returns ``module``."""
    for m in module.modules():
        if isinstance(m, OmniShift):
            m.reparameterize()
    return module
