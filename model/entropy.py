"""Entropy models: a learned factorised prior for z and a Gaussian conditional for y.

Both follow Ballé et al., "Variational image compression with a scale hyperprior" (ICLR 2018),
Sec. 3 and appendix 6.1 (the univariate non-parametric density), as used by LALIC (Sec. 3.3).
Training uses additive uniform noise for rates; values seen by the decoder are rounded around
the mean with a straight-through gradient. :meth:`update` turns trained parameters into integer
CDF tables (16-bit), stored as buffers with the weights so both sides code with the same integers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import fixedpoint
from model.coder import CdfTables

LIKELIHOOD_BOUND = 1e-9
SCALE_BOUND = 0.11
TAIL_MASS = 1e-9


class _LowerBound(torch.autograd.Function):
    """``max(x, bound)`` whose gradient still flows where it pushes ``x`` up (CompressAI's LowerBound)."""

    @staticmethod
    def forward(ctx, x: Tensor, bound: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.bound = bound
        return x.clamp_min(bound)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        passes = (x >= ctx.bound) | (grad < 0)
        return passes.type_as(grad) * grad, None


def lower_bound(x: Tensor, bound: float) -> Tensor:
    return _LowerBound.apply(x, bound)


def round_ste(x: Tensor) -> Tensor:
    """Round with a straight-through (identity) gradient."""
    return x + (torch.round(x) - x).detach()


SCALE_LEVELS = 128
"""Number of y tables. CompressAI has 64 and codes each scale with the next larger table: on the
24 Kodak images with the shipped weights that costs +0.26 to +0.48 % over the exact Gaussian at
q6..q1, and 128 tables with the nearest scale in log scale -0.01 to +0.03 %
(``bench/scale_tables.py``, BENCHMARKS.md)."""


def scale_table(levels: int = SCALE_LEVELS, low: float = SCALE_BOUND, high: float = 256.0) -> Tensor:
    """The log-spaced scales whose CDF tables code y (``levels`` of them from 0.11 to 256)."""
    return torch.exp(torch.linspace(math.log(low), math.log(high), levels))


def tables_to_buffers(module: nn.Module, prefix: str, tables: CdfTables) -> None:
    """Store CDF tables as integer buffers so they travel in the state dict."""
    for name, arr in tables.to_arrays().items():
        setattr(module, f"{prefix}_{name}", torch.from_numpy(np.ascontiguousarray(arr)).to(torch.int32))


def tables_from_buffers(module: nn.Module, prefix: str) -> CdfTables:
    arrays = [getattr(module, f"{prefix}_{n}").cpu().numpy() for n in ("cdfs", "cdf_lengths", "offsets")]
    return CdfTables.from_arrays(*arrays)


class FactorizedPrior(nn.Module):
    """Learned non-parametric density per channel for z (Ballé 2018, appendix 6.1).

    Filters (3, 3, 3, 3), init scale 10, tail mass 1e-9; ``quantiles`` are trained by
    :meth:`aux_loss` (a separate optimiser) and give the median and the coding range.
    """

    def __init__(self, channels: int, filters: tuple[int, ...] = (3, 3, 3, 3), init_scale: float = 10.0):
        super().__init__()
        self.channels = channels
        dims = (1, *filters, 1)
        scale = init_scale ** (1 / (len(filters) + 1))
        self.matrices = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.factors = nn.ParameterList()
        for i in range(len(filters) + 1):
            init = math.log(math.expm1(1 / scale / dims[i + 1]))
            self.matrices.append(nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init)))
            self.biases.append(nn.Parameter(torch.empty(channels, dims[i + 1], 1).uniform_(-0.5, 0.5)))
            if i < len(filters):
                self.factors.append(nn.Parameter(torch.zeros(channels, dims[i + 1], 1)))
        target = math.log(2 / TAIL_MASS - 1)
        self.quantiles = nn.Parameter(torch.tensor([-init_scale, 0.0, init_scale]).repeat(channels, 1, 1))
        self.register_buffer("target", torch.tensor([-target, 0.0, target]))
        self.register_buffer("z_cdfs", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("z_cdf_lengths", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("z_offsets", torch.zeros(0, dtype=torch.int32))
        self._tables: CdfTables | None = None

    def medians(self) -> Tensor:
        return self.quantiles[:, 0, 1].detach()

    def _logits_cumulative(self, x: Tensor, stop_gradient: bool) -> Tensor:
        """x: (C, 1, N) -> logits of the cumulative density at x, (C, 1, N)."""
        for i, (matrix, bias) in enumerate(zip(self.matrices, self.biases, strict=True)):
            m, b = (matrix.detach(), bias.detach()) if stop_gradient else (matrix, bias)
            x = torch.matmul(F.softplus(m), x) + b
            if i < len(self.factors):
                f = self.factors[i].detach() if stop_gradient else self.factors[i]
                x = x + torch.tanh(f) * torch.tanh(x)
        return x

    def likelihood(self, z: Tensor) -> Tensor:
        """P(z - 0.5 < Z < z + 0.5) for every element of z (B, C, H, W)."""
        c = z.shape[1]
        flat = z.transpose(0, 1).reshape(c, 1, -1)
        lower = self._logits_cumulative(flat - 0.5, stop_gradient=False)
        upper = self._logits_cumulative(flat + 0.5, stop_gradient=False)
        sign = -torch.sign(lower + upper).detach()
        lik = (torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).abs()
        lik = lik.reshape(c, z.shape[0], *z.shape[2:]).transpose(0, 1)
        return lower_bound(lik, LIKELIHOOD_BOUND)

    def forward(self, z: Tensor, noise: bool = True) -> tuple[Tensor, Tensor]:
        """Returns (z_hat for the decoder path, likelihoods for the rate).

        The likelihoods are of z plus uniform noise in training mode with ``noise``, else of z_hat
        (what the range coder pays; straight-through gradient).
        """
        med = self.medians().view(1, -1, 1, 1)
        z_hat = round_ste(z - med) + med
        noisy = z + torch.empty_like(z).uniform_(-0.5, 0.5) if self.training and noise else z_hat
        return z_hat, self.likelihood(noisy)

    def aux_loss(self) -> Tensor:
        logits = self._logits_cumulative(self.quantiles, stop_gradient=True)
        return (logits - self.target).abs().sum()

    @torch.no_grad()
    def update(self) -> None:
        """Build the per-channel integer CDF tables from the trained density."""
        q = self.quantiles.detach().cpu().double()
        med = q[:, 0, 1]
        minima = torch.ceil(med - q[:, 0, 0]).clamp_min(0).long()
        maxima = torch.ceil(q[:, 0, 2] - med).clamp_min(0).long()
        length = (minima + maxima + 1).clamp(max=4096)
        n = int(length.max())
        # every channel evaluated at its own sample points (padded to the longest range)
        samples = torch.arange(n, dtype=torch.float64)[None] - minima[:, None] + med[:, None]
        x = samples.float()[:, None, :]
        lower = self._logits_cumulative(x - 0.5, stop_gradient=True)[:, 0].double()
        upper = self._logits_cumulative(x + 0.5, stop_gradient=True)[:, 0].double()
        sign = -torch.sign(lower + upper)
        pmf_all = (torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).abs()
        pmfs = [pmf_all[ch, : int(length[ch])].numpy() for ch in range(self.channels)]
        offsets = [-int(m) for m in minima]
        tables = CdfTables.from_pmfs(pmfs, np.asarray(offsets, dtype=np.int32))
        tables_to_buffers(self, "z", tables)
        self._tables = None

    def tables(self) -> CdfTables:
        if self._tables is None:
            if self.z_cdfs.numel() == 0:
                raise RuntimeError("entropy tables are not built: call update() after training")
            self._tables = tables_from_buffers(self, "z")
        return self._tables

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("z_cdfs", "z_cdf_lengths", "z_offsets"):
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key]))
        self._tables = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def gaussian_likelihood(y: Tensor, scales: Tensor, means: Tensor) -> Tensor:
    """P(y - 0.5 < Y < y + 0.5) for Y ~ N(means, scales²), scales bounded below by 0.11."""
    scales = lower_bound(scales, SCALE_BOUND)
    v = (y - means).abs()
    upper = torch.special.ndtr((0.5 - v) / scales)
    lower = torch.special.ndtr((-0.5 - v) / scales)
    return lower_bound(upper - lower, LIKELIHOOD_BOUND)


class GaussianConditional(nn.Module):
    """Codes y with 16-bit CDF tables of discretised Gaussians indexed by quantised scale.

    A predicted scale is coded with the table whose scale is nearest to it in log scale (the
    thresholds are the geometric means of neighbouring table scales). The tables and the scale
    table travel in the state dict; a state dict whose scale table differs from this module's
    (weights written with another table) loads without its tables, which :meth:`update` then
    rebuilds, so the weights digest tells streams coded with the old tables apart.
    """

    def __init__(self, levels: int = SCALE_LEVELS) -> None:
        super().__init__()
        self.register_buffer("scale_table", scale_table(levels))
        self.register_buffer("y_cdfs", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("y_cdf_lengths", torch.zeros(0, dtype=torch.int32))
        self.register_buffer("y_offsets", torch.zeros(0, dtype=torch.int32))
        self._tables: CdfTables | None = None

    def indexes(self, scales: Tensor) -> Tensor:
        """Index of the table scale nearest to each predicted scale in log scale.

        The thresholds are computed on the CPU (IEEE float multiply and sqrt in the scales' dtype)
        whatever the device: a GPU's fast-math sqrt must not move a threshold.
        """
        t = self.scale_table.cpu().to(scales.dtype)
        thresholds = torch.sqrt(t[:-1] * t[1:]).to(scales.device)
        return fixedpoint.bucketize(scales, thresholds)

    @torch.no_grad()
    def update(self) -> None:
        multiplier = -float(torch.special.ndtri(torch.tensor(TAIL_MASS / 2, dtype=torch.float64)))
        pmfs, offsets = [], []
        for s in self.scale_table.double():
            center = int(math.ceil(float(s) * multiplier))
            v = torch.arange(-center, center + 1, dtype=torch.float64).abs()
            pmf = torch.special.ndtr((0.5 - v) / s) - torch.special.ndtr((-0.5 - v) / s)
            pmfs.append(pmf.numpy())
            offsets.append(-center)
        tables_to_buffers(self, "y", CdfTables.from_pmfs(pmfs, np.asarray(offsets, dtype=np.int32)))
        self._tables = None

    def tables(self) -> CdfTables:
        if self._tables is None:
            if self.y_cdfs.numel() == 0:
                self.update()
            self._tables = tables_from_buffers(self, "y")
        return self._tables

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        names = ("y_cdfs", "y_cdf_lengths", "y_offsets")
        stored = state_dict.get(prefix + "scale_table")
        same = stored is not None and stored.shape == self.scale_table.shape
        same = same and torch.allclose(stored.to(self.scale_table), self.scale_table, rtol=1e-5, atol=0)
        if stored is not None and not same:
            # written with another scale table: keep ours, drop the stale tables (update() rebuilds);
            # a matching one is loaded as stored, so every machine indexes with the file's values
            state_dict[prefix + "scale_table"] = self.scale_table.clone()
            for name in names:
                state_dict[prefix + name] = torch.zeros(0, dtype=torch.int32)
        for name in names:
            key = prefix + name
            if key in state_dict:
                setattr(self, name, torch.empty_like(state_dict[key]))
        self._tables = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
