"""LALIC's networks as stages: modules that map tensors to tensors, which every backend runs.

Only the neural stages leave the network; entropy coding and the pass-by-pass coding loop
(:meth:`model.context.ContextModel.code`) stay Python and call the stages through
:class:`model.backends.Stages`, whichever backend runs them (CompressAI issues #72, #87 and #247:
the ``compress``/``decompress`` loops of learned codecs cannot be scripted or exported).

================  =====================================  =========================================
name              inputs                                 output
================  =====================================  =========================================
analysis          image (B, 3, H, W), quality (B,)       y = g_a(x) * gain(quality)
hyper_analysis    y (B, M, H/16, W/16)                   z = h_a(y)
hyper_synthesis   z_hat (B, Z, H/64, W/64)               hyper = h_s(z_hat)
synthesis         y_hat (B, M, H/16, W/16), quality      x_hat = g_s(y_hat * inverse_gain(quality))
channel{k}        earlier slices (B, sum g, h, w)        channel context of slice k >= 1
spatial{k}        decoded anchors (B, g_k, h, w)         checkerboard context of slice k
params{k}         tokens (B, n, cin)                     scales, means (B, n, g_k)
================  =====================================  =========================================

The stages of h_s onwards form the entropy-parameter path (:func:`is_entropy_stage`): their
results decide the coding distributions, so encoder and decoder must compute them identically.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from model.context import ParameterNet
from model.cpuinfo import CPUINFO, cpuinfo_field
from model.lalic import LALIC, interpolated_gain
from model.layers import SpatialMix, use_fused_kernels

ENTROPY_STAGES = ("hyper_synthesis", "channel", "spatial", "params")
"""Kinds of stage on the entropy-parameter path (their float results decide the coding distributions)."""
PRECISIONS = ("float32", "bfloat16")
"""Precisions g_a and g_s can run in (:func:`stage_modules`). Neither is on the entropy path: g_s's
precision moves decoded pixels, never the latents; g_a's moves the latents the encoder sends (the
streams stay valid everywhere), never what a decoder computes from them."""
EXACT_PRECISION = "exact"
"""g_a's and h_a's precision for byte-identical streams: the reproducible arithmetic of the entropy path
(:class:`model.exact.ExactAnalysis`), the same latents on every backend, CPU and device."""
ANALYSIS_PRECISIONS = (*PRECISIONS, EXACT_PRECISION)
"""Precisions of the encoder's transforms: :data:`PRECISIONS` and :data:`EXACT_PRECISION`."""
AUTO_PRECISION = "auto"
"""A precision setting resolved by :func:`resolve_precision`: bfloat16 where it is native, else float32."""
NATIVE_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags (``/proc/cpuinfo``) of x86 CPUs that compute bfloat16 natively; elsewhere oneDNN emulates
it, slower than float32."""


def native_bfloat16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether this CPU computes bfloat16 natively (:data:`NATIVE_BFLOAT16_FLAGS`; False if unknown)."""
    flags = cpuinfo_field("flags", cpuinfo) or ""
    return bool(set(flags.split()) & set(NATIVE_BFLOAT16_FLAGS))


def resolve_precision(precision: str, device: str, backend: str, cpuinfo: Path = CPUINFO) -> str:
    """The precision a stage runs in: ``precision`` itself, or for :data:`AUTO_PRECISION` bfloat16 on a
    CPU with native bfloat16 under the torch or torchscript backend (measured: g_s 0.71x and g_a 0.73x
    their float32 time, Kodak PSNR within 0.01 dB; BENCHMARKS.md), float32 anywhere else."""
    if precision != AUTO_PRECISION:
        return precision
    if device == "cpu" and backend in ("torch", "torchscript") and native_bfloat16(cpuinfo):
        return "bfloat16"
    return "float32"


def stage_kind(name: str) -> str:
    """``"params"`` for ``"params3"``: the stage's name without its slice number."""
    return name.rstrip("0123456789")


def is_entropy_stage(name: str) -> bool:
    return stage_kind(name) in ENTROPY_STAGES


class Gained(nn.Module):
    """A transform with the variable-rate gain of Cui et al. (CVPR 2021) applied at its input
    (g_s: ``g_s(y_hat * inverse_gain(q))``) or at its output (g_a: ``g_a(x) * gain(q)``).

    :meth:`model.lalic.LALIC.analysis` and ``synthesis`` are the same functions on the training
    network; a stage holds a detached copy of the gain table instead (zeros, so a gain of 1, for
    fixed-rate networks), which scripting with freezing and the exporters turn into constants.
    """

    def __init__(self, transform: nn.Module, log_gain: Tensor, at_input: bool) -> None:
        super().__init__()
        self.transform = transform
        self.at_input = at_input
        self.register_buffer("log_gain", log_gain.detach().clone())

    def forward(self, x: Tensor, quality: Tensor) -> Tensor:
        gain = interpolated_gain(self.log_gain, quality)
        if self.at_input:
            return self.transform(x * gain)
        return self.transform(x) * gain


class BFloat16Gained(nn.Module):
    """A :class:`Gained` transform (g_a or g_s) in bfloat16, float32 in and out (issue 39).

    Every layer but the one at the image's side (g_a's first convolution, which reads the pixels;
    g_s's last transposed convolution, which writes them) runs in bfloat16 with its weights stored
    so, once, at construction (oneDNN's AVX512-BF16 kernels; one cast at each end, none per layer).
    Kept in float32: that image-side layer, where bfloat16's 8-bit mantissa would cost most of the
    PSNR lost (BENCHMARKS.md, "g_s and g_a in bfloat16"), the gain, and BiWKV's decay and boost (its scan
    runs in float32 anyway, :func:`model.layers.biwkv`). g_s's image side receives the bfloat16 map:
    PyTorch's convolution widens it first; the fused kernel (``fused_kernels``) reads it and, on a
    CPU with AVX512-BF16, multiplies it by the weights rounded to bfloat16 with float32 sums and
    outputs (BENCHMARKS.md, "g_s's last layer as one kernel").
    """

    def __init__(self, gained: Gained) -> None:
        super().__init__()
        layers = list(gained.transform)
        self.at_input = gained.at_input
        image_side, inner = (layers[-1], layers[:-1]) if self.at_input else (layers[0], layers[1:])
        body = copy.deepcopy(nn.Sequential(*inner)).to(torch.bfloat16)
        for module in body.modules():
            if isinstance(module, SpatialMix):
                module.decay.data = module.decay.data.float()
                module.boost.data = module.boost.data.float()
        self.body = body
        self.image_side = copy.deepcopy(image_side)
        self.register_buffer("log_gain", gained.log_gain.detach().clone())

    def forward(self, x: Tensor, quality: Tensor) -> Tensor:
        gain = interpolated_gain(self.log_gain, quality)
        if self.at_input:  # g_s: latents in, pixels out (the image side widens the map, or reads it fused)
            return self.image_side(self.body((x * gain).to(torch.bfloat16)))
        return self.body(self.image_side(x).to(torch.bfloat16)).float() * gain


class SplitParams(nn.Module):
    """A parameter network returning ``(scales, means)`` as two tensors (scriptable, exportable)."""

    def __init__(self, params: ParameterNet) -> None:
        super().__init__()
        self.blocks = params.blocks

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        out = self.blocks(tokens)
        g = out.shape[-1] // 2
        return out[..., :g], out[..., g:]


def gain_tables(net: LALIC) -> tuple[Tensor, Tensor]:
    """(log gain, log inverse gain) tables of ``net``: zeros (a gain of 1) for fixed-rate networks."""
    if net.config.variable_rate:
        return net.log_gain, net.log_inverse_gain
    zeros = torch.zeros(2, net.config.latent, device=next(net.g_a.parameters()).device)
    return zeros, zeros


def stage_modules(
    net: LALIC,
    synthesis_precision: str = "float32",
    analysis_precision: str = "float32",
    fused_kernels: bool = False,
) -> dict[str, nn.Module]:
    """Every stage of a network prepared for inference, by name (see the module docstring); the
    precisions (:data:`PRECISIONS`) choose g_s's and g_a's (``exact`` keeps the float32 g_a here: the
    codec encodes with :class:`model.exact.ExactAnalysis` instead).

    ``fused_kernels`` runs the Spatial Mixes of g_a and g_s on the fused CPU kernel
    (:func:`model.layers.use_fused_kernels`), on copies of the transforms (``net`` and exports keep
    the PyTorch formulation). The entropy-parameter stages never change: streams of container
    version 1 are decoded with their float32 arithmetic."""
    for precision, allowed in ((synthesis_precision, PRECISIONS), (analysis_precision, ANALYSIS_PRECISIONS)):
        if precision not in allowed:
            raise ValueError(f"precision {precision!r} is not one of {allowed}")
    ctx = net.context
    log_gain, log_inverse_gain = gain_tables(net)

    def transform(module: nn.Module, log: Tensor, at_input: bool, precision: str) -> nn.Module:
        if precision == "bfloat16":
            stage: nn.Module = BFloat16Gained(Gained(module, log, at_input))  # a copy of the network
        else:
            stage = Gained(copy.deepcopy(module) if fused_kernels else module, log, at_input)
        return use_fused_kernels(stage) if fused_kernels else stage

    stages: dict[str, nn.Module] = {
        "analysis": transform(net.g_a, log_gain, False, analysis_precision),
        "hyper_analysis": net.h_a,
        "hyper_synthesis": net.h_s,
        "synthesis": transform(net.g_s, log_inverse_gain, True, synthesis_precision),
    }
    for k in range(len(ctx.slices)):
        if k:
            stages[f"channel{k}"] = ctx.channel[k - 1]
        stages[f"spatial{k}"] = ctx.spatial[k]
        stages[f"params{k}"] = SplitParams(ctx.params[k])
    return stages
