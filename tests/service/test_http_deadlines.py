"""One request must never take the service down (issue 36, hole 1), through real servers.

Work that cannot finish in time is never started: the cost model refuses it at once (413, or 503
with a Retry-After from the queue's estimated drain time). Work past its deadline stops at the
codec's next checkpoint (between stages and tiles), and small requests are served between the stages
of a large one instead of waiting for all of it. Image sizes follow the server's own cost model
(read from /metrics), so the tests hold on fast and slow machines alike.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import (
    PNG,
    Server,
    assert_error,
    encode,
    grey_png,
    jpeg_declaring,
    ready_server,
    test_image,
)

ISSUE_SIDE = 6000
"""The issue's 36 MP grey PNG (117 KB) and 632-byte JPEG claiming the same size."""
ADMISSION_TIMEOUT_S = 15.0
"""Short enough that the issue's 36 MP image costs over twice as much on our machines (about 36 s
with the fused BiWKV kernel of g_a, 2026-12-07; the test checks it)."""
ABANDON_TIMEOUT_S = 10.0
TILED = (64, 200_000)
"""(height, width) of a grey image above model.tiling.MAX_TILE_PIXELS (12.8 MP) coded as 98 tiles of
64x2048: many tiles of a fraction of a second each (about 30 s in all on 2 quiet cores)."""
SMALL = encode(test_image(64, 64))


@pytest.fixture(scope="module")
def admitting(server_logs: Path) -> Iterator[Server]:
    """Default admission (factor 1) with a short deadline, and a queue of 4 that batches 8."""
    with ready_server(
        server_logs,
        qualities="3",
        request_timeout_s=ADMISSION_TIMEOUT_S,
        max_pixels=ISSUE_SIDE * ISSUE_SIDE,
        queue_size=4,
        max_batch_size=8,
        max_batch_delay_ms=200,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def abandoning(server_logs: Path) -> Iterator[Server]:
    """Admission control off, so that a job that will run past its deadline is started."""
    with ready_server(
        server_logs,
        qualities="3",
        request_timeout_s=ABANDON_TIMEOUT_S,
        admission_factor=0,
        max_batch_delay_ms=0,
        max_pixels=16_000_000,
    ) as server:
        yield server


def compress_cost_s(server: Server, pixels: int) -> float:
    """The server's current estimate for compressing one image of ``pixels`` padded pixels."""
    samples = server.metrics()
    labels = (("operation", "compress"),)
    fixed = samples[("lalic_cost_fixed_seconds", labels)]
    per_megapixel = samples[("lalic_cost_seconds_per_megapixel", labels)]
    assert per_megapixel > 0, "the cost model was not calibrated"
    return fixed + per_megapixel * pixels / 1e6


def compress_batches(server: Server) -> float:
    return server.metrics().get(("lalic_batch_size_count", (("operation", "compress"),)), 0.0)


def compress_abandoned(server: Server) -> float:
    return server.metrics()[("lalic_jobs_abandoned_total", (("operation", "compress"),))]


def timed_post(http: httpx.Client, body: bytes) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = http.post("/compress?quality=3", content=body, headers=PNG)
    return response, time.monotonic() - started


def compress_running(server: Server, body: bytes) -> tuple[threading.Thread, dict[str, httpx.Response]]:
    """Post ``body`` to /compress from a thread and return once its job runs on the worker; the
    response lands in the returned dict under ``"response"`` when the thread ends."""
    result: dict[str, httpx.Response] = {}

    def send() -> None:
        with server.client() as http:
            result["response"], _ = timed_post(http, body)

    batches = compress_batches(server)
    thread = threading.Thread(target=send)
    thread.start()
    deadline = time.monotonic() + 30
    while compress_batches(server) == batches:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    return thread, result


def test_the_issues_36_mp_images_are_413_at_once_and_never_start(admitting: Server) -> None:
    cost_s = compress_cost_s(admitting, ISSUE_SIDE * ISSUE_SIDE)
    assert cost_s > 2 * ADMISSION_TIMEOUT_S, (
        f"this machine codes 36 MP in {cost_s:.1f} s: too fast for the test"
    )
    batches = compress_batches(admitting)
    with admitting.client() as http:
        for body in (grey_png(ISSUE_SIDE, ISSUE_SIDE), jpeg_declaring(ISSUE_SIDE, ISSUE_SIDE)):
            response, elapsed = timed_post(http, body)
            error = assert_error(response, 413, "too_many_pixels")
            assert error["detail"].startswith(f"compressing {ISSUE_SIDE}x{ISSUE_SIDE} would take about ")
            assert f"more than the {ADMISSION_TIMEOUT_S:g} s request timeout allows" in error["detail"]
            assert "the largest image this deployment serves for compress is about " in error["detail"]
            assert elapsed < ADMISSION_TIMEOUT_S / 2  # at once, not after the deadline
        small, elapsed = timed_post(http, SMALL)  # the worker was never busy
        assert small.status_code == 200, small.text
        assert elapsed < ADMISSION_TIMEOUT_S
    assert compress_batches(admitting) == batches + 1  # only the small image ran


def largest_side_named(http: httpx.Client) -> int:
    """The side of the largest square image the 413 for the issue's 36 MP image says is served."""
    detail = http.post("/compress?quality=3", content=grey_png(6000, 6000), headers=PNG).json()["detail"]
    side = int(detail.rsplit("(e.g. ", 1)[1].split("x", 1)[0])
    assert side % 64 == 0
    return side


def test_the_largest_size_named_in_the_413_is_served(admitting: Server) -> None:
    with admitting.client() as http:
        side = largest_side_named(http)
        if side < 64:
            return  # nothing is admitted on this machine
        # The first large image also pays for the memory the server has not touched yet, which
        # on our VMs can cost several times the computation (the hypervisor backs each fresh
        # page on first touch): one warm-up image of the size tried, whose time also teaches the
        # cost model, then the size named now.
        warmup = http.post("/compress?quality=3", content=grey_png(side // 2, side // 2), headers=PNG)
        assert warmup.status_code in (200, 503), warmup.text
        side = largest_side_named(http)
        bigger = math.ceil(side * 1.5 / 64) * 64
        refused = http.post("/compress?quality=3", content=grey_png(bigger, bigger), headers=PNG)
        assert refused.status_code == 413, refused.text
        fitting = max(64, side // 2 // 64 * 64)  # half the side: a quarter of the time
        response = http.post("/compress?quality=3", content=grey_png(fitting, fitting), headers=PNG)
        assert response.status_code == 200, response.text


def test_a_job_that_cannot_finish_behind_the_queue_is_503_at_once_with_retry_after(admitting: Server) -> None:
    # An image estimated at 60 % of the deadline: alone it fits; behind another it cannot.
    per_megapixel_s = compress_cost_s(admitting, 1_000_000) - compress_cost_s(admitting, 0)
    side = max(64, int(math.sqrt(0.6 * ADMISSION_TIMEOUT_S / per_megapixel_s * 1e6)) // 64 * 64)
    body = grey_png(side, side)
    abandoned = compress_abandoned(admitting)
    thread, first = compress_running(admitting, body)
    with admitting.client() as http:
        second, elapsed = timed_post(http, body)
    thread.join(60)
    error = assert_error(second, 503, "deadline_exceeded")
    assert error["detail"].startswith(f"compressing {side}x{side} takes about ")
    assert elapsed < ADMISSION_TIMEOUT_S / 2  # at once
    assert 1 <= int(second.headers["retry-after"]) <= math.ceil(ADMISSION_TIMEOUT_S)
    assert first["response"].status_code in (200, 503)  # 503 only if this machine slowed down meanwhile
    if first["response"].status_code == 503:  # the worker stops at its next checkpoint: leave it idle
        deadline = time.monotonic() + 60
        while compress_abandoned(admitting) == abandoned:
            assert time.monotonic() < deadline, "the late job was never abandoned"
            time.sleep(0.05)


def test_six_simultaneous_requests_on_an_idle_server_with_a_queue_of_4_all_succeed(admitting: Server) -> None:
    async def six() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=admitting.url, timeout=60) as http:
            posts = (http.post("/compress?quality=3", content=SMALL, headers=PNG) for _ in range(6))
            return list(await asyncio.gather(*posts))

    assert [response.status_code for response in asyncio.run(six())] == [200] * 6


def test_a_late_tiled_job_is_abandoned_and_small_requests_run_between_its_tiles(abandoning: Server) -> None:
    height, width = TILED
    assert height * width > 4_194_304  # model.tiling.MAX_TILE_PIXELS: coded tile by tile
    thread, large = compress_running(abandoning, grey_png(width, height))
    with abandoning.client() as http:
        # within its own deadline, so it did not wait for the large image (several times that)
        during, _ = timed_post(http, SMALL)
        assert during.status_code == 200, during.text
        thread.join(60)
        assert_error(large["response"], 503, "deadline_exceeded")
        after, _ = timed_post(http, SMALL)  # right after the large job's deadline: the worker is free
        assert after.status_code == 200, after.text
    samples = abandoning.metrics()
    assert samples[("lalic_jobs_abandoned_total", (("operation", "compress"),))] == 1
    assert samples[("lalic_queue_drain_seconds", ())] == 0
    assert "abandoned a compress batch of 1 200000x64 job(s) past its deadline" in abandoning.log()
