"""Tests of PSNR and MS-SSIM (model.metrics), MS-SSIM checked against an independent NumPy implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from model import metrics

WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gaussian(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - size // 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _blur_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    rows = sliding_window_view(img, g.size, axis=0) @ g
    return sliding_window_view(rows, g.size, axis=1) @ g


def _reference_ms_ssim(a: np.ndarray, b: np.ndarray, window: np.ndarray | None = None) -> float:
    """MS-SSIM after Wang, Simoncelli & Bovik (2003), per channel on [0, 255], mean over channels.

    11-tap Gaussian (sigma 1.5) without padding, K1 = 0.01, K2 = 0.03, 2x2 average pooling between scales,
    contrast-structure terms at scales 1-4 and the full SSIM at scale 5, negative values clipped to 0.
    """
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    g = _gaussian() if window is None else window
    per_channel = []
    for ch in range(3):
        x = a[..., ch].astype(np.float64)
        y = b[..., ch].astype(np.float64)
        value = 1.0
        for level, weight in enumerate(WEIGHTS):
            mx, my = _blur_valid(x, g), _blur_valid(y, g)
            sxx = _blur_valid(x * x, g) - mx**2
            syy = _blur_valid(y * y, g) - my**2
            sxy = _blur_valid(x * y, g) - mx * my
            cs_map = (2 * sxy + c2) / (sxx + syy + c2)
            if level < len(WEIGHTS) - 1:
                value *= max(cs_map.mean(), 0.0) ** weight
                h, w = x.shape
                x = x.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
                y = y.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
            else:
                ssim_map = (2 * mx * my + c1) / (mx**2 + my**2 + c1) * cs_map
                value *= max(ssim_map.mean(), 0.0) ** weight
        per_channel.append(value)
    return float(np.mean(per_channel))


def _smooth_image(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A natural-ish test image: smooth random gradients plus texture."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack(
        [
            128 + 90 * np.sin(6 * xx + c) * np.cos(4 * yy - c) + rng.normal(0, 12, (size, size))
            for c in (0.0, 1.0, 2.0)
        ],
        axis=-1,
    )
    return np.clip(img, 0, 255).astype(np.uint8)


def _degrade(img: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    return np.clip(img.astype(np.float64) + rng.normal(0, noise, img.shape), 0, 255).round().astype(np.uint8)


def test_psnr_identical_is_inf() -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    assert metrics.psnr(img, img) == math.inf


def test_psnr_known_value() -> None:
    a = np.full((4, 6, 3), 100, np.uint8)
    b = a + 10  # MSE 100
    assert metrics.mse(a, b) == 100.0
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-12)
    # only half the values off by 20: MSE = 200 (uint8 arithmetic must not wrap)
    c = a.copy()
    c[:2] = 80
    assert metrics.mse(a, c) == 200.0


def test_psnr_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="RGB"):
        metrics.psnr(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))


def test_ms_ssim_identical_is_one() -> None:
    img = _smooth_image(np.random.default_rng(0))
    assert metrics.ms_ssim(img, img) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ms_ssim_db(1.0) == math.inf


def test_ms_ssim_matches_independent_reference() -> None:
    try:  # private helper of pytorch-msssim; only used to take float32 window rounding out of the comparison
        from pytorch_msssim.ssim import _fspecial_gauss_1d

        library_window: np.ndarray | None = _fspecial_gauss_1d(11, 1.5).double().numpy().ravel()
    except ImportError:
        library_window = None
    rng = np.random.default_rng(0)
    img = _smooth_image(rng)
    for noise in (4.0, 20.0):
        noisy = _degrade(img, rng, noise)
        ours = metrics.ms_ssim(img, noisy)
        assert 0.0 < ours < 1.0
        # pytorch-msssim builds its Gaussian window in float32, which moves MS-SSIM by about 1e-6
        assert ours == pytest.approx(_reference_ms_ssim(img, noisy), abs=1e-5)
        if library_window is not None:  # with that same window, only float32 arithmetic is left
            assert ours == pytest.approx(_reference_ms_ssim(img, noisy, library_window), abs=1e-6)


def test_ms_ssim_decreases_with_noise() -> None:
    rng = np.random.default_rng(3)
    img = _smooth_image(rng, 192)
    values = [metrics.ms_ssim(img, _degrade(img, rng, s)) for s in (2.0, 8.0, 32.0)]
    assert values[0] > values[1] > values[2]


def test_ms_ssim_restores_torch_threads() -> None:
    torch = pytest.importorskip("torch")
    img = _smooth_image(np.random.default_rng(5), 176)
    before = torch.get_num_threads()
    metrics.ms_ssim(img, img, threads=1)
    assert torch.get_num_threads() == before


def test_ms_ssim_needs_five_scales() -> None:
    img = np.zeros((160, 300, 3), np.uint8)
    with pytest.raises(ValueError, match="160"):
        metrics.ms_ssim(img, img)


def test_ms_ssim_db_and_bpp() -> None:
    assert metrics.ms_ssim_db(0.99) == pytest.approx(20.0)
    assert metrics.ms_ssim_db(0.9) == pytest.approx(10.0)
    assert metrics.bits_per_pixel(1000, 100, 80) == pytest.approx(1.0)
