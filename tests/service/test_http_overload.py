"""A server with a one-slot queue and a short deadline sheds load with 503 + Retry-After.

Admission control is off here (``admission_factor=0``): this is about the queue bound and deadlines
passing while queued or running; tests/service/test_http_deadlines.py covers refusing at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.service.helpers import PNG, Server, encode, ready_server, test_image

DEADLINE_S = 1.0
FLOOD = 8
SIDE = 1536
"""A flat SIDE x SIDE PNG: a few KB that decode in milliseconds, whose compression takes well over
DEADLINE_S (about 6x a 768x512 image), so every request reaches the queue while the first runs."""


@pytest.fixture(scope="module")
def overloaded(server_logs: Path) -> Iterator[Server]:
    with ready_server(
        server_logs,
        qualities="3",
        queue_size=1,
        max_batch_size=1,
        max_batch_delay_ms=0,
        request_timeout_s=DEADLINE_S,
        admission_factor=0,
    ) as server:
        yield server


def flood(server: Server, body: bytes) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=FLOOD)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
            requests = (http.post("/compress?quality=3", content=body, headers=PNG) for _ in range(FLOOD))
            return list(await asyncio.gather(*requests))

    return asyncio.run(run())


def test_full_queue_and_missed_deadlines_are_503_with_retry_after(overloaded: Server) -> None:
    # A 0.25 s deadline with a 640x640 image once let all eight requests expire while their PNGs
    # were still being decoded on a busy machine, before any reached the queue.
    responses = flood(overloaded, encode(np.full((SIDE, SIDE, 3), 128, dtype=np.uint8)))
    codes = [r.json()["error"] if r.status_code != 200 else "ok" for r in responses]
    assert "queue_full" in codes and "deadline_exceeded" in codes, codes
    for response in responses:
        if response.status_code != 200:
            assert response.status_code == 503
            assert int(response.headers["retry-after"]) >= 1
    # Only the first job ran: the one queued behind it expired while it ran, and was dropped.
    samples = overloaded.metrics()
    assert samples[("lalic_batch_size_count", (("operation", "compress"),))] == 1


def test_the_server_recovers_after_the_flood(overloaded: Server) -> None:
    body = encode(test_image(32, 32))
    deadline = time.monotonic() + 60
    with overloaded.client() as http:
        while (response := http.post("/compress?quality=3", content=body, headers=PNG)).status_code == 503:
            assert time.monotonic() < deadline, "still refusing requests a minute after the flood"
            time.sleep(0.2)  # the worker may still be finishing the flood's running job
    assert response.status_code == 200, response.text
