"""Helpers for the service tests: real servers (``python -m service``) on loopback, images, assertions."""

from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
TEST_BACKEND = "torch"
"""Backend of every test server and of the reference codec (the codec offers only eager torch so far)."""
START_TIMEOUT_S = 120.0
"""Loading torch, building the random model and warming up, on a busy two-core machine."""
MAIN_SERVER_SETTINGS: dict[str, Any] = {
    "max_batch_size": 8,
    "max_batch_delay_ms": 100,  # long enough for 16 concurrent requests to meet in batches
    "max_body_bytes": 2_000_000,
    "max_pixels": 4_000_000,
    "min_side": 2,
}


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


MetricKey = tuple[str, tuple[tuple[str, str], ...]]


def parse_metrics(text: str) -> dict[MetricKey, float]:
    """Samples of a Prometheus exposition, keyed by (sample name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@dataclass
class Server:
    """A ``python -m service`` subprocess listening on loopback."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    first_readyz: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[MetricKey, float]:
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=30).text)

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        self._wait("/healthz", timeout)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        self._wait("/readyz", timeout)

    def _wait(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{path} not 200 within {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_server(log_dir: Path, **settings: Any) -> Server:
    """Start a random-weights server with ``settings`` (as LALIC_* variables); returns once /healthz answers.

    Records the /readyz status seen right after /healthz first answered (model still loading).
    """
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("LALIC_")}
    values = {
        "host": "127.0.0.1",
        "port": port,
        "random_weights": "true",
        "device": "cpu",
        "backend": TEST_BACKEND,
        "log_level": "info",
        "torch_threads": 1,  # two cores shared with other work: more threads only contend
        # the reference codec's precision, whatever this CPU would choose (auto)
        "synthesis_precision": "float32",
        "analysis_precision": "float32",
        **settings,
    }
    env.update({f"LALIC_{name.upper()}": str(value) for name, value in values.items()})
    env["PYTHONUNBUFFERED"] = "1"
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(process, f"http://127.0.0.1:{port}", log_path, settings=values)
    try:
        server.wait_healthy()
        server.first_readyz = httpx.get(f"{server.url}/readyz", timeout=10).status_code
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    return server


@contextmanager
def ready_server(log_dir: Path, **settings: Any) -> Iterator[Server]:
    """A server started with :func:`start_server`, once it is ready; stopped on leaving."""
    server = start_server(log_dir, **settings)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (gradients plus a little noise), uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    channels = [127 + 100 * np.sin(x / (7 + 3 * c) + phase[c]) * np.cos(y / (11 + 2 * c)) for c in range(3)]
    image = np.stack(channels, axis=-1) + rng.normal(0, 8, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


test_image.__test__ = False  # type: ignore[attr-defined]  # a helper, not a test


def encode(image: np.ndarray | Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    """Encode an array or PIL image with Pillow."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    pil.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def grey_png(width: int, height: int, level: int = 128) -> bytes:
    """A flat grey RGB PNG, built row by row (a 6000x6000 one is 117 KB and never held decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    deflate = zlib.compressobj(9)
    parts = [deflate.compress(b"\0" + bytes([level]) * (3 * width))]  # filter None: the grey row
    repeat = b"\2" + b"\0" * (3 * width)  # filter Up: the row above
    parts += [deflate.compress(repeat) for _ in range(height - 1)]
    parts.append(deflate.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
    )


def jpeg_declaring(width: int, height: int) -> bytes:
    """A 16x16 JPEG (about 630 bytes) whose frame header claims ``width`` x ``height``."""
    data = bytearray(encode(test_image(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def decode(data: bytes) -> np.ndarray:
    """Decode an image response to uint8 RGB."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is a JSON error with this status and code, and no traceback."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) >= {"error", "detail"} and body["error"] == code, body
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body


PNG = {"content-type": "image/png"}
"""Request headers of a raw PNG body."""
LALIC = {"content-type": "application/x-lalic"}
"""Request headers of a raw bitstream body."""
