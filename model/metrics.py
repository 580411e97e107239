"""Image quality metrics for rate-distortion evaluation: PSNR and MS-SSIM over 8-bit RGB images.

Both metrics follow CompressAI's evaluation conventions so that our numbers compare with published
curves: PSNR is computed over all three RGB channels of the 8-bit images (peak 255); MS-SSIM is the
5-scale metric of Wang et al. (2003) with the standard weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333),
an 11-tap Gaussian window with sigma 1.5, computed per channel on [0, 255] and averaged over channels.
MS-SSIM is computed by the ``pytorch-msssim`` package.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["MSSSIM_WEIGHTS", "MSSSIM_MIN_SIDE", "bits_per_pixel", "ms_ssim", "ms_ssim_db", "mse", "psnr"]

#: The standard five-scale MS-SSIM weights (Wang, Simoncelli & Bovik 2003).
MSSSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_WIN_SIZE = 11
#: Images must be larger than this on their smaller side for 5-scale MS-SSIM with an 11-tap window.
MSSSIM_MIN_SIDE = (_WIN_SIZE - 1) * 2 ** (len(MSSSIM_WEIGHTS) - 1)


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected H x W x 3 RGB images, got shape {a.shape}")


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error over all pixels and channels (in 8-bit units)."""
    _check_pair(a, b)
    diff = a.astype(np.float64) - b.astype(np.float64)
    return float(np.mean(diff * diff))


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB between two H x W x 3 images over all RGB channels; ``inf`` for identical images."""
    err = mse(a, b)
    if err == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / err)


def ms_ssim(a: np.ndarray, b: np.ndarray, threads: int | None = 1) -> float:
    """Five-scale MS-SSIM between two 8-bit H x W x 3 images, computed on [0, 255] (data range 255).

    Computed in float32 like CompressAI (float64 changes values by less than 1e-6 and is twice as slow).
    ``threads`` sets torch's intra-op thread count for this call only and restores it afterwards (``None``
    leaves it alone): one thread is the default because on a small shared machine a second thread that is
    descheduled makes the convolutions several times slower, and the metric is never on the timed path.
    Raises ``ValueError`` when the smaller image side is not larger than :data:`MSSSIM_MIN_SIDE` (160 px),
    where five scales do not fit the 11-tap window.
    """
    _check_pair(a, b)
    if min(a.shape[:2]) <= MSSSIM_MIN_SIDE:
        raise ValueError(f"MS-SSIM needs both sides > {MSSSIM_MIN_SIDE} px, got {a.shape[1]}x{a.shape[0]}")
    import torch
    from pytorch_msssim import ms_ssim as _ms_ssim

    def to_tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).unsqueeze(0).float()

    previous = torch.get_num_threads()
    if threads is not None and threads != previous:
        torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            value = _ms_ssim(
                to_tensor(a),
                to_tensor(b),
                data_range=255.0,
                size_average=True,
                win_size=_WIN_SIZE,
                win_sigma=1.5,
                weights=list(MSSSIM_WEIGHTS),
            )
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
    return float(value)


def ms_ssim_db(value: float) -> float:
    """MS-SSIM expressed in dB, ``-10 log10(1 - MS-SSIM)``; ``inf`` for a perfect score."""
    if value >= 1.0:
        return math.inf
    return -10.0 * math.log10(1.0 - value)


def bits_per_pixel(num_bytes: int, height: int, width: int) -> float:
    """Bits per pixel of a bitstream of ``num_bytes`` bytes for an image of ``height`` x ``width`` pixels."""
    return 8.0 * num_bytes / (height * width)
