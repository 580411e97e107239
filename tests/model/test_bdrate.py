"""Tests of the Bjøntegaard delta rate (model.bdrate)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from model.bdrate import NoOverlapError, bd_rate, overlap_interval

REFERENCE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "lalic-official"

PSNR = [28.0, 30.5, 32.8, 35.1, 37.4, 39.6]
BPP = [0.12, 0.21, 0.34, 0.52, 0.78, 1.15]


@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_identical_curves_give_zero(method: str) -> None:
    assert bd_rate(BPP, PSNR, BPP, PSNR, method=method) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("method", ["pchip", "cubic"])
@pytest.mark.parametrize("factor", [0.9, 1.25])
def test_constant_rate_factor(method: str, factor: float) -> None:
    """Rates scaled by a constant at equal PSNR shift log-rate by a constant: BD-rate = factor - 1."""
    scaled = [r * factor for r in BPP]
    assert bd_rate(scaled, PSNR, BPP, PSNR, method=method) == pytest.approx((factor - 1) * 100, abs=1e-6)
    # swapping test and anchor gives the reciprocal change
    assert bd_rate(BPP, PSNR, scaled, PSNR, method=method) == pytest.approx((1 / factor - 1) * 100, abs=1e-6)


def test_hand_computed_pchip_example() -> None:
    """Anchor log10-rates 0.3 * [0, 1, 3] at PSNR 30, 31, 32; test log10-rates 0.45 * [0, 1, 2].

    PCHIP slopes of y = [0, 1, 3] on x = [0, 1, 2] (Fritsch-Carlson): interior harmonic mean of the secants 1
    and 2 with equal weights = 4/3, end slopes by the three-point formula (3 * 1 - 2) / 2 = 1/2 and
    (3 * 2 - 1) / 2 = 5/2. Integral of each Hermite cubic: h (y0 + y1) / 2 + h^2 (m0 - m1) / 12, so
    (1/2 - 5/72) + (2 - 7/72) = 7/3. The test curve is linear: integral 1.5 * 2 = 3 (times 0.3 for both).
    Mean log10 difference = 0.3 * (3 - 7/3) / 2 = 0.1, BD-rate = 10^0.1 - 1 = +25.89 %.
    """
    dist = [30.0, 31.0, 32.0]
    anchor = [0.05 * 10 ** (0.3 * y) for y in (0.0, 1.0, 3.0)]
    test = [0.05 * 10 ** (0.45 * y) for y in (0.0, 1.0, 2.0)]
    expected = (10**0.1 - 1) * 100
    assert bd_rate(test, dist, anchor, dist, method="pchip") == pytest.approx(expected, abs=1e-9)
    # A quadratic through (0, 0), (1, 1), (2, 3) also integrates to 7/3 (Simpson's rule is exact for it).
    assert bd_rate(test, dist, anchor, dist, method="cubic") == pytest.approx(expected, abs=1e-9)


def test_hand_computed_cubic_example() -> None:
    """Anchor log10-rate 0.01 x^3 and test 0.09 x at x = PSNR - 30 in 0..3: the cubic fit is exact.

    Integrals over [0, 3]: anchor 0.01 * 81 / 4 = 0.2025, test 0.09 * 9 / 2 = 0.405; mean difference 0.0675.
    """
    x = np.arange(4.0)
    dist = list(30.0 + x)
    anchor = list(0.1 * 10 ** (0.01 * x**3))
    test = list(0.1 * 10 ** (0.09 * x))
    expected = (10**0.0675 - 1) * 100
    assert bd_rate(test, dist, anchor, dist, method="cubic") == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_point_order_does_not_matter(method: str) -> None:
    other = [r * (0.8 + 0.05 * i) for i, r in enumerate(BPP)]
    forward = bd_rate(other, PSNR, BPP, PSNR, method=method)
    backward = bd_rate(other[::-1], PSNR[::-1], BPP, PSNR, method=method)
    assert forward == pytest.approx(backward, abs=1e-12)


def test_only_the_overlap_counts() -> None:
    """Both curves are log-linear; test is 20 % cheaper where they overlap (PSNR 35-40)."""
    anchor_d = np.linspace(30, 40, 5)
    test_d = np.linspace(35, 45, 5)

    def rate(d: np.ndarray) -> np.ndarray:
        return 0.02 * 10 ** (0.05 * d)

    for method in ("pchip", "cubic"):
        value = bd_rate(0.8 * rate(test_d), test_d, rate(anchor_d), anchor_d, method=method)
        assert value == pytest.approx(-20.0, abs=1e-6)
    assert overlap_interval(test_d, anchor_d) == (35.0, 40.0)


def test_no_overlap_is_reported() -> None:
    with pytest.raises(NoOverlapError, match="do not overlap"):
        bd_rate([0.1, 0.2], [25.0, 27.0], [0.5, 1.0], [33.0, 36.0])
    assert overlap_interval([25.0, 27.0], [33.0, 36.0]) is None


@pytest.mark.parametrize(
    ("rates", "dists", "message"),
    [
        ([0.1], [30.0], "at least 2"),
        ([0.1, 0.2], [30.0, 30.0], "distinct"),
        ([0.0, 0.2], [30.0, 31.0], "positive"),
        ([0.1, 0.2, 0.3], [30.0, 31.0], "rates but"),
        ([0.1, float("nan")], [30.0, 31.0], "finite"),
    ],
)
def test_invalid_curves(rates: list[float], dists: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bd_rate(rates, dists, BPP, PSNR)


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown BD-rate method"):
        bd_rate(BPP, PSNR, BPP, PSNR, method="akima")  # type: ignore[arg-type]


# Values from shared/reference/lalic-official/SOURCE.md: LALIC vs VTM-9.1, PCHIP and cubic fits.
UPSTREAM = [
    ("kodak-lalic.json", "kodak-vtm91-compressai.json", -15.26, -15.51),
    ("clicproval-lalic.json", "clicproval-vtm91.json", -15.41, -15.47),
    ("tecnick-lalic.json", "tecnick-vtm91.json", -17.63, -17.72),
]


@pytest.mark.parametrize(("test_file", "anchor_file", "pchip", "cubic"), UPSTREAM)
def test_matches_upstream_bd_rates(test_file: str, anchor_file: str, pchip: float, cubic: float) -> None:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference results not found at {REFERENCE_DIR}")
    test = json.loads((REFERENCE_DIR / test_file).read_text())["results"]
    anchor = json.loads((REFERENCE_DIR / anchor_file).read_text())["results"]
    args = (test["bpp"], test["psnr"], anchor["bpp"], anchor["psnr"])
    assert round(bd_rate(*args, method="pchip"), 2) == pchip
    assert round(bd_rate(*args, method="cubic"), 2) == cubic


def test_agrees_with_bjontegaard_package() -> None:
    """Cross-check against the independent ``bjontegaard`` package (FAU) on irregular curves, if present."""
    bjontegaard = pytest.importorskip("bjontegaard")
    rng = np.random.default_rng(1)
    for _ in range(5):
        d_a = np.sort(rng.uniform(26, 42, 6))
        d_b = np.sort(rng.uniform(27, 41, 5))
        r_a = 0.03 * 10 ** (0.055 * d_a + rng.normal(0, 0.02, 6))
        r_b = 0.04 * 10 ** (0.05 * d_b + rng.normal(0, 0.02, 5))
        for method in ("pchip", "cubic"):
            ours = bd_rate(r_a, d_a, r_b, d_b, method=method)
            theirs = bjontegaard.bd_rate(
                r_b, d_b, r_a, d_a, method=method, require_matching_points=False, min_overlap=0
            )
            assert math.isclose(ours, theirs, abs_tol=1e-8), (method, ours, theirs)
