"""How many training steps the issue-3 targets need, from the shipped weights' learning curve.

Run from the repository root with the venv active::

    python bench/learning_curve.py                      # fit from 37 418 steps on (256² crops and larger)
    python bench/learning_curve.py --from-steps 0       # every published row

Reads ``bench/results/training-progress.json``: the Kodak BD-rates (PSNR, PCHIP, real bitstreams,
all 24 images) that ``lalic eval`` measured for each published ``lalic-s`` against WebP, AVIF 4:4:4
and JPEG XL. For each baseline the rate ratio ``1 + BD/100`` is fitted as a power of the step count,
``ln(1 + BD/100) = c + k·ln(steps)`` (least squares over the rows from ``--from-steps``), and solved
for the step count at which it meets the issue's target (≤ −20 % vs WebP, ≤ 0 % vs AVIF 4:4:4).

The fit keeps the gain per doubling of steps constant. Learning curves flatten, so the projected
steps are a lower bound for this network and recipe, not an estimate of what would suffice.
Nothing here runs the model.

Writes ``--out`` (default ``bench/results``): ``learning-curve.json``, ``learning-curve.md`` and the
plot ``learning-curve.png`` (BD-rate against steps, log scale, with the fits and the targets).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROGRESS = ROOT / "bench" / "results" / "training-progress.json"


@dataclass(frozen=True)
class PowerFit:
    """``1 + BD/100 = exp(intercept) · steps**slope``, fitted over ``points`` rows."""

    intercept: float
    slope: float
    points: int

    def bd_rate(self, steps: float) -> float:
        """BD-rate in percent that the fit predicts at ``steps``."""
        return 100.0 * (math.exp(self.intercept + self.slope * math.log(steps)) - 1.0)

    @property
    def percent_per_doubling(self) -> float:
        """Change of the rate ratio for each doubling of the steps, in percent."""
        return 100.0 * (2.0**self.slope - 1.0)

    def steps_for(self, bd_target: float) -> float | None:
        """Steps at which the fit reaches ``bd_target`` percent; None if it never falls there (a
        curve that does not fall, or a target of −100 % or below: a power law never reaches rate 0)."""
        if self.slope >= 0 or bd_target <= -100.0:
            return None
        return math.exp((math.log1p(bd_target / 100.0) - self.intercept) / self.slope)


def fit_power(steps: list[float], bd_rates: list[float]) -> PowerFit:
    """Least-squares fit of ``ln(1 + BD/100)`` against ``ln(steps)``; needs two distinct step counts."""
    if len(set(steps)) < 2:
        raise ValueError("the fit needs at least two distinct step counts")
    slope, intercept = np.polyfit(np.log(steps), np.log1p(np.asarray(bd_rates) / 100.0), 1)
    return PowerFit(float(intercept), float(slope), len(steps))


def project(progress: dict, from_steps: int, steps_per_session: int) -> dict:
    """Fit every baseline that has a target and project the steps that reach it."""
    rows = [r for r in progress["rows"] if r["steps"] >= from_steps]
    last = progress["rows"][-1]  # the shipped weights
    out = {}
    for name, target in progress["targets"].items():
        fit = fit_power([r["steps"] for r in rows], [r["bd_rate"][name] for r in rows])
        need = fit.steps_for(target)
        more = None if need is None else max(0.0, need - last["steps"])
        out[name] = {
            "label": progress["baselines"][name],
            "target": target,
            "last": {"steps": last["steps"], "bd_rate": last["bd_rate"][name]},
            "fit": asdict(fit),
            "percent_per_doubling": fit.percent_per_doubling,
            "steps_for_target": need,
            "more_steps": more,
            "sessions": None if more is None else math.ceil(more / steps_per_session),
        }
    return out


def plot(progress: dict, projection: dict, from_steps: int, path: Path) -> Path:
    fig = Figure(figsize=(8, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = {"webp": "tab:blue", "avif444": "tab:red"}
    for name, p in projection.items():
        rows = progress["rows"]
        colour = colours.get(name)
        ax.plot(
            [r["steps"] for r in rows],
            [r["bd_rate"][name] for r in rows],
            "o",
            color=colour,
            label=f"vs {p['label']}",
        )
        fit = PowerFit(p["fit"]["intercept"], p["fit"]["slope"], p["fit"]["points"])
        end = p["steps_for_target"] or rows[-1]["steps"]
        xs = np.geomspace(from_steps or rows[0]["steps"], max(end, rows[-1]["steps"]) * 1.1, 100)
        ax.plot(
            xs,
            [fit.bd_rate(x) for x in xs],
            "--",
            color=colour,
            linewidth=1.2,
            label=f"fit: {p['percent_per_doubling']:+.1f} % a doubling",
        )
        ax.axhline(p["target"], color=colour, linewidth=0.8, linestyle=":")
        if p["steps_for_target"]:
            at = (p["steps_for_target"], p["target"])
            ax.annotate(
                f"target at {at[0] / 1000:.0f} k",
                at,
                textcoords="offset points",
                xytext=(-60, 8),
                color=colour,
                fontsize=8,
            )
    ax.set_xscale("log")
    ax.set_xlabel("training steps (log scale)")
    ax.set_ylabel("Kodak BD-rate, PSNR (%)")
    ax.set_title("lalic-s learning curve and the issue-3 targets (dotted)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def markdown(report: dict) -> str:
    lines = [
        "# Steps the issue-3 targets need, from the learning curve",
        "",
        f"- Command: `{report['command']}`",
        f"- {report['date']}; fit over the published rows with at least {report['from_steps']} steps; "
        f"sessions at {report['steps_per_session']} steps each",
        "- The fit keeps the gain per doubling constant, so the projected steps are a lower bound.",
        "",
        "| baseline | target | last (steps, BD) | per doubling | target at | more steps | sessions |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in report["projection"].values():
        need, more, sessions = p["steps_for_target"], p["more_steps"], p["sessions"]
        lines.append(
            f"| {p['label']} | {p['target']:+.0f} % | {p['last']['steps']}, {p['last']['bd_rate']:+.1f} % | "
            f"{p['percent_per_doubling']:+.1f} % | {'never' if need is None else f'{need:,.0f}'} | "
            f"{'-' if more is None else f'{more:,.0f}'} | {'-' if sessions is None else sessions} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--progress", type=Path, default=DEFAULT_PROGRESS, help="the published rows (JSON)")
    p.add_argument(
        "--from-steps",
        type=int,
        default=37418,
        help="fit only rows with at least this many steps (default: the first 256² weights)",
    )
    p.add_argument(
        "--steps-per-session",
        type=int,
        default=2000,
        help="training steps one 3-hour CPU session adds (sessions 11-15: 1 100-2 000 at 384²-512²)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    progress = json.loads(args.progress.read_text())
    report = {
        "command": " ".join(
            ["python bench/learning_curve.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "from_steps": args.from_steps,
        "steps_per_session": args.steps_per_session,
        "projection": project(progress, args.from_steps, args.steps_per_session),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learning-curve.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "learning-curve.md").write_text(markdown(report))
    plot(progress, report["projection"], args.from_steps, args.out / "learning-curve.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
