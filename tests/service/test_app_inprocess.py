"""The app in-process, before any model is loaded: routing errors, readiness, the catch-all 500."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import anyio.to_thread
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(random_weights=True, device="cpu"))  # lifespan not run: nothing loads

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == code and isinstance(body["detail"], str)
    assert "Traceback" not in response.text


async def test_liveness_and_not_ready_yet(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert_error(ready, 503, "not_ready")
    assert ready.json()["status"] == "loading"
    compress = await client.post("/compress?quality=3", content=b"x", headers={"content-type": "image/png"})
    assert_error(compress, 503, "not_ready")
    assert int(compress.headers["retry-after"]) >= 1
    assert_error(await client.post("/decompress", content=b"LALC"), 503, "not_ready")
    assert_error(await client.get("/v1/models"), 503, "not_ready")


async def test_parameters_are_validated_before_readiness(client: httpx.AsyncClient) -> None:
    for query in ("quality=7", "quality=abc", "quality=nan", "quality=0.5", "quality=inf", ""):
        assert_error(await client.post(f"/compress?{query}", content=b""), 422, "invalid_parameter")
    assert_error(await client.post("/decompress?format=gif", content=b""), 422, "invalid_parameter")


async def test_routing_errors_are_json(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/nope"), 404, "not_found")
    assert_error(await client.get("/compress"), 405, "method_not_allowed")


async def test_bugs_become_a_generic_500(client: httpx.AsyncClient) -> None:
    response = await client.get("/boom")
    assert_error(response, 500, "internal_error")
    assert "secret" not in response.text
    metrics = (await client.get("/metrics")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    assert samples[("lalic_requests_total", (("endpoint", "other"), ("status_class", "5xx")))] == 1
    assert samples[("lalic_errors_total", (("code", "internal_error"),))] == 1


async def test_a_model_that_cannot_load_keeps_readyz_red() -> None:
    app = create_app(Settings(weights="/nonexistent/lalic-weights.pt", device="cpu", backend="torch"))
    runtime = app.state.runtime
    runtime.worker.start()
    try:
        for _ in range(600):
            if runtime.engine.state.value == "failed":
                break
            await anyio.sleep(0.05)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            ready = await http.get("/readyz")
            assert_error(ready, 503, "not_ready")
            assert ready.json()["status"] == "failed" and "lalic-weights.pt" in ready.json()["detail"]
            assert (await http.get("/healthz")).status_code == 200
    finally:
        assert await anyio.to_thread.run_sync(runtime.worker.close, 10)
