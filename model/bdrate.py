"""Bjøntegaard delta rate (BD-rate) between two rate-distortion curves.

The BD-rate is the average relative bitrate difference between a test curve ``a`` and an anchor curve ``b``
at equal quality. Both curves are fitted as log-rate versus distortion (PSNR or MS-SSIM dB) and the
difference of the fits is averaged over the distortion interval the two curves share; the result, in
percent, is negative when ``a`` needs fewer bits than ``b``.

Two fits are offered:

* ``"pchip"``: piecewise cubic Hermite interpolation through the points (shape preserving, Fritsch-Carlson
  slopes as in :class:`scipy.interpolate.PchipInterpolator`) integrated exactly. This is what upstream
  LALIC/CompressAI-style tools report, and what the VCEG/JVET spreadsheets moved to.
* ``"cubic"``: the classic VCEG-M33 fit, a least-squares cubic polynomial in the distortion (the degree is
  lowered to ``n - 1`` for curves of fewer than four points).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy.interpolate import PchipInterpolator

__all__ = ["BDMethod", "NoOverlapError", "bd_rate", "overlap_interval"]

BDMethod = Literal["pchip", "cubic"]


class NoOverlapError(ValueError):
    """The two curves share no distortion interval, so no BD-rate can be computed."""


def _prepare(rate: Sequence[float], dist: Sequence[float], label: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (distortion, log10 rate) sorted by distortion, after validating the points."""
    r = np.asarray(rate, dtype=np.float64).ravel()
    d = np.asarray(dist, dtype=np.float64).ravel()
    if r.shape != d.shape:
        raise ValueError(f"curve {label}: {r.size} rates but {d.size} distortion values")
    if r.size < 2:
        raise ValueError(f"curve {label}: need at least 2 rate-distortion points, got {r.size}")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(d))):
        raise ValueError(f"curve {label}: rates and distortions must be finite")
    if np.any(r <= 0):
        raise ValueError(f"curve {label}: rates must be positive")
    order = np.argsort(d, kind="stable")
    d, r = d[order], r[order]
    if np.any(np.diff(d) <= 0):
        raise ValueError(f"curve {label}: distortion values must be distinct")
    return d, np.log10(r)


def overlap_interval(dist_a: Sequence[float], dist_b: Sequence[float]) -> tuple[float, float] | None:
    """The distortion interval covered by both curves, or ``None`` if they do not overlap."""
    lo = max(float(np.min(dist_a)), float(np.min(dist_b)))
    hi = min(float(np.max(dist_a)), float(np.max(dist_b)))
    return (lo, hi) if hi > lo else None


def _integral(d: np.ndarray, log_r: np.ndarray, lo: float, hi: float, method: BDMethod) -> float:
    if method == "pchip":
        return float(PchipInterpolator(d, log_r).integrate(lo, hi))
    if method == "cubic":
        degree = min(3, d.size - 1)
        # Fit around the centre of the data: numerically safer than raw PSNR powers, same polynomial.
        centre = float(np.mean(d))
        coeffs = np.polyfit(d - centre, log_r, degree)
        primitive = np.polyint(coeffs)
        return float(np.polyval(primitive, hi - centre) - np.polyval(primitive, lo - centre))
    raise ValueError(f"unknown BD-rate method {method!r}; use 'pchip' or 'cubic'")


def bd_rate(
    rate_a: Sequence[float],
    dist_a: Sequence[float],
    rate_b: Sequence[float],
    dist_b: Sequence[float],
    method: BDMethod = "pchip",
) -> float:
    """BD-rate of curve ``a`` (test) against curve ``b`` (anchor), in percent; negative means ``a`` is better.

    ``rate_*`` are bitrates (bpp or any positive unit shared by both curves) and ``dist_*`` the matching
    quality values, higher is better (PSNR dB, MS-SSIM dB). Points may come in any order. The average is
    taken over the overlap of the two distortion ranges only; :class:`NoOverlapError` is raised if it is
    empty.
    """
    da, la = _prepare(rate_a, dist_a, "a")
    db, lb = _prepare(rate_b, dist_b, "b")
    interval = overlap_interval(da, db)
    if interval is None:
        raise NoOverlapError(
            f"distortion ranges do not overlap: a covers [{da[0]:.3f}, {da[-1]:.3f}], "
            f"b covers [{db[0]:.3f}, {db[-1]:.3f}]"
        )
    lo, hi = interval
    mean_diff = (_integral(da, la, lo, hi, method) - _integral(db, lb, lo, hi, method)) / (hi - lo)
    return float((10.0**mean_diff - 1.0) * 100.0)
