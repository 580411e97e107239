"""API keys, CORS and request ids, in-process (keys are checked before the model is needed)."""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from service.app import create_app
from service.auth import ApiKeys, bearer_token, needs_key
from service.cli import add_serve_arguments, run_serve
from service.settings import Settings
from tests.service.helpers import REPO

pytestmark = pytest.mark.anyio

KEY_A = "alpha-key-0123456789"
KEY_B = "bravo-key-abcdefghij"
ORIGIN = "https://viewer.example"
PNG = {"content-type": "image/png"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


Factory = Callable[..., Any]


@pytest.fixture
async def make_client() -> AsyncIterator[Factory]:
    """Build apps from settings (lifespan not run: no model loads) and clients for them."""
    clients: list[httpx.AsyncClient] = []

    def factory(**settings: Any) -> httpx.AsyncClient:
        app = create_app(Settings(random_weights=True, device="cpu", **settings))
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        client = httpx.AsyncClient(transport=transport, base_url="http://test")
        client.app = app  # type: ignore[attr-defined]
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.aclose()


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def assert_refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json() == {
        "error": code,
        "detail": response.json()["detail"],
        "request_id": response.headers["x-request-id"],
    }
    assert response.headers["www-authenticate"].startswith('Bearer realm="lalic"')
    assert KEY_A not in response.text and KEY_B not in response.text


async def test_without_keys_everything_is_open(make_client: Factory) -> None:
    http = make_client()
    response = await http.post("/compress?quality=3", content=b"x", headers=PNG)
    assert response.status_code == 503  # not ready: no model loaded here, but not refused
    assert "www-authenticate" not in response.headers


async def test_missing_malformed_and_wrong_keys(make_client: Factory) -> None:
    http = make_client(api_keys=f"{KEY_A},{KEY_B}")
    malformed = [
        {},
        {"authorization": ""},
        {"authorization": "Bearer"},
        {"authorization": "Bearer "},
        {"authorization": f"Basic {KEY_A}"},
        {"authorization": f"Bearer {KEY_A} extra"},
        {"authorization": KEY_A},
    ]
    for headers in malformed:
        assert_refused(
            await http.post("/compress?quality=3", content=b"x", headers={**PNG, **headers}),
            401,
            "unauthorized",
        )
    for wrong in (KEY_A[:-1], KEY_A + "x", KEY_A.upper(), "x" * 16):
        response = await http.post("/decompress", content=b"x", headers=bearer(wrong))
        assert_refused(response, 403, "forbidden")
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
    for key in (KEY_A, KEY_B):
        response = await http.post("/compress?quality=3", content=b"x", headers={**PNG, **bearer(key)})
        assert response.status_code == 503 and response.json()["error"] == "not_ready"
        scheme_case = await http.get("/v1/models", headers={"authorization": f"bearer  {key}"})
        assert scheme_case.status_code == 503
    assert_refused(await http.get("/nope"), 401, "unauthorized")  # unknown paths reveal nothing either
    metrics = (await http.get("/metrics")).text
    assert (
        'lalic_errors_total{code="unauthorized"}' in metrics
        and 'lalic_errors_total{code="forbidden"}' in metrics
    )


async def test_ops_and_docs_are_open_unless_protected(make_client: Factory) -> None:
    open_ops = make_client(api_keys=KEY_A)
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        assert (await open_ops.get(path)).status_code in (200, 503), path
    closed = make_client(api_keys=KEY_A, auth_protect_ops=True)
    for path in ("/healthz", "/readyz", "/metrics"):
        assert_refused(await closed.get(path), 401, "unauthorized")
        assert (await closed.get(path, headers=bearer(KEY_A))).status_code in (200, 503)
    assert (await closed.get("/openapi.json")).status_code == 200
    assert needs_key("/compress", False) and needs_key("/metrics", True) and not needs_key("/metrics/", False)


async def test_keys_file(make_client: Factory, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# service keys\n\n{KEY_B}  # the viewer\n  {KEY_A}\n")
    http = make_client(api_keys_file=str(keys))
    for key in (KEY_A, KEY_B):
        assert (await http.get("/v1/models", headers=bearer(key))).status_code == 503
    assert_refused(await http.get("/v1/models", headers=bearer("#the-viewer-comment")), 403, "forbidden")
    bad = tmp_path / "bad"
    bad.write_text("short\n")
    with pytest.raises(ValueError, match="bad:1") as error:
        create_app(Settings(random_weights=True, api_keys_file=str(bad)))
    assert "short" not in str(error.value)
    with pytest.raises(ValueError, match="cannot read"):
        create_app(Settings(random_weights=True, api_keys_file=str(tmp_path / "missing")))
    refused = subprocess.run(
        [sys.executable, "-m", "service", "--random-weights", "--api-keys-file", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={name: value for name, value in os.environ.items() if not name.startswith("LALIC_")},
    )
    assert refused.returncode == 2 and "cannot read api_keys_file" in refused.stderr  # refuses to start open


def test_key_settings_are_validated_and_never_shown() -> None:
    settings = Settings(api_keys=f"{KEY_A}, {KEY_B}")
    assert settings.load_api_keys() == (KEY_A, KEY_B)
    assert KEY_A not in repr(settings) and KEY_A not in str(settings.model_dump())
    for bad in ("too-short", "has space in it 123", "comma,in,it,0123456789"):
        with pytest.raises(ValidationError):
            Settings(api_keys=[bad])


def test_invalid_keys_are_not_echoed(capsys: pytest.CaptureFixture[str]) -> None:
    args = add_serve_arguments(argparse.ArgumentParser()).parse_args(["--api-keys", "short-secret-x,"])
    assert run_serve(args) == 2  # refused before anything starts
    err = capsys.readouterr().err
    assert "api_keys" in err and "16..256" in err and "short-secret-x" not in err


def test_key_comparison() -> None:
    keys = ApiKeys([KEY_A, KEY_B])
    assert keys.matches(KEY_A) and keys.matches(KEY_B) and len(keys) == 2
    assert not keys.matches(KEY_A[:-1]) and not keys.matches("") and not keys.matches("\udcff")
    assert hashlib.sha256(KEY_A.encode()).digest() in keys._digests  # only digests are kept
    assert bearer_token(b"Bearer abc") == "abc" and bearer_token(b"BEARER  abc ") == "abc"
    for value in (None, b"Bearer", b"Token abc", b"Bearer a b", b"Bearer \xff\xfe", b"Bearer a\tb"):
        assert bearer_token(value) is None


async def test_openapi_declares_the_keys(make_client: Factory) -> None:
    http = make_client(api_keys=KEY_A)
    schema = (await http.get("/openapi.json")).json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    compress = schema["paths"]["/compress"]["post"]
    assert compress["security"] == [{"bearer": []}] and {"401", "403"} <= set(compress["responses"])
    assert "security" not in schema["paths"]["/healthz"]["get"]
    open_schema = (await make_client().get("/openapi.json")).json()
    assert "securitySchemes" not in open_schema.get("components", {})


async def test_cors_is_off_unless_configured(make_client: Factory) -> None:
    preflight = {
        "origin": ORIGIN,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    off = make_client()
    assert "access-control-allow-origin" not in (await off.options("/compress", headers=preflight)).headers
    assert (
        "access-control-allow-origin" not in (await off.get("/healthz", headers={"origin": ORIGIN})).headers
    )

    on = make_client(cors_origins=ORIGIN, api_keys=KEY_A)
    response = await on.options("/compress", headers=preflight)  # no key on a preflight
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in response.headers["access-control-allow-headers"].lower()
    refused = await on.post("/compress?quality=3", content=b"x", headers={**PNG, "origin": ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
    exposed = refused.headers["access-control-expose-headers"].lower()
    assert "x-request-id" in exposed and "x-lalic-bpp" in exposed
    other = await on.options("/compress", headers={**preflight, "origin": "https://evil.example"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


async def test_request_ids(make_client: Factory) -> None:
    http = make_client(api_keys=KEY_A)
    given = await http.get("/healthz", headers={"x-request-id": "abc-123.def:4"})
    assert given.headers["x-request-id"] == "abc-123.def:4"
    for insane in ("x" * 129, "two words", "<script>", ""):
        response = await http.get("/healthz", headers={"x-request-id": insane})
        assert response.headers["x-request-id"] != insane and len(response.headers["x-request-id"]) == 32
    refused = await http.get("/v1/models", headers={"x-request-id": "refused-1"})
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "refused-1"
    assert refused.json()["request_id"] == "refused-1"  # error bodies carry the id too
    loading = await http.get("/readyz", headers={"x-request-id": "ready-1"})
    assert loading.status_code == 503 and loading.json()["request_id"] == "ready-1"
    unready = await http.post("/compress?quality=3", content=b"x", headers={**PNG, **bearer(KEY_A)})
    assert unready.status_code == 503 and unready.json()["request_id"] == unready.headers["x-request-id"]
    app: FastAPI = http.app  # type: ignore[attr-defined]

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("bug")

    crashed = await http.get("/boom", headers={**bearer(KEY_A), "x-request-id": "crash-1"})
    assert crashed.status_code == 500 and crashed.headers["x-request-id"] == "crash-1"
    assert crashed.json() == {
        "error": "internal_error",
        "detail": "internal server error",
        "request_id": "crash-1",
    }
