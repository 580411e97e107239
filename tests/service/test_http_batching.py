"""Concurrent requests succeed, run in batches, and give the same bytes as requests served alone."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import numpy as np

from tests.service.helpers import LALIC, PNG, Server, decode, encode, test_image

CONCURRENCY = 16


async def post_all(url: str, path: str, bodies: list[bytes], headers: dict[str, str]) -> list[httpx.Response]:
    """POST every body at once (one connection each)."""
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        return list(
            await asyncio.gather(*(http.post(path, content=body, headers=headers) for body in bodies))
        )


def batch_counts(server: Server, operation: str) -> tuple[float, float]:
    """(batches run, batches of a single job) for ``operation``, from /metrics."""
    samples = server.metrics()
    labels = (("operation", operation),)
    total = samples.get(("lalic_batch_size_count", labels), 0.0)
    singles = samples.get(("lalic_batch_size_bucket", tuple(sorted((*labels, ("le", "1.0"))))), 0.0)
    return total, singles


def test_concurrent_requests_batch_and_match_solo_results(main_server: Server, codec: Any) -> None:
    images = [test_image(64, 96, seed=100 + i) for i in range(CONCURRENCY)]
    pngs = [encode(image) for image in images]

    before = batch_counts(main_server, "compress")
    compressed = asyncio.run(post_all(main_server.url, "/compress?quality=3", pngs, PNG))
    after = batch_counts(main_server, "compress")
    assert [r.status_code for r in compressed] == [200] * CONCURRENCY
    batches, singles = after[0] - before[0], after[1] - before[1]
    assert batches < CONCURRENCY and batches > singles, "no batch of more than one job ran"

    streams = [r.content for r in compressed]
    assert streams == [codec.compress(image, 3.0) for image in images]  # each compressed alone
    with main_server.client() as http:  # the server alone gives the same bytes too
        assert [http.post("/compress?quality=3", content=pngs[i], headers=PNG).content for i in (0, 15)] == [
            streams[0],
            streams[15],
        ]

    before = batch_counts(main_server, "decompress")
    restored = asyncio.run(post_all(main_server.url, "/decompress", streams, LALIC))
    after = batch_counts(main_server, "decompress")
    assert [r.status_code for r in restored] == [200] * CONCURRENCY
    assert after[0] - before[0] > after[1] - before[1], "no decompress batch of more than one job ran"
    with main_server.client() as http:
        solo_images = [
            decode(http.post("/decompress", content=s, headers=LALIC).content) for s in streams[:2]
        ]
    for response, solo_image in zip(restored[:2], solo_images, strict=True):
        # Batched synthesis may round a few pixels differently (by one level) from a batch of one.
        difference = np.abs(decode(response.content).astype(int) - solo_image.astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01


def test_mixed_qualities_and_shapes_are_not_batched_together(main_server: Server, codec: Any) -> None:
    jobs = [(test_image(40 + 20 * (i % 2), 64, seed=i), 2.0 + (i % 3)) for i in range(6)]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=main_server.url, timeout=120) as http:
            return list(
                await asyncio.gather(
                    *(
                        http.post(f"/compress?quality={q}", content=encode(img), headers=PNG)
                        for img, q in jobs
                    )
                )
            )

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * len(jobs)
    for (image, quality), response in zip(jobs, responses, strict=True):
        assert response.content == codec.compress(image, quality)
