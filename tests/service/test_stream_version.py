"""The service writes the container version its settings name (portable version 2 by default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.service.helpers import LALIC, PNG, Server, encode, ready_server, test_image


def test_a_rolling_upgrade_can_keep_writing_version_1(
    server_logs: Path, main_server: Server, codec: Any
) -> None:
    """``LALIC_STREAM_VERSION=1`` writes float32-path streams; the default server writes version 2,
    and each server decodes the other's streams (both versions are read)."""
    image = test_image(48, 80)
    png = encode(image)
    with ready_server(server_logs, stream_version=1, qualities="3") as old:
        v1 = httpx.post(f"{old.url}/compress?quality=3", content=png, headers=PNG, timeout=60)
        assert v1.status_code == 200 and v1.content[4] == 1
        v2 = httpx.post(f"{main_server.url}/compress?quality=3", content=png, headers=PNG, timeout=60)
        assert v2.status_code == 200 and v2.content[4] == 2
        assert v1.content == codec_stream(codec, image, 1) and v2.content == codec.compress(image, 3)
        for url, stream in ((main_server.url, v1.content), (old.url, v2.content)):
            decoded = httpx.post(f"{url}/decompress", content=stream, headers=LALIC, timeout=60)
            assert decoded.status_code == 200, decoded.text


def codec_stream(codec: Any, image: Any, version: int) -> bytes:
    """What the reference codec's network writes in container ``version``."""
    from model.codec import Codec

    return Codec(codec.net, backend=codec.backend, stream_version=version).compress(image, 3)
