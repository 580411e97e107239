"""Rate-distortion plots (PSNR and MS-SSIM dB versus bpp) with matplotlib's Agg backend.

Figures are drawn on an explicit Agg canvas, without pyplot, so importing this module changes no global
matplotlib state and works on machines without a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from model.rdcurves import Curve

__all__ = ["plot_rd"]

_STYLE = {
    "ours": {"linewidth": 2.4, "marker": "o", "markersize": 5, "zorder": 5},
    "baseline": {"linewidth": 1.3, "marker": ".", "markersize": 6, "zorder": 3},
    "reference": {"linewidth": 1.3, "marker": "x", "markersize": 5, "linestyle": "--", "zorder": 4},
}


def _axis_limits(curves: Sequence[Curve], metric: str, max_bpp: float) -> tuple[float, float] | None:
    values = [d for c in curves for r, d in zip(*c.points(metric), strict=True) if r <= max_bpp]  # type: ignore[arg-type]
    if not values:
        return None
    lo, hi = min(values), max(values)
    pad = 0.04 * (hi - lo or 1.0)
    return lo - pad, hi + pad


def plot_rd(curves: Sequence[Curve], out_path: Path, title: str = "", max_bpp: float | None = None) -> Path:
    """Draw PSNR vs bpp (left) and MS-SSIM dB vs bpp (right) for all curves into one PNG; return its path.

    The bpp axis runs to ``max_bpp`` (default: 10 % past the largest bpp of our curve, or of the baselines
    when there is no curve of ours, capped at 2 bpp) so that long reference curves do not squash the plot.
    """
    if max_bpp is None:
        main = (
            [c for c in curves if c.kind == "ours"]
            or [c for c in curves if c.kind == "baseline"]
            or list(curves)
        )
        top = max((max(c.bpp) for c in main if c.bpp), default=1.0)
        max_bpp = min(1.1 * top, 2.0) if any(c.kind == "ours" for c in curves) else min(top, 2.0)
    fig = Figure(figsize=(14, 5.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    # baselines and references get distinct palettes (8 colours each), ours is always crimson
    palettes = {"baseline": colormaps["tab10"], "reference": colormaps["Dark2"]}
    counters = {"baseline": 0, "reference": 0}
    colors = []
    for curve in curves:
        if curve.kind == "ours":
            colors.append("crimson")
        else:
            colors.append(palettes[curve.kind](counters[curve.kind] % 8))
            counters[curve.kind] += 1
    for ax, metric, ylabel in (
        (axes[0], "psnr", "PSNR RGB [dB]"),
        (axes[1], "msssim_db", "MS-SSIM RGB [dB]  (-10 log10(1 - MS-SSIM))"),
    ):
        drawn = 0
        for curve, color in zip(curves, colors, strict=True):
            x, y = curve.points(metric)  # type: ignore[arg-type]
            if len(x) < 1:
                continue
            style = dict(_STYLE[curve.kind])
            ax.plot(x, y, label=curve.label, color=color, **style)
            drawn += 1
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0.0, max_bpp)
        limits = _axis_limits(curves, metric, max_bpp)
        if limits:
            ax.set_ylim(*limits)
        ax.grid(True, alpha=0.35)
        if drawn:
            ax.legend(fontsize=7, loc="lower right")
        else:
            ax.text(0.5, 0.5, "no curve has this metric", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png")
    return out_path
