"""Fixtures for the service tests: the shared server and the reference codec."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service.helpers import MAIN_SERVER_SETTINGS, TEST_BACKEND, Server, ready_server


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def main_server(server_logs: Path) -> Iterator[Server]:
    """The shared server: all qualities, a long batch delay so that concurrent requests batch."""
    with ready_server(server_logs, **MAIN_SERVER_SETTINGS) as server:
        yield server


@pytest.fixture(scope="session")
def codec() -> Any:
    """The reference codec: the same random weights (seed 0) as the servers, called directly."""
    import torch

    from model.codec import Codec

    torch.set_num_threads(1)  # as in the test servers
    return Codec.random(config="lalic-s", seed=0, device="cpu", backend=TEST_BACKEND)
