"""LALIC's entropy-parameter path in reproducible arithmetic (issue 38): streams that decode anywhere.

Everything the decoder computes before it knows a symbol, h_s (Sec. 3.1), the channel-context
networks with their Bi-RWKV blocks (Sec. 3.2-3.3), the checkerboard convolutions and the parameter
networks (Sec. 3.3), runs here on the kernels of :mod:`model.fixedpoint`, built once from a trained
:class:`~model.lalic.LALIC`: weights become per-channel 14-bit block floating point, products are
exact, and every nonlinearity (LayerNorm, sigmoid, squared ReLU, BiWKV's exponentials) has one
defined rounding. The scales and means, hence the table indexes and ``y_hat = symbol + mean``, are
then the same bits on every CPU, thread count, batch size, backend and device.

:class:`ExactEntropyPath` provides ``hyper_synthesis`` and the three networks of
:class:`~model.context.ContextNetworks`, so :meth:`model.context.ContextModel.code` runs it
unchanged (float32 tensors whose every bit is reproducible). g_a, h_a and g_s stay on the chosen
backend: they are outside the path (y is quantised by the encoder, and g_s only moves pixels).

:class:`ExactAnalysis` runs g_a and h_a on the same kernels where the encoder is asked for
byte-identical streams on every backend (analysis precision ``exact``).

``EXACT_PATH_VERSION`` names this arithmetic; a change to any rounding here changes streams and
needs a new container version (:data:`model.bitstream.FORMAT_VERSION`).
"""

from __future__ import annotations

import decimal
import math

import torch
from torch import Tensor, nn

from model import fixedpoint as fx
from model.context import ChannelContext, ContextModel, ParameterNet, SelectingNetworks
from model.layers import BiRWKVBlock, BlockStage
from model.transforms import subpixel_kernel

EXACT_PATH_VERSION = 1
"""The arithmetic of this module; streams of container version 2 are coded with it."""

LATENT_LIMIT = 1 << 20
"""Largest ``|y_hat|`` and ``|z_hat|`` the path accepts: decoded symbols beyond it come from a
corrupt stream and are refused (real images stay below a few hundred)."""


GAIN_CACHE_SIZE = 64
"""Gain vectors :class:`ExactAnalysis` keeps (one per quality seen; a client may send any fraction)."""


class LatentRangeError(ValueError):
    """A latent outside :data:`LATENT_LIMIT`: the codec reports it as a corrupt stream."""


def check_latent_range(x: Tensor, what: str) -> None:
    """Raise :class:`LatentRangeError` if ``x`` holds a value outside ``±LATENT_LIMIT`` (or NaN)."""
    if x.numel() and not bool((x.abs() <= LATENT_LIMIT).all()):
        raise LatentRangeError(f"{what} holds values beyond ±{LATENT_LIMIT}, outside the entropy path")


def _linear(layer: nn.Linear | nn.Conv2d, where: str) -> fx.ExactLinear:
    weight = layer.weight.detach()
    return fx.ExactLinear(weight.reshape(weight.shape[0], -1), layer.bias, where)


class _SubpixelDeconv:
    """A stride-2 transposed convolution (k5, output padding 1) as its sub-pixel convolution."""

    def __init__(self, layer: nn.ConvTranspose2d, where: str) -> None:
        weight, bias, pad = subpixel_kernel(layer.weight.detach(), layer.bias, layer.padding[0])
        if len(set(pad)) != 1:
            raise ValueError(f"{where}: asymmetric sub-pixel padding {pad}")
        self.conv = fx.ExactConv2d(weight, bias, pad[0], where=where)

    def to(self, device: torch.device | str) -> _SubpixelDeconv:
        self.conv.to(device)
        return self

    def __call__(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> channels-last (B, 2H, 2W, out): ``pixel_shuffle(2)`` in that layout."""
        y = self.conv(x)
        b, h, w, c4 = y.shape
        y = y.view(b, h, w, c4 // 4, 2, 2).permute(0, 1, 4, 2, 5, 3)
        return y.reshape(b, 2 * h, 2 * w, c4 // 4)


class _Norm:
    def __init__(self, norm: nn.LayerNorm) -> None:
        self.weight = norm.weight.detach().to(torch.float32)
        self.bias = norm.bias.detach().to(torch.float32)
        self.eps = float(norm.eps)

    def to(self, device: torch.device | str) -> _Norm:
        self.weight, self.bias = self.weight.to(device), self.bias.to(device)
        return self

    def __call__(self, x: Tensor) -> Tensor:
        return fx.layer_norm(x, self.weight, self.bias, self.eps)


def _fused(layers: list[nn.Linear], where: str) -> fx.ExactLinear:
    """One :class:`~model.fixedpoint.ExactLinear` for bias-free layers that read the same input
    (weights are quantised per output channel, so this changes no result, only the passes)."""
    return fx.ExactLinear(torch.cat([layer.weight.detach() for layer in layers]), None, where)


class _Block:
    """A Bi-RWKV block (Sec. 3.2): pre-norm Spatial Mix (Eq. 2-3) and Channel Mix (Eq. 4)."""

    def __init__(self, block: BiRWKVBlock, where: str) -> None:
        spatial, channel = block.spatial, block.channel
        if spatial.shift.fused is None or channel.shift.fused is None:
            raise ValueError(f"{where}: Omni-Shift must be reparameterised first (prepare_for_inference)")
        c = spatial.channels
        self.norm1, self.norm2 = _Norm(block.norm1), _Norm(block.norm2)
        self.gamma1 = block.gamma1.detach().to(torch.float32)
        self.gamma2 = block.gamma2.detach().to(torch.float32)
        self.shift1 = fx.ExactConv2d(spatial.shift.fused, None, 2, groups=c, where=f"{where}.spatial.shift")
        self.kvr = _linear(spatial.kvr, f"{where}.spatial.kvr")
        self.output = _linear(spatial.output, f"{where}.spatial.output")
        self.wkv = fx.BiWKV(spatial.decay, spatial.boost)
        self.shift2 = fx.ExactConv2d(channel.shift.fused, None, 2, groups=c, where=f"{where}.channel.shift")
        self.key_receptance = _fused([channel.key, channel.receptance], f"{where}.channel.key+receptance")
        self.value = _linear(channel.value, f"{where}.channel.value")
        self.channels = c
        self.hidden = channel.key.out_features

    def to(self, device: torch.device | str) -> _Block:
        for part in (self.norm1, self.norm2, self.shift1, self.kvr, self.output, self.wkv, self.shift2):
            part.to(device)
        self.key_receptance.to(device)
        self.value.to(device)
        self.gamma1, self.gamma2 = self.gamma1.to(device), self.gamma2.to(device)
        return self

    def _shifted(self, shift: fx.ExactConv2d, x: Tensor, h: int, w: int) -> Tensor:
        b, t, c = x.shape
        return shift(x.view(b, h, w, c).permute(0, 3, 1, 2)).reshape(b, t, c)

    def __call__(self, x: Tensor, h: int, w: int) -> Tensor:
        c = self.channels
        s = self._shifted(self.shift1, self.norm1(x), h, w)
        gated = self.wkv.gated(self.kvr(s))  # sigmoid(r) * wkv(k, v), (B, T, C)
        x = x + self.output(gated).mul_(self.gamma1)
        s = self._shifted(self.shift2, self.norm2(x), h, w)
        hidden, receptance = self.key_receptance(s).split([self.hidden, c], dim=-1)
        return fx.gated_residual(x, receptance, self.value(hidden, square_relu=True), self.gamma2)


class _Stage:
    """:class:`~model.layers.BlockStage` on a channels-last ``(B, H, W, C)`` map."""

    def __init__(self, stage: BlockStage, where: str) -> None:
        self.blocks = [_Block(b, f"{where}.{i}") for i, b in enumerate(stage.blocks)]

    def to(self, device: torch.device | str) -> _Stage:
        for block in self.blocks:
            block.to(device)
        return self

    def __call__(self, x: Tensor) -> Tensor:
        if not self.blocks:
            return x
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        for block in self.blocks:
            tokens = block(tokens, h, w)
        return tokens.view(b, h, w, c)


class _ChannelContext:
    def __init__(self, net: ChannelContext, where: str) -> None:
        self.inp = fx.ExactConv2d(net.inp.weight.detach(), net.inp.bias, 1, where=f"{where}.inp")
        self.blocks = _Stage(net.blocks, f"{where}.blocks")
        self.out = _linear(net.out, f"{where}.out")

    def to(self, device: torch.device | str) -> _ChannelContext:
        self.inp.to(device)
        self.blocks.to(device)
        self.out.to(device)
        return self

    def __call__(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> channels-last (B, H, W, out)."""
        return self.out(self.blocks(self.inp(x)))


class _ParameterNet:
    """Three pointwise blocks: projection, LayerNorm, gated squared-ReLU MLP with a residual."""

    def __init__(self, net: ParameterNet, where: str) -> None:
        self.spatial_width = net.blocks[-1].proj.out_features  # 2 g: the spatial context leads the inputs
        self.blocks = []
        for i, block in enumerate(net.blocks):
            name = f"{where}.blocks.{i}"
            mlp = block.mlp
            self.blocks.append(
                (
                    _linear(block.proj, f"{name}.proj"),
                    _Norm(block.norm),
                    _fused([mlp.key, mlp.receptance], f"{name}.mlp.key+receptance"),
                    _linear(mlp.value, f"{name}.mlp.value"),
                    mlp.key.out_features,
                )
            )

        # the anchors' first projection: their spatial context is zero, so its weight rows drop out
        self.anchor_proj = self.blocks[0][0].without_leading_inputs(self.spatial_width)

    def to(self, device: torch.device | str) -> _ParameterNet:
        for proj, norm, key_receptance, value, _ in self.blocks:
            for part in (proj, norm, key_receptance, value):
                part.to(device)
        self.anchor_proj.to(device)
        return self

    def __call__(self, x: Tensor, anchors: bool = False) -> tuple[Tensor, Tensor]:
        """Scales and means of tokens ``x`` (B, n, cin), or with ``anchors`` of tokens whose spatial
        context is zero given the other features (B, n, cin - 2 g): the same bits as with the zeros."""
        for i, (proj, norm, key_receptance, value, hidden_width) in enumerate(self.blocks):
            x = (self.anchor_proj if anchors and i == 0 else proj)(x)
            hidden, receptance = key_receptance(norm(x)).split([hidden_width, x.shape[-1]], dim=-1)
            x = fx.gated_residual(x, receptance, value(hidden, square_relu=True))
        scales, means = x.chunk(2, dim=-1)
        return scales, means


class ExactEntropyPath(SelectingNetworks):
    """h_s and the RWKV-SCCTX networks of one LALIC network, in the arithmetic of :mod:`model.fixedpoint`.

    Takes ``z_hat``, decoded slices and anchors and parameter-network tokens (any float dtype
    holding the exact values) and returns float32; :meth:`model.context.ContextModel.code`
    drives it as ``nets``.
    """

    def __init__(self, h_s: nn.Sequential, context: ContextModel) -> None:
        first, stage, last = h_s
        self._h_s = (
            _SubpixelDeconv(first, "h_s.0"),
            _Stage(stage, "h_s.1"),
            _SubpixelDeconv(last, "h_s.2"),
        )
        self._channel = [_ChannelContext(n, f"context.channel.{i}") for i, n in enumerate(context.channel)]
        self._spatial = []
        for k, conv in enumerate(context.spatial):
            masked = (conv.weight * conv.mask).detach()
            where = f"context.spatial.{k}"
            self._spatial.append(fx.ExactConv2d(masked, conv.bias, conv.padding[0], where=where))
        self._params = [_ParameterNet(net, f"context.params.{k}") for k, net in enumerate(context.params)]
        self._slices = context.slices

    def to(self, device: torch.device | str) -> ExactEntropyPath:
        for part in (*self._h_s, *self._channel, *self._spatial, *self._params):
            part.to(device)
        return self

    def hyper_synthesis(self, z_hat: Tensor) -> Tensor:
        """h_s: z_hat (B, C_z, h, w) -> the hyper parameters (B, M, 4h, 4w), float32 (channels-last)."""
        check_latent_range(z_hat, "z_hat")
        first, stage, last = self._h_s
        x = stage(first(z_hat.to(torch.float32)))
        return last(x.permute(0, 3, 1, 2)).permute(0, 3, 1, 2)

    def channel(self, k: int, decoded: Tensor) -> Tensor:
        """Slices ``0 .. k-1`` decoded; slice ``k-1`` is new here (earlier ones were checked before)."""
        check_latent_range(decoded[:, sum(self._slices[: k - 1]) :], "y_hat")
        return self._channel[k - 1](decoded.to(torch.float32)).permute(0, 3, 1, 2)

    def spatial(self, k: int, anchors: Tensor) -> Tensor:
        check_latent_range(anchors, "y_hat")
        return self._spatial[k](anchors.to(torch.float32)).permute(0, 3, 1, 2)

    def spatial_at(self, k: int, anchors: Tensor, positions: Tensor) -> Tensor:
        """The checkerboard context at the non-anchors only (half the products of :meth:`spatial`)."""
        check_latent_range(anchors, "y_hat")
        return self._spatial[k].at(anchors.to(torch.float32), positions)

    def params(self, k: int, tokens: Tensor) -> tuple[Tensor, Tensor]:
        return self._params[k](tokens.to(torch.float32))

    def anchor_params(self, k: int, context: Tensor, zeros: int) -> tuple[Tensor, Tensor]:
        """The anchors' parameters without multiplying their zero spatial context."""
        net = self._params[k]
        if zeros != net.spatial_width:
            raise ValueError(f"slice {k}: the spatial context is {net.spatial_width} wide, not {zeros}")
        return net(context.to(torch.float32), anchors=True)


def exact_gain(log_gains: list[list[float]], quality: float) -> Tensor:
    """The variable-rate gain of :func:`model.lalic.interpolated_gain` for one quality, reproducibly:
    the interpolation in Python floats (IEEE double everywhere) and ``exp`` with :mod:`decimal`,
    rounded to float32 through float64. (M,) float32."""
    levels = len(log_gains)
    q = min(max(float(quality), 1.0), float(levels)) - 1.0
    low = min(math.floor(q), levels - 2)
    frac = q - low
    ctx = decimal.Context(prec=40)
    values = [
        float(ctx.exp(decimal.Decimal((1.0 - frac) * a + frac * b)))
        for a, b in zip(log_gains[low], log_gains[low + 1], strict=True)
    ]
    return torch.tensor(values, dtype=torch.float64).to(torch.float32)


class _Conv:
    """A strided convolution of g_a or h_a (``nn.Conv2d``) on the reproducible kernels."""

    def __init__(self, layer: nn.Conv2d, where: str) -> None:
        plain = layer.groups == 1 and layer.dilation == (1, 1) and layer.padding_mode == "zeros"
        if layer.stride[0] != layer.stride[1] or layer.padding[0] != layer.padding[1] or not plain:
            raise ValueError(f"{where}: square strides and zero paddings only, no groups or dilation")
        weight = layer.weight.detach()
        self.conv = fx.ExactConv2d(weight, layer.bias, layer.padding[0], where=where, stride=layer.stride[0])

    def to(self, device: torch.device | str) -> _Conv:
        self.conv.to(device)
        return self

    def __call__(self, x: Tensor) -> Tensor:
        """Channels-last (B, H, W, C) in and out."""
        return self.conv(x.permute(0, 3, 1, 2))


class ExactAnalysis:
    """g_a with its variable-rate gain and h_a (Sec. 3.1) in the arithmetic of :mod:`model.fixedpoint`
    (analysis precision ``exact``): the latents y and z, hence the whole stream, are then the same
    bits on every CPU, thread count, backend and device, like the entropy path. Slower than the
    float32 g_a (BENCHMARKS.md, "Portable streams").

    The layers are those of :func:`model.transforms.analysis_transform` and ``hyper_analysis``:
    strided convolutions and Bi-RWKV stages. A network whose h_a has a fan-in beyond
    :data:`model.fixedpoint.MAX_FAN_IN` (the paper's ``lalic``: 320 x 5 x 5) is refused.
    """

    def __init__(self, g_a: nn.Sequential, h_a: nn.Sequential, log_gain: Tensor | None) -> None:
        self._g_a = [self._layer(layer, f"g_a.{i}") for i, layer in enumerate(g_a)]
        self._h_a = [self._layer(layer, f"h_a.{i}") for i, layer in enumerate(h_a)]
        self._log_gain = None if log_gain is None else log_gain.detach().double().tolist()
        self._gains: dict[float, Tensor] = {}

    @staticmethod
    def _layer(layer: nn.Module, where: str) -> _Conv | _Stage:
        if isinstance(layer, nn.Conv2d):
            return _Conv(layer, where)
        if isinstance(layer, BlockStage):
            return _Stage(layer, where)
        raise ValueError(f"{where}: no reproducible form of {type(layer).__name__}")

    def to(self, device: torch.device | str) -> ExactAnalysis:
        for part in (*self._g_a, *self._h_a):
            part.to(device)
        self._gains.clear()
        return self

    def _gain(self, quality: float, device: torch.device) -> Tensor | None:
        if self._log_gain is None:
            return None
        if quality not in self._gains:
            if len(self._gains) >= GAIN_CACHE_SIZE:  # fractional qualities are many: keep a few
                self._gains.clear()
            self._gains[quality] = exact_gain(self._log_gain, quality).to(device)
        return self._gains[quality]

    @staticmethod
    def _run(layers: list, x: Tensor) -> Tensor:
        h = x.to(torch.float32).permute(0, 2, 3, 1)  # channels-last view
        for layer in layers:
            h = layer(h)
        return h.permute(0, 3, 1, 2).contiguous()

    def analysis(self, x: Tensor, quality: Tensor) -> Tensor:
        """g_a: images (B, 3, H, W) in [0, 1] -> y (B, M, H/16, W/16), times each image's quality gain."""
        y = self._run(self._g_a, x)
        for i, q in enumerate(quality.tolist()):
            gain = self._gain(q, y.device)
            if gain is not None:
                y[i] *= gain[:, None, None]
        return y

    def hyper_analysis(self, y: Tensor) -> Tensor:
        """h_a: y (B, M, h, w) -> z (B, C_z, h/4, w/4)."""
        return self._run(self._h_a, y)


def exact_analysis(net: nn.Module) -> ExactAnalysis:
    """The :class:`ExactAnalysis` of a LALIC network prepared for inference (on its device)."""
    device = next(net.parameters()).device
    with torch.no_grad():
        log_gain = net.log_gain if net.config.variable_rate else None
        return ExactAnalysis(net.g_a, net.h_a, log_gain).to(device)


def exact_entropy_path(net: nn.Module) -> ExactEntropyPath:
    """The :class:`ExactEntropyPath` of a LALIC network prepared for inference (on its device)."""
    device = next(net.parameters()).device
    with torch.no_grad():
        return ExactEntropyPath(net.h_s, net.context).to(device)
