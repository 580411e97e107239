"""The LALIC network (Feng et al., CVPR 2025, Fig. 2) with optional variable-rate gains.

Variable rate follows "Asymmetric Gained Deep Image Compression" (Cui et al., CVPR 2021): a
learned gain vector per quality scales y before quantisation and a separate inverse gain
rescales y_hat before g_s; a fractional quality interpolates neighbouring gains geometrically
(Cui et al., Eq. 7), which gives continuous rate control from one set of weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.configs import LalicConfig
from model.context import ContextModel
from model.entropy import FactorizedPrior, GaussianConditional
from model.layers import init_layer_scales, reparameterize
from model.transforms import (
    ConvTranspose2d,
    analysis_transform,
    hyper_analysis,
    hyper_synthesis,
    synthesis_transform,
)

PAD_MULTIPLE = 64
"""Inputs are padded to a multiple of 64 (the total stride of g_a then h_a)."""

SUBPIXEL_MAX_CHANNELS = 16
"""Transposed convolutions with at most this many outputs run in sub-pixel form at inference
(g_s's last layer, 48 -> 3, k5: 26.5 -> 18.7 ms at 768x512 on one core; wider ones were slower)."""


def interpolated_gain(table: Tensor, quality: Tensor) -> Tensor:
    """Gain vectors for qualities (B,) in [1, levels] (Cui et al., CVPR 2021, Eq. 7).

    Geometric interpolation between the neighbouring rows of ``table`` (log gains, levels x M);
    returns (B, M, 1, 1). Used by the network and by the exported analysis/synthesis stages.
    """
    q = quality.to(table.dtype).clamp(1, table.shape[0]) - 1
    low = q.floor().long().clamp_max(table.shape[0] - 2)
    frac = (q - low)[:, None]
    log_gain = (1 - frac) * table[low] + frac * table[low + 1]
    return torch.exp(log_gain)[:, :, None, None]


class LALIC(nn.Module):
    """The whole network of Fig. 2: g_a and g_s (Bi-RWKV transforms, Sec. 3.2), the hyperprior h_a and
    h_s with a factorised prior on z (Ballé et al. 2018), and the RWKV spatial-channel context model
    (RWKV-SCCTX, Sec. 3.3) that predicts the Gaussian parameters of y slice by slice.

    ``forward`` is the training path (reconstruction and likelihoods); :class:`model.codec.Codec`
    codes real bitstreams through the same modules, as the stages of :mod:`model.stages`. With a
    variable-rate configuration, ``log_gain`` and ``log_inverse_gain`` hold one gain vector per
    quality level (Cui et al., CVPR 2021).
    """

    def __init__(self, config: LalicConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.g_a = analysis_transform(c.widths, c.depths, c.latent)
        self.g_s = synthesis_transform(c.widths, c.synthesis_depths or c.depths, c.latent)
        self.h_a = hyper_analysis(c.latent, c.hyper_width, c.hyper_depth, c.hyper_latent)
        self.h_s = hyper_synthesis(c.hyper_latent, c.hyper_width, c.hyper_depth, c.latent)
        self.entropy_bottleneck = FactorizedPrior(c.hyper_latent)
        self.gaussian = GaussianConditional()
        self.context = ContextModel(
            c.slices,
            c.latent,
            c.ctx_width,
            c.ctx_depth,
            c.ctx_ratio,
            c.param_min_width,
            c.param_width_rounding,
        )
        if c.variable_rate:
            levels = len(c.lambdas)
            init = torch.linspace(-1.2, 1.2, levels)[:, None].repeat(1, c.latent)
            self.log_gain = nn.Parameter(init.clone())
            self.log_inverse_gain = nn.Parameter(-init.clone())
        init_layer_scales(self, c.layer_scale_init)

    @property
    def qualities(self) -> tuple[float, ...]:
        return tuple(float(q) for q in range(1, len(self.config.lambdas) + 1))

    def _gain(self, table: Tensor, quality: Tensor) -> Tensor:
        """Geometric interpolation of the per-quality gains; quality (B,) floats in [1, levels]."""
        return interpolated_gain(table, quality)

    def gain(self, quality: Tensor) -> Tensor | None:
        return self._gain(self.log_gain, quality) if self.config.variable_rate else None

    def inverse_gain(self, quality: Tensor) -> Tensor | None:
        return self._gain(self.log_inverse_gain, quality) if self.config.variable_rate else None

    # Stages (used by the codec; each maps tensors to tensors and can be exported).
    def analysis(self, x: Tensor, quality: Tensor) -> Tensor:
        y = self.g_a(x)
        gain = self.gain(quality)
        return y * gain if gain is not None else y

    def synthesis(self, y_hat: Tensor, quality: Tensor) -> Tensor:
        inv = self.inverse_gain(quality)
        return self.g_s(y_hat * inv if inv is not None else y_hat)

    def forward(self, x: Tensor, quality: Tensor | None = None, noise: bool = True) -> dict:
        """Training forward: reconstruction and likelihoods of y and z (x in [0, 1], padded).

        The decoder always sees rounded latents (straight-through). The rate is of the latents
        plus uniform noise in training mode (Ballé et al.'s proxy), or, with ``noise=False``, of the
        rounded latents, the bits the range coder spends (the "hard" fine-tuning of Guo et al.,
        "Soft then Hard", ICCV 2021).
        """
        if quality is None:
            quality = torch.full((x.shape[0],), float(len(self.config.lambdas)), device=x.device)
        y = self.analysis(x, quality)
        z = self.h_a(y)
        z_hat, z_likelihoods = self.entropy_bottleneck(z, noise=noise)
        hyper = self.h_s(z_hat)
        y_hat, y_likelihoods = self.context(y, hyper, noise=noise)
        x_hat = self.synthesis(y_hat, quality)
        return {"x_hat": x_hat, "likelihoods": {"y": y_likelihoods, "z": z_likelihoods}}

    def aux_loss(self) -> Tensor:
        return self.entropy_bottleneck.aux_loss()

    def update(self) -> None:
        """Build the integer CDF tables of both entropy models (after training, before coding)."""
        self.entropy_bottleneck.update()
        self.gaussian.update()

    def prepare_for_inference(self) -> LALIC:
        """Eval mode, Omni-Shift folded into single 5x5 kernels, narrow transposed convolutions in
        sub-pixel form (idempotent; the state dict and the function are unchanged)."""
        self.eval()
        reparameterize(self)
        for m in self.modules():
            if isinstance(m, ConvTranspose2d) and m.out_channels <= SUBPIXEL_MAX_CHANNELS:
                m.use_subpixel()
        return self
