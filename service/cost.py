"""How long a job will take: a per-operation linear cost model, calibrated at warm-up, kept current.

A job codes ``images`` images of ``pixels`` padded pixels each (every codec stage runs one image at a
time, tiles included), so its run time is about ``images * (fixed + per_pixel * pixels)``: ``fixed``
is the per-image overhead (Python, small kernels, range-coder set-up) and ``per_pixel`` the
networks' time per pixel on this device. Both are measured at warm-up (:meth:`CostModel.calibrate`
with two image sizes) and then follow live timings (:meth:`CostModel.observe`): each finished batch
scales both parameters towards what it measured, an exponentially weighted moving average of the
ratio measured / predicted whose step is shared between them in proportion to their part of the
predicted time, so small images teach the overhead and large ones the per-pixel time (and a stall
of the machine during a small job barely moves the per-pixel time).

Measured on 2 shared CPU cores (lalic-s, torch backend, 1 thread): compress costs about 2.4 us and
decompress about 0.9 us per pixel from 256x256 to 2048x2048 (linear within 10 %), plus about
30 ms per image.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

EWMA_WEIGHT = 0.2
"""Step of the moving average: a new timing moves the estimate 20 % of the way towards it."""
MIN_PER_PIXEL_S = 1e-12
"""Floor of the per-pixel time (a job is never free)."""
MIN_FIXED_S = 1e-5
"""Floor of the overhead per image (a parameter at zero could never grow again)."""
MIN_PIXEL_SHARE = 0.5
"""At calibration, the larger image spends at least this share of its time on its pixels (measured:
about 90 % at 384x384 for both operations on CPU); a flatter line means the small image's timing was
disturbed (a busy machine), and the slope is raised to this floor."""
MAX_RATIO = 10.0
"""One timing moves the estimate by at most this factor's worth (measured / predicted is clamped)."""


@dataclass
class _Line:
    """``fixed + per_pixel * pixels`` seconds per image."""

    fixed: float
    per_pixel: float


class CostModel:
    """Estimated seconds per job, per operation; thread-safe (the worker observes, requests estimate)."""

    def __init__(self, weight: float = EWMA_WEIGHT) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"the EWMA weight must be in (0, 1], got {weight}")
        self._weight = weight
        self._lines: dict[str, _Line] = {}
        self._lock = threading.Lock()

    @property
    def operations(self) -> tuple[str, ...]:
        """Operations calibrated so far."""
        with self._lock:
            return tuple(self._lines)

    def calibrate(self, operation: str, small: tuple[int, float], large: tuple[int, float]) -> None:
        """Fit the line through two timed single images ``(padded pixels, seconds)``, its slope at
        least :data:`MIN_PIXEL_SHARE` of the larger image's time per pixel.

        Raises:
            ValueError: the two sizes are equal or not ordered.
        """
        (p0, t0), (p1, t1) = small, large
        if not 0 < p0 < p1:
            raise ValueError(f"calibration needs two increasing sizes, got {p0} and {p1}")
        per_pixel = max((t1 - t0) / (p1 - p0), MIN_PIXEL_SHARE * t1 / p1, MIN_PER_PIXEL_S)
        fixed = max(t0 - per_pixel * p0, MIN_FIXED_S)
        with self._lock:
            self._lines[operation] = _Line(fixed, per_pixel)

    def parameters(self, operation: str) -> tuple[float, float]:
        """``(fixed seconds per image, seconds per pixel)`` of ``operation``.

        Raises:
            KeyError: ``operation`` was never calibrated.
        """
        with self._lock:
            line = self._lines[operation]
            return line.fixed, line.per_pixel

    def estimate(self, operation: str, pixels: int, images: int = 1) -> float:
        """Seconds to run ``images`` images of ``pixels`` padded pixels each (KeyError if uncalibrated)."""
        fixed, per_pixel = self.parameters(operation)
        return images * (fixed + per_pixel * pixels)

    def observe(self, operation: str, pixels: int, images: int, seconds: float) -> None:
        """Move the estimate of ``operation`` towards a finished batch's measured ``seconds``.

        Ignored for an uncalibrated operation, an empty batch or a non-positive time.
        """
        if images < 1 or pixels < 1 or not seconds > 0 or not math.isfinite(seconds):
            return
        with self._lock:
            line = self._lines.get(operation)
            if line is None:
                return
            pixel_part = line.per_pixel * pixels
            predicted = line.fixed + pixel_part
            error = min(max(seconds / images / predicted, 1.0 / MAX_RATIO), MAX_RATIO) - 1.0
            share = pixel_part / predicted
            line.per_pixel = max(line.per_pixel * (1.0 + self._weight * share * error), MIN_PER_PIXEL_S)
            line.fixed = max(line.fixed * (1.0 + self._weight * (1.0 - share) * error), MIN_FIXED_S)

    def largest_pixels(self, operation: str, seconds: float) -> int:
        """The most padded pixels one image may have to run within ``seconds`` (0 if none fits)."""
        fixed, per_pixel = self.parameters(operation)
        if seconds <= fixed:
            return 0
        return int((seconds - fixed) / per_pixel)
