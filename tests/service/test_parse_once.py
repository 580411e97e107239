"""``/decompress`` parses a container once: the request thread unpacks it (header and both CRCs)
and checks it against the model, and the worker decodes that parsed container."""

from __future__ import annotations

import time

import pytest
from starlette.testclient import TestClient

import model.bitstream
from service.app import create_app
from service.settings import Settings
from tests.service.helpers import TEST_BACKEND, encode, test_image


def test_decompress_parses_the_container_once(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(
        random_weights=True, device="cpu", backend=TEST_BACKEND, qualities=(3.0,), torch_threads=1
    )
    with TestClient(create_app(settings)) as client:  # runs the lifespan: the model loads
        deadline = time.monotonic() + 300
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the model did not become ready"
            time.sleep(0.2)
        compressed = client.post(
            "/compress?quality=3", content=encode(test_image(40, 56)), headers={"content-type": "image/png"}
        )
        assert compressed.status_code == 200, compressed.text
        parses = []
        parse_header = model.bitstream._parse_header

        def counting(*args: object, **kwargs: object) -> object:
            parses.append(args[0])
            return parse_header(*args, **kwargs)

        monkeypatch.setattr(model.bitstream, "_parse_header", counting)
        decoded = client.post(
            "/decompress", content=compressed.content, headers={"content-type": "application/x-lalic"}
        )
        assert decoded.status_code == 200, decoded.text
        assert decoded.headers["X-Lalic-Width"] == "56"
        assert len(parses) == 1  # read_header + unpack + unpack again before issue 41: 3
