"""The service's default precision (``auto``): bfloat16 g_s and g_a where this CPU computes bfloat16
natively, float32 elsewhere, and the server really runs what it resolved."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from model.stages import AUTO_PRECISION, native_bfloat16
from tests.service.helpers import LALIC, PNG, encode, ready_server, test_image


def test_the_default_precision_follows_the_cpu(server_logs: Path, codec: Any) -> None:
    from model.codec import Codec

    expected = "bfloat16" if native_bfloat16() else "float32"
    image = test_image(64, 96)
    stream = codec.compress(image, 3)  # float32 g_a: the stream of the reference codec
    with ready_server(
        server_logs, qualities="3", synthesis_precision=AUTO_PRECISION, analysis_precision=AUTO_PRECISION
    ) as server:
        assert f"g_s in {expected}, g_a in {expected}" in server.log()
        fast = Codec(
            codec.net, backend=codec.backend, synthesis_precision=expected, analysis_precision=expected
        )
        compressed = httpx.post(
            f"{server.url}/compress?quality=3", content=encode(image), headers=PNG, timeout=60
        )
        assert compressed.status_code == 200 and compressed.content == fast.compress(image, 3)
        decoded = httpx.post(f"{server.url}/decompress", content=stream, headers=LALIC, timeout=60)
        assert decoded.status_code == 200, decoded.text
        pixels = np.asarray(Image.open(io.BytesIO(decoded.content)))
        assert np.array_equal(pixels, fast.decompress(stream))


def test_exact_analysis_is_served(server_logs: Path, codec: Any) -> None:
    """LALIC_ANALYSIS_PRECISION=exact (here on the torchscript backend): /compress returns the bytes
    of an eager-torch codec with exact analysis, which differ from its float32 bytes for this image
    (every backend writing the same bytes is tests/model/test_portable_streams.py's)."""
    from model.codec import Codec

    image = test_image(256, 256)  # smaller images give the same streams with these random weights
    exact = Codec(codec.net, backend="torch", analysis_precision="exact").compress(image, 6)
    assert exact != codec.compress(image, 6)
    settings = {"qualities": "6", "backend": "torchscript", "analysis_precision": "exact"}
    with ready_server(server_logs, **settings) as server:
        assert "g_a in exact" in server.log()
        compressed = httpx.post(
            f"{server.url}/compress?quality=6", content=encode(image), headers=PNG, timeout=60
        )
        assert compressed.status_code == 200 and compressed.content == exact
