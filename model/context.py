"""RWKV-SCCTX: LALIC's spatial-channel context entropy model (paper Sec. 3.3, Fig. 3).

y is split into channel slices coded in order. Each slice is coded in two checkerboard passes
(He et al., "Checkerboard Context Model", CVPR 2021): anchors ((row + col) even) with no spatial
context, then non-anchors with a 5x5 checkerboard-masked convolution over the decoded anchors.
Slices after the first also see a channel context: a Bi-RWKV network over all previously
decoded slices. Pointwise parameter networks map [spatial ctx, channel ctx, hyper params] to the
scales and means of a Gaussian for every element.

The encoder and the decoder run the same :meth:`ContextModel.code` loop, so the floating-point
work that produces the coding distributions is identical on both sides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.entropy import gaussian_likelihood, round_ste
from model.layers import BlockStage, map_to_tokens

DecodeFn = Callable[[int, Tensor], Tensor]
"""``decode(pass_index, indexes (B, n, g) int32) -> symbols (B, n, g) int32``."""


class ContextNetworks(Protocol):
    """The three networks of slice ``k`` that :meth:`ContextModel.code` calls.

    The codec passes an implementation backed by eager modules, TorchScript or onnxruntime
    (:mod:`model.backends`); the coding loop itself stays Python and is shared by all of them.
    """

    def channel(self, k: int, decoded: Tensor) -> Tensor:
        """Channel context of slice ``k >= 1``: (B, sum of earlier slices, h, w) -> (B, 2 g, h, w)."""
        ...

    def spatial(self, k: int, anchors: Tensor) -> Tensor:
        """Checkerboard context of slice ``k``: decoded anchors (B, g, h, w) -> (B, 2 g, h, w)."""
        ...

    def params(self, k: int, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Parameter network of slice ``k``: (B, n, cin) -> scales, means (B, n, g)."""
        ...

    def spatial_at(self, k: int, anchors: Tensor, positions: Tensor) -> Tensor:
        """:meth:`spatial` at the raster ``positions`` (n,) only, as tokens (B, n, 2 g)."""
        ...

    def anchor_params(self, k: int, context: Tensor, zeros: int) -> tuple[Tensor, Tensor]:
        """:meth:`params` of tokens whose first ``zeros`` features (the spatial context, 2 g) are
        zero, the anchors', given the others (B, n, cin - zeros)."""
        ...


class SelectingNetworks:
    """:meth:`ContextNetworks.spatial_at` and :meth:`~ContextNetworks.anchor_params` from
    ``spatial`` and ``params`` (the whole map, then the positions; zeros, then the network).
    Implementations that can compute less override them (:class:`model.exact.ExactEntropyPath`)."""

    def spatial_at(self, k: int, anchors: Tensor, positions: Tensor) -> Tensor:
        return map_to_tokens(self.spatial(k, anchors)).index_select(1, positions)  # type: ignore[attr-defined]

    def anchor_params(self, k: int, context: Tensor, zeros: int) -> tuple[Tensor, Tensor]:
        b, n, _ = context.shape
        return self.params(k, torch.cat([context.new_zeros(b, n, zeros), context], dim=-1))  # type: ignore[attr-defined]


class ModuleNetworks(SelectingNetworks):
    """:class:`ContextNetworks` calling a :class:`ContextModel`'s own modules (eager PyTorch)."""

    def __init__(self, model: ContextModel) -> None:
        self.model = model

    def channel(self, k: int, decoded: Tensor) -> Tensor:
        return self.model.channel[k - 1](decoded)

    def spatial(self, k: int, anchors: Tensor) -> Tensor:
        return self.model.spatial[k](anchors)

    def params(self, k: int, tokens: Tensor) -> tuple[Tensor, Tensor]:
        scales, means = self.model.params[k](tokens)
        return scales, means


def anchor_mask(height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """Boolean (H, W) map, True at checkerboard anchors ((row + col) even)."""
    rows = torch.arange(height, device=device)[:, None]
    cols = torch.arange(width, device=device)[None, :]
    return (rows + cols) % 2 == 0


class CheckerboardConv(nn.Conv2d):
    """5x5 convolution seeing only taps whose (row + col) offset is odd: the other checkerboard colour."""

    def __init__(self, cin: int, cout: int, kernel: int = 5) -> None:
        super().__init__(cin, cout, kernel, padding=kernel // 2)
        taps = torch.arange(kernel)
        self.register_buffer("mask", ((taps[:, None] + taps[None, :]) % 2 == 1).float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class GatedMLP(nn.Module):
    """``sigmoid(W_r x) * W_v(relu(W_k x)^2)``: the squared-ReLU channel mixer of RWKV."""

    def __init__(self, width: int, expansion: int = 2) -> None:
        super().__init__()
        self.key = nn.Linear(width, expansion * width, bias=False)
        self.value = nn.Linear(expansion * width, width, bias=False)
        self.receptance = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.receptance(x)) * self.value(torch.relu(self.key(x)).square())


class PointwiseBlock(nn.Module):
    """1x1 projection, LayerNorm and a gated squared-ReLU MLP with a residual."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.proj = nn.Linear(cin, cout)
        self.norm = nn.LayerNorm(cout)
        self.mlp = GatedMLP(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        return x + self.mlp(self.norm(x))


def ramp_widths(cin: int, cout: int, min_width: int, rounding: str = "nearest") -> tuple[int, int]:
    """Inner widths of a three-block :class:`ParameterNet`: a linear ramp from ``cin`` to ``cout``.

    The points one and two thirds of the way are rounded to the nearest integer (``nearest``, ours)
    or down (``floor``: CompressAI's ``sequential_channel_ramp``, ``ramp(...).floor()``, which the
    official LALIC code uses), then raised to at least ``min_width``. The ramp is evaluated in exact
    integer arithmetic; CompressAI's float32 ``linspace`` agrees, since the thirds are either exact
    integers or a third away from one. See ``model.configs.PARAM_WIDTH_ROUNDINGS``.
    """
    if rounding == "floor":
        inner = [(3 * cin + i * (cout - cin)) // 3 for i in (1, 2)]
    elif rounding == "nearest":
        inner = [round(cin + i * (cout - cin) / 3) for i in (1, 2)]
    else:
        raise ValueError(f"unknown rounding {rounding!r}")
    return max(min_width, inner[0]), max(min_width, inner[1])


class ParameterNet(nn.Module):
    """Three pointwise blocks; widths ramp linearly from the input to ``2 g`` (inner >= ``min_width``,
    rounded as :func:`ramp_widths` says)."""

    def __init__(self, cin: int, slice_channels: int, min_width: int, rounding: str = "nearest") -> None:
        super().__init__()
        cout = 2 * slice_channels
        w1, w2 = ramp_widths(cin, cout, min_width, rounding)
        self.blocks = nn.Sequential(PointwiseBlock(cin, w1), PointwiseBlock(w1, w2), PointwiseBlock(w2, cout))

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens (B, n, cin) -> scales, means (B, n, g)."""
        return self.blocks(tokens).chunk(2, dim=-1)


class ChannelContext(nn.Module):
    """Conv3x3 -> Bi-RWKV blocks -> Conv1x1 over the previously decoded slices."""

    def __init__(self, cin: int, width: int, depth: int, ratio: int, cout: int) -> None:
        super().__init__()
        self.inp = nn.Conv2d(cin, width, 3, padding=1)
        self.blocks = BlockStage(width, depth, ratio)
        self.out = nn.Conv2d(width, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.blocks(self.inp(x)))


class ContextModel(nn.Module):
    """RWKV-SCCTX over ``slices`` (channel counts summing to the latent width)."""

    def __init__(
        self,
        slices: Sequence[int],
        hyper_channels: int,
        ctx_width: int,
        ctx_depth: int,
        ctx_ratio: int,
        param_min_width: int,
        param_rounding: str = "nearest",
    ) -> None:
        super().__init__()
        self.slices = tuple(slices)
        self.spatial = nn.ModuleList(CheckerboardConv(g, 2 * g) for g in self.slices)
        self.channel = nn.ModuleList(
            ChannelContext(sum(self.slices[:k]), ctx_width, ctx_depth, ctx_ratio, 2 * g)
            for k, g in enumerate(self.slices)
            if k > 0
        )
        self.params = nn.ModuleList(
            ParameterNet(2 * g + (2 * g if k else 0) + hyper_channels, g, param_min_width, param_rounding)
            for k, g in enumerate(self.slices)
        )

    @property
    def num_passes(self) -> int:
        return 2 * len(self.slices)

    def _context(self, k: int, hyper: Tensor, decoded: list[Tensor]) -> Tensor:
        """[channel ctx, hyper] map for slice k (channels-first)."""
        if k == 0:
            return hyper
        return torch.cat([self.channel[k - 1](torch.cat(decoded, dim=1)), hyper], dim=1)

    def forward(self, y: Tensor, hyper: Tensor, noise: bool = True) -> tuple[Tensor, Tensor]:
        """Training/likelihood pass. Returns (y_hat with straight-through rounding, likelihoods).

        Likelihoods are of ``y`` plus uniform noise in training mode with ``noise``; of ``y_hat``
        (the rounded residuals the range coder pays for) in eval mode or without ``noise``.
        """
        y_hat, scales, means = self.distributions(y, hyper)
        if not (self.training and noise):
            return y_hat, gaussian_likelihood(y_hat, scales, means)
        # noise drawn slice by slice, in coding order (the random stream of earlier versions)
        slices = y.split(self.slices, dim=1)
        noisy = torch.cat([ys + torch.empty_like(ys).uniform_(-0.5, 0.5) for ys in slices], dim=1)
        return y_hat, gaussian_likelihood(noisy, scales, means)

    def distributions(self, y: Tensor, hyper: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """y_hat (straight-through rounding) and the scales and means of every element's Gaussian."""
        _, _, h, w = y.shape
        anchors = anchor_mask(h, w, y.device)
        y_hats: list[Tensor] = []
        all_scales: list[Tensor] = []
        all_means: list[Tensor] = []
        for k, ys in enumerate(y.split(self.slices, dim=1)):
            ctx = self._context(k, hyper, y_hats)
            zeros = ys.new_zeros(ys.shape[0], 2 * self.slices[k], h, w)
            s_a, m_a = self._params_map(k, torch.cat([zeros, ctx], dim=1))
            y_anchor = torch.where(anchors, round_ste(ys - m_a) + m_a, torch.zeros_like(ys))
            s_n, m_n = self._params_map(k, torch.cat([self.spatial[k](y_anchor), ctx], dim=1))
            scales = torch.where(anchors, s_a, s_n)
            means = torch.where(anchors, m_a, m_n)
            y_hats.append(round_ste(ys - means) + means)
            all_scales.append(scales)
            all_means.append(means)
        return torch.cat(y_hats, dim=1), torch.cat(all_scales, dim=1), torch.cat(all_means, dim=1)

    def _params_map(self, k: int, inputs: Tensor) -> tuple[Tensor, Tensor]:
        b, _, h, w = inputs.shape
        scales, means = self.params[k](map_to_tokens(inputs))
        to_map = lambda t: t.transpose(1, 2).reshape(b, -1, h, w)  # noqa: E731
        return to_map(scales), to_map(means)

    def code(
        self,
        hyper: Tensor,
        index_fn: Callable[[Tensor], Tensor],
        y: Tensor | None = None,
        decode: DecodeFn | None = None,
        nets: ContextNetworks | None = None,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """The coding loop shared by encoder (``y`` given) and decoder (``decode`` given).

        For every pass (slice k anchors, slice k non-anchors, ...) it predicts scales and means at
        that pass's positions, turns scales into table indexes with ``index_fn``, and obtains
        symbols ``round(y - mean)`` (encoder) or from ``decode`` (decoder); ``y_hat = symbols +
        mean``. Returns ``y_hat`` (B, M, h, w) and, per pass, (symbols, indexes), each (B, n, g).
        ``nets`` runs the networks (default: this module's own, eager).

        Tokens are kept in pass order (all anchors, then all non-anchors) so that each pass reads
        a contiguous half instead of gathering; the result does not depend on that order.
        """
        nets = nets if nets is not None else ModuleNetworks(self)
        b, _, h, w = hyper.shape
        anchors = anchor_mask(h, w, hyper.device).flatten()
        order = torch.cat([anchors.nonzero().squeeze(1), (~anchors).nonzero().squeeze(1)])
        n_anchor = int(anchors.sum())
        bounds = ((0, n_anchor), (n_anchor, h * w))
        hyper_tokens = map_to_tokens(hyper).index_select(1, order)
        y_slices = y.split(self.slices, dim=1) if y is not None else None
        decoded: list[Tensor] = []
        passes: list[tuple[Tensor, Tensor]] = []
        for k, g in enumerate(self.slices):
            if k == 0:
                ctx_tokens = hyper_tokens
            else:
                channel = map_to_tokens(nets.channel(k, torch.cat(decoded, dim=1))).index_select(1, order)
                ctx_tokens = torch.cat([channel, hyper_tokens], dim=-1)
            y_tokens = map_to_tokens(y_slices[k]).index_select(1, order) if y_slices is not None else None
            slice_tokens = hyper.new_zeros(b, h * w, g)  # y_hat of this slice, pass order
            for half, (lo, hi) in enumerate(bounds):
                if half == 0:  # anchors: no spatial context (zeros)
                    scales, means = nets.anchor_params(k, ctx_tokens[:, lo:hi], 2 * g)
                else:
                    anchor_map = hyper.new_zeros(b, h * w, g)
                    anchor_map[:, order[:n_anchor]] = slice_tokens[:, :n_anchor]
                    anchor_map = anchor_map.transpose(1, 2).reshape(b, g, h, w)
                    spatial = nets.spatial_at(k, anchor_map, order[lo:hi])
                    scales, means = nets.params(k, torch.cat([spatial, ctx_tokens[:, lo:hi]], dim=-1))
                indexes = index_fn(scales)
                if y_tokens is not None:
                    symbols = torch.round(y_tokens[:, lo:hi] - means).to(torch.int32)
                else:
                    symbols = decode(len(passes), indexes).to(hyper.device)
                slice_tokens[:, lo:hi] = symbols.to(means.dtype) + means
                passes.append((symbols, indexes))
            raster = torch.empty_like(slice_tokens)
            raster[:, order] = slice_tokens
            decoded.append(raster.transpose(1, 2).reshape(b, g, h, w))
        return torch.cat(decoded, dim=1), passes
