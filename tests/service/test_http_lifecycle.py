"""Start-up readiness, /metrics exposition, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.service.helpers import PNG, Server, encode, start_server, test_image

METRIC_NAMES = {
    "lalic_request_duration_seconds",
    "lalic_queue_wait_seconds",
    "lalic_model_compute_seconds",
    "lalic_entropy_coding_seconds",
    "lalic_batch_size",
    "lalic_request_body_bytes",
    "lalic_response_body_bytes",
    "lalic_bits_per_pixel",
    "lalic_requests",
    "lalic_errors",
    "lalic_queue_depth",
    "lalic_in_flight_requests",
    "lalic_models_loaded",
    "lalic_queue_capacity",  # not in the spec's list; the Prometheus rules use it for saturation
}


def test_readyz_turns_green_only_after_warm_up(main_server: Server) -> None:
    assert main_server.first_readyz == 503  # seen while the model was still loading
    with main_server.client() as http:
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert http.get("/healthz").status_code == 200
    assert main_server.metrics()[("lalic_models_loaded", ())] == 6


def test_metrics_exposition(main_server: Server) -> None:
    with main_server.client() as http:
        compressed = http.post("/compress?quality=2.6", content=encode(test_image(32, 32)), headers=PNG)
        assert compressed.status_code == 200
        # a decode of its own, so the synthesis stage is present whatever ran before this test
        assert http.post("/decompress", content=compressed.content).status_code == 200
        response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    assert set(families) >= METRIC_NAMES
    assert 'le="0.15"' in response.text
    samples = {(s.name, tuple(sorted(s.labels.items()))) for f in families.values() for s in f.samples}
    assert ("lalic_request_duration_seconds_count", (("endpoint", "compress"), ("quality", "3"))) in samples
    assert ("lalic_bits_per_pixel_count", (("quality", "3"),)) in samples
    stages = {
        dict(labels)["stage"] for name, labels in samples if name == "lalic_model_compute_seconds_count"
    }
    assert stages == {"analysis", "hyper", "entropy_parameters", "synthesis"}
    coding = {
        dict(labels)["operation"] for name, labels in samples if name == "lalic_entropy_coding_seconds_count"
    }
    assert coding <= {"encode", "decode"} and "encode" in coding
    for family in families.values():  # bounded label values only
        for sample in family.samples:
            assert sample.labels.get("endpoint", "compress") in {
                "compress",
                "decompress",
                "models",
                "healthz",
                "readyz",
                "metrics",
                "other",
            }
            assert sample.labels.get("quality", "1") in {"1", "2", "3", "4", "5", "6", "none"}


def in_flight(server: Server) -> float:
    return server.metrics()[("lalic_in_flight_requests", ())] - 1  # minus the scrape itself


def test_sigterm_finishes_accepted_requests(server_logs: Path, codec: Any) -> None:
    server = start_server(server_logs, qualities="3", max_batch_size=2, max_batch_delay_ms=0)
    try:
        server.wait_ready()
        images = [test_image(128, 128, seed=200 + i) for i in range(6)]

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
                tasks = [
                    asyncio.create_task(http.post("/compress?quality=3", content=encode(img), headers=PNG))
                    for img in images
                ]
                deadline = time.monotonic() + 30
                while await asyncio.to_thread(in_flight, server) < len(images):
                    assert time.monotonic() < deadline, "requests never got in flight"
                    await asyncio.sleep(0.02)
                server.process.send_signal(signal.SIGTERM)
                return list(await asyncio.gather(*tasks))

        responses = asyncio.run(run())
        assert [r.status_code for r in responses] == [200] * len(images)
        assert [r.content for r in responses][:2] == [codec.compress(img, 3.0) for img in images[:2]]
        assert server.process.wait(60) in (0, -signal.SIGTERM)
        try:
            httpx.get(f"{server.url}/healthz", timeout=2)
            raise AssertionError("the server still accepts connections")
        except httpx.TransportError:
            pass
    finally:
        server.stop(signal.SIGKILL)
    assert "Traceback" not in server.log()
