"""bench/learning_curve.py: the power-law fit of the shipped weights' BD-rates and its projection."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from tests.model.bench_scripts import load_bench_script

curve = load_bench_script("learning_curve")


def _ratio(steps: float) -> float:
    """An exact power law: the rate ratio 2.0 at 10 000 steps, -10 % every doubling."""
    return 2.0 * 0.9 ** math.log2(steps / 10_000)


def test_the_fit_recovers_an_exact_power_law_and_solves_it_for_a_target() -> None:
    steps = [10_000, 20_000, 40_000, 80_000]
    fit = curve.fit_power(steps, [100 * (_ratio(s) - 1) for s in steps])
    assert fit.points == 4
    assert fit.percent_per_doubling == pytest.approx(-10.0, abs=1e-9)
    assert fit.bd_rate(30_000) == pytest.approx(100 * (_ratio(30_000) - 1), abs=1e-9)
    # ratio 1.0 (BD 0 %) needs 2.0 * 0.9**d = 1, d = log(0.5) / log(0.9) doublings of 10 000
    assert fit.steps_for(0.0) == pytest.approx(10_000 * 2 ** (math.log(0.5) / math.log(0.9)), rel=1e-9)


def test_a_curve_that_does_not_fall_never_reaches_the_target() -> None:
    fit = curve.fit_power([1_000, 2_000, 4_000], [10.0, 10.0, 12.0])
    assert fit.slope > 0 and fit.steps_for(-20.0) is None
    with pytest.raises(ValueError, match="two distinct"):
        curve.fit_power([5_000, 5_000], [1.0, 2.0])


def test_main_writes_the_projection_table_and_plot(tmp_path: Path) -> None:
    rows = [
        {
            "weights": f"w{s}",
            "steps": s,
            "bd_rate": {"webp": 100 * (_ratio(s) - 1), "avif444": 50.0 - s / 1e3},
        }
        for s in (5_000, 10_000, 20_000, 40_000)
    ]
    progress = {
        "baselines": {"webp": "WebP", "avif444": "AVIF"},
        "targets": {"webp": 0.0, "avif444": -100.0},  # AVIF: a ratio of 0 is never reached
        "rows": rows,
    }
    source = tmp_path / "progress.json"
    source.write_text(json.dumps(progress))
    argv = ["--progress", str(source), "--from-steps", "10000", "--steps-per-session", "1000"]
    assert curve.main([*argv, "--out", str(tmp_path)]) == 0

    report = json.loads((tmp_path / "learning-curve.json").read_text())
    webp = report["projection"]["webp"]
    assert webp["fit"]["points"] == 3  # the 5 000-step row is left out
    need = 10_000 * 2 ** (math.log(0.5) / math.log(0.9))
    assert webp["steps_for_target"] == pytest.approx(need, rel=1e-9)
    assert webp["more_steps"] == pytest.approx(need - 40_000, rel=1e-9)
    assert webp["sessions"] == math.ceil((need - 40_000) / 1_000)
    assert report["projection"]["avif444"]["steps_for_target"] is None
    table = (tmp_path / "learning-curve.md").read_text()
    assert f"| WebP | +0 % | 40000, {webp['last']['bd_rate']:+.1f} % | -10.0 % | {need:,.0f} |" in table
    assert "| AVIF | -100 % | 40000, +10.0 % |" in table and "| never | - | - |" in table
    with Image.open(tmp_path / "learning-curve.png") as png:
        assert png.format == "PNG" and png.size[0] > 400


def test_the_published_rows_are_in_step_order_and_end_with_the_shipped_weights() -> None:
    progress = json.loads(curve.DEFAULT_PROGRESS.read_text())
    steps = [r["steps"] for r in progress["rows"]]
    assert steps == sorted(steps)
    manifest = json.loads((curve.ROOT / "model" / "weights" / "manifest.json").read_text())["models"][0]
    assert progress["rows"][-1]["weights"] == Path(manifest["file"]).stem
    assert progress["rows"][-1]["steps"] == manifest["training"]["steps"]
