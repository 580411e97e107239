"""Fixtures for the deployment tests: external tools, free ports and real service replicas on loopback.

Every external tool (promtool, prometheus, nginx, docker-compose, hadolint, kubernetes-validate) is
installed by ``.ci/install-deploy-tools.sh``; a missing tool fails the test instead of skipping it.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.promql import REPO

INSTALL_SCRIPT = ".ci/install-deploy-tools.sh"
TOOL_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/opt/lalic-deploy-tools/bin")
SERVER_START_TIMEOUT_S = 150.0
"""Importing torch, building the random model and warming it up, on a busy two-core machine."""
# Replica settings: random weights (no trained weights needed), two quality anchors to keep warm-up
# short, eager torch (available with every codec build).
REPLICA_ENV = {
    "LALIC_RANDOM_WEIGHTS": "true",
    "LALIC_DEVICE": "cpu",
    "LALIC_BACKEND": "torch",
    "LALIC_QUALITIES": "2,3",
    "LALIC_MAX_BATCH_DELAY_MS": "2",
    "LALIC_TORCH_THREADS": "1",
    "LALIC_LOG_LEVEL": "warning",
}


def tool(name: str) -> str:
    """Absolute path of an external tool; fails (never skips) when it is not installed."""
    found = shutil.which(name) or next(
        (str(Path(d) / name) for d in TOOL_DIRS if os.access(Path(d) / name, os.X_OK)), None
    )
    if found is None:
        pytest.fail(f"{name} is not installed: run `bash {INSTALL_SCRIPT}` (CI runs it before the tests)")
    return found


def run_tool(*args: str, timeout: float = 60, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a tool under ``nice`` and capture its output; on failure the assertion shows the output."""
    proc = subprocess.run(
        ["nice", "-n", "10", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if check:
        assert proc.returncode == 0, (
            f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(
    url: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Poll ``url`` until it answers 200 (fails early if ``process`` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            text = log.read_text(errors="replace")[-4000:] if log else ""
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered:\n{text}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    text = log.read_text(errors="replace")[-4000:] if log else ""
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s\n{text}")


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL after ``timeout``: only the process this test session started."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@dataclass
class Replica:
    """One ``python -m service`` process on a loopback port."""

    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def assert_alive(self) -> None:
        """Fail with the end of the replica's log if its process has exited."""
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-4000:]
            pytest.fail(f"replica {self.address} exited with {self.process.returncode}:\n{tail}")

    def metrics_text(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=30).text

    def counter(self, name: str, **labels: str) -> float:
        """Current value of one sample of the exposition (0 when absent)."""
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0


def start_replica(log_dir: Path) -> Replica:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LALIC_")}
    env.update(REPLICA_ENV)
    env.update({"LALIC_HOST": "127.0.0.1", "LALIC_PORT": str(port), "PYTHONUNBUFFERED": "1"})
    log = log_dir / f"replica-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["nice", "-n", "5", sys.executable, "-m", "service"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Replica(process, port, log)


@pytest.fixture(scope="session")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Replica]]:
    """Two service replicas (random weights, free loopback ports), started together, ready."""
    log_dir = tmp_path_factory.mktemp("replicas")
    started = [start_replica(log_dir) for _ in range(2)]
    try:
        for replica in started:
            wait_http(f"{replica.url}/readyz", SERVER_START_TIMEOUT_S, replica.process, replica.log)
        yield started
    finally:
        for replica in started:
            stop_process(replica.process)


@pytest.fixture
def live_replicas(replicas: list[Replica]) -> Iterator[list[Replica]]:
    """The replicas, checked to be running before and after the test (with their logs if not)."""
    for replica in replicas:
        replica.assert_alive()
    yield replicas
    for replica in replicas:
        replica.assert_alive()


@pytest.fixture
def replica(live_replicas: list[Replica]) -> Replica:
    """The first replica, for single-server tests."""
    return live_replicas[0]


def test_png(height: int = 48, width: int = 64, seed: int = 0) -> bytes:
    """A small smooth RGB PNG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack(
        [127 + 100 * np.sin(x / (6 + c) + seed) * np.cos(y / (9 + c)) for c in range(3)], axis=-1
    )
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


test_png.__test__ = False  # type: ignore[attr-defined]

PNG_HEADERS = {"content-type": "image/png"}
BITSTREAM_HEADERS = {"content-type": "application/x-lalic"}


def decoded_pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
