"""The cost model, admission control (413 / 503 at once) and Retry-After, on real service objects.

The runtime here is the service's own (settings, engine, worker, cost model), with the cost model
calibrated by hand instead of by a warm-up and the worker never started, so every number is exact.
"""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from service.cost import CostModel
from service.engine import COMPRESS, DECOMPRESS, BatchKey
from service.errors import ServiceError, retry_after
from service.runtime import Runtime
from service.settings import Settings
from service.worker import Job

FIXED_S = 0.5
PER_PIXEL_S = 0.5e-6
TIMEOUT_S = 10.0
MEGA = BatchKey(COMPRESS, 3.0, 1024, 1024)
"""A 1024x1024 compress: 0.5 + 0.5e-6 * 1048576 = 1.024288 s."""
MEGA_S = FIXED_S + PER_PIXEL_S * 1024 * 1024
SMALL = BatchKey(COMPRESS, 3.0, 64, 64)
"""A 64x64 compress: 0.502048 s."""
BIG = BatchKey(COMPRESS, 3.0, 4096, 4096)
"""A 4096x4096 compress: 0.5 + 0.5e-6 * 16.8 M = 8.9 s; jobs up to a quarter of that run inside it."""


LARGE = 2048 * 2048


def calibrated() -> CostModel:
    model = CostModel()
    for operation in (COMPRESS, DECOMPRESS):
        model.calibrate(
            operation, (4096, FIXED_S + PER_PIXEL_S * 4096), (LARGE, FIXED_S + PER_PIXEL_S * LARGE)
        )
    return model


def test_calibration_fits_the_line_through_two_sizes() -> None:
    model = calibrated()
    fixed, per_pixel = model.parameters(COMPRESS)
    assert fixed == pytest.approx(FIXED_S) and per_pixel == pytest.approx(PER_PIXEL_S)
    assert model.estimate(COMPRESS, 1024 * 1024) == pytest.approx(MEGA_S)
    assert model.estimate(COMPRESS, 1024 * 1024, images=3) == pytest.approx(3 * MEGA_S)
    assert model.largest_pixels(COMPRESS, MEGA_S) == pytest.approx(1024 * 1024, abs=1)
    assert model.largest_pixels(COMPRESS, FIXED_S / 2) == 0
    # A disturbed small timing (as slow as the large one) cannot flatten the line below half the
    # large image's time per pixel.
    model.calibrate(DECOMPRESS, (4096, 2.0), (LARGE, 2.0))
    assert model.parameters(DECOMPRESS) == pytest.approx((2.0 - 1.0 * 4096 / LARGE, 1.0 / LARGE))
    with pytest.raises(ValueError, match="two increasing sizes"):
        model.calibrate(COMPRESS, (4096, 0.1), (4096, 0.2))
    with pytest.raises(KeyError):
        CostModel().estimate(COMPRESS, 4096)
    assert set(model.operations) == {COMPRESS, DECOMPRESS}


def test_live_timings_move_the_part_of_the_estimate_they_measure() -> None:
    model = calibrated()
    model.observe(COMPRESS, 1024 * 1024, 1, MEGA_S)  # as predicted: nothing moves
    assert model.parameters(COMPRESS) == pytest.approx((FIXED_S, PER_PIXEL_S))

    # A large image twice as slow as predicted: the per-pixel time takes most of the 20 % step.
    pixels = 16 * 1024 * 1024
    predicted = FIXED_S + PER_PIXEL_S * pixels
    share = PER_PIXEL_S * pixels / predicted
    model.observe(COMPRESS, pixels, 2, 2 * 2 * predicted)  # two images, each twice as slow
    fixed, per_pixel = model.parameters(COMPRESS)
    assert per_pixel == pytest.approx(PER_PIXEL_S * (1 + 0.2 * share))
    assert fixed == pytest.approx(FIXED_S * (1 + 0.2 * (1 - share)))

    # A tiny image that stalls for 100x its estimate barely moves the per-pixel time (clamped at 10x).
    model = calibrated()
    model.observe(DECOMPRESS, 4096, 1, 100 * (FIXED_S + PER_PIXEL_S * 4096))
    fixed, per_pixel = model.parameters(DECOMPRESS)
    tiny_share = PER_PIXEL_S * 4096 / (FIXED_S + PER_PIXEL_S * 4096)
    assert per_pixel == pytest.approx(PER_PIXEL_S * (1 + 0.2 * tiny_share * 9))
    assert per_pixel < 1.02 * PER_PIXEL_S and fixed == pytest.approx(
        FIXED_S * (1 + 0.2 * (1 - tiny_share) * 9)
    )

    # Faster than predicted moves it down; nonsense is ignored.
    before = model.parameters(COMPRESS)
    for pixels, images, seconds in ((4096, 0, 1.0), (0, 1, 1.0), (4096, 1, 0.0), (4096, 1, math.nan)):
        model.observe(COMPRESS, pixels, images, seconds)
    model.observe("no-such-operation", 4096, 1, 1.0)
    assert model.parameters(COMPRESS) == before
    model.observe(COMPRESS, pixels=16 * 1024 * 1024, images=1, seconds=0.1)
    assert model.parameters(COMPRESS)[1] < before[1]


@pytest.mark.parametrize(
    ("seconds", "header"), [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.01, "2"), (29.5, "30"), (math.inf, "1")]
)
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(seconds: float, header: str) -> None:
    assert retry_after(seconds) == header


def runtime(**overrides: object) -> Runtime:
    values: dict[str, object] = {
        "random_weights": True,
        "device": "cpu",
        "qualities": "3",
        "request_timeout_s": TIMEOUT_S,
        "queue_size": 64,
        "max_batch_size": 1,
        **overrides,
    }
    settings = Settings(**values)  # type: ignore[arg-type]
    created = Runtime.create(settings)  # the worker is never started: queued jobs stay queued
    created.engine.costs = calibrated()
    return created


def queue(rt: Runtime, key: BatchKey, count: int) -> None:
    for _ in range(count):
        rt.worker.submit(
            Job(key=key, payload=None, deadline=time.monotonic() + 60, cost=rt.engine.estimate(key))
        )


def refusal(rt: Runtime, key: BatchKey, size: int, seconds_left: float = TIMEOUT_S) -> ServiceError:
    with pytest.raises(ServiceError) as refused:
        rt.admit(key, size, size, time.monotonic() + seconds_left)
    return refused.value


def test_an_image_that_cannot_be_coded_within_the_request_timeout_is_413_with_the_largest_size() -> None:
    rt = runtime()
    assert rt.admit(BIG, 4096, 4096, time.monotonic() + TIMEOUT_S) == pytest.approx(
        FIXED_S + PER_PIXEL_S * 4096 * 4096
    )
    huge = BatchKey(COMPRESS, 3.0, 6016, 6016)  # 18.6 s
    error = refusal(rt, huge, 6000)
    assert (error.status, error.code.value) == (413, "too_many_pixels")
    # largest: (10 - 0.5) / 0.5e-6 = 19 000 000 padded pixels, e.g. 4352x4352 (a multiple of 64)
    assert error.detail == (
        "compressing 6000x6000 would take about 18.6 s here, more than the 10 s request timeout "
        "allows; the largest image this deployment serves for compress is about 19.00 megapixels "
        "(e.g. 4352x4352)"
    )
    capped = refusal(runtime(max_pixels=4_000_000), huge, 6000)
    assert capped.detail.endswith("about 4.00 megapixels (e.g. 1984x1984)")
    decoding = refusal(rt, BatchKey(DECOMPRESS, 3.0, 6016, 6016), 6000)
    assert decoding.status == 413 and decoding.detail.startswith("decompressing to 6000x6000 would take")
    cautious = refusal(runtime(admission_factor=2.0), BIG, 4096)
    assert (
        cautious.status == 413 and "9.00 megapixels (e.g. 2944x2944)" in cautious.detail
    )  # (5 - 0.5) / 0.5e-6


def test_a_job_that_cannot_meet_its_deadline_behind_the_queue_is_503_at_once() -> None:
    rt = runtime()
    queue(rt, MEGA, 9)  # 9.22 s queued; one more (1.02 s) needs 10.24 s > 10 s
    assert rt.worker.backlog_s(MEGA_S) == pytest.approx(9 * MEGA_S)
    error = refusal(rt, MEGA, 1000)
    assert (error.status, error.code.value) == (503, "deadline_exceeded")
    assert error.detail.startswith(
        "compressing 1000x1000 takes about 1.0 s behind about 9.2 s of queued work"
    )
    # a fresh request fits once 9.22 s - (10 s - 1.02 s) = 0.24 s of the queue drained: 1 s
    assert error.headers == {"Retry-After": "1"}
    queue(rt, MEGA, 3)  # 12.29 s queued: 12.29 - 8.98 = 3.32 s to wait
    assert refusal(rt, MEGA, 1000).headers == {"Retry-After": "4"}
    # a request that already spent 9.5 s of its deadline reading its body does not fit either
    assert refusal(runtime(), MEGA, 1000, seconds_left=0.5).headers == {"Retry-After": "1"}


def test_small_jobs_are_admitted_behind_a_large_one_they_will_run_inside() -> None:
    rt = runtime()
    queue(rt, BIG, 1)
    assert rt.worker.backlog_s(MEGA_S) == 0  # runs inside the big one
    assert rt.worker.backlog_s(3.0) == pytest.approx(FIXED_S + PER_PIXEL_S * 4096**2)  # over a quarter
    assert rt.admit(SMALL, 64, 64, time.monotonic() + TIMEOUT_S) == pytest.approx(
        FIXED_S + PER_PIXEL_S * 4096
    )
    queue(rt, SMALL, 19)  # 19 x 0.502 = 9.54 s of small work ahead
    error = refusal(rt, SMALL, 64)
    assert error.status == 503 and error.headers == {"Retry-After": "1"}


def test_admission_factor_zero_turns_admission_off() -> None:
    rt = runtime(admission_factor=0)
    queue(rt, MEGA, 20)
    huge = BatchKey(COMPRESS, 3.0, 8192, 8192)
    assert rt.admit(huge, 8192, 8192, time.monotonic() + 1) == pytest.approx(FIXED_S + PER_PIXEL_S * 8192**2)


def test_a_full_queue_says_when_it_will_have_drained() -> None:
    rt = runtime(queue_size=2)
    queue(rt, SMALL, 3)  # one forms the next batch, two wait: full
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    with pytest.raises(ServiceError) as refused:
        asyncio.run(rt.run(SMALL, image, time.monotonic() + TIMEOUT_S, 64, 64))
    assert (refused.value.status, refused.value.code.value) == (503, "queue_full")
    assert refused.value.headers == {"Retry-After": "2"}  # 3 x 0.502 s queued
    drain = rt.metrics.registry.get_sample_value("lalic_queue_drain_seconds")
    assert drain == pytest.approx(3 * (FIXED_S + PER_PIXEL_S * 4096))


def test_the_overload_metrics_are_exposed_from_the_start() -> None:
    """What the alerts compare: the drain time against the deadline; abandoned jobs at 0 before any, so
    that rate() sees the first one; the cost model's parameters per operation."""
    rt = runtime()
    sample = rt.metrics.registry.get_sample_value
    assert sample("lalic_request_timeout_seconds") == TIMEOUT_S
    assert sample("lalic_queue_drain_seconds") == 0
    for operation in (COMPRESS, DECOMPRESS):
        assert sample("lalic_jobs_abandoned_total", {"operation": operation}) == 0
        assert sample("lalic_cost_fixed_seconds", {"operation": operation}) == pytest.approx(FIXED_S)
        per_megapixel = sample("lalic_cost_seconds_per_megapixel", {"operation": operation})
        assert per_megapixel == pytest.approx(PER_PIXEL_S * 1e6)
    queue(rt, MEGA, 2)
    assert sample("lalic_queue_drain_seconds") == pytest.approx(2 * MEGA_S)
