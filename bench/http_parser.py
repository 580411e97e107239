"""What the h11 parser with our limits costs: the same app behind it and behind uvicorn's httptools.

    python bench/http_parser.py                 # 2 rounds, each parser once per round
    python bench/http_parser.py --rounds 4

The service runs uvicorn's h11 protocol with header limits and read timeouts
(:mod:`service.protocol`); httptools, uvicorn's default when installed, is faster C but bounds
neither. For each round and parser, the script serves the app (random lalic-s weights, one quality,
torch backend, one thread) on a free loopback port in a subprocess (``--serve``), then times
sequential keep-alive requests from one client: /healthz, a 20 MB body that /decompress reads and
refuses (400), a 64x64 /compress and a 768x512 /decompress. Rounds alternate which parser goes
first, so that other load on the machine falls on both. Prints p50/p99 per request kind and parser.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(1, str(ROOT))
from codec import test_image  # noqa: E402

from model.malloc import MALLOC_ENVIRONMENT  # noqa: E402
from tests.service.helpers import free_port  # noqa: E402

PARSERS = ("h11", "httptools")
BIG_BODY = 20_000_000


def serve(parser: str, port: int) -> None:
    """Serve the app with ``parser`` (runs in the subprocess)."""
    import uvicorn

    from service.app import create_app
    from service.protocol import HttpLimits, protocol_class
    from service.settings import Settings

    settings = Settings(
        random_weights=True,
        device="cpu",
        backend="torch",
        qualities="3",
        torch_threads=1,
        port=port,
        log_level="warning",
        log_format="text",
    )
    app = create_app(settings)
    http = protocol_class(HttpLimits.from_settings(settings)) if parser == "h11" else "httptools"
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=http, log_level="warning", ws="none")
    uvicorn.Server(config).run()


def png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(test_image(width, height))).save(buffer, format="PNG")
    return buffer.getvalue()


def measure(parser: str) -> dict[str, tuple[float, float]]:
    """p50 and p99 in ms of each request kind against a fresh server with ``parser``."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", parser, str(port)],
        cwd=ROOT,
        env={**os.environ, **MALLOC_ENVIRONMENT},
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"the {parser} server did not get ready")
            time.sleep(0.25)
        with httpx.Client(base_url=url, timeout=120) as http:
            image = png(768, 512)
            stream = http.post(
                "/compress?quality=3", content=image, headers={"content-type": "image/png"}
            ).content
            small = png(64, 64)
            garbage = b"x" * BIG_BODY
            lalic = {"content-type": "application/x-lalic"}
            kinds: list[tuple[str, Callable[[], httpx.Response], int]] = [
                ("healthz", lambda: http.get("/healthz"), 3000),
                ("20 MB body, 400", lambda: http.post("/decompress", content=garbage, headers=lalic), 10),
                (
                    "compress 64x64",
                    lambda: http.post(
                        "/compress?quality=3", content=small, headers={"content-type": "image/png"}
                    ),
                    60,
                ),
                ("decompress 768x512", lambda: http.post("/decompress", content=stream, headers=lalic), 20),
            ]
            results = {}
            for name, call, count in kinds:
                call()  # warm
                latencies = []
                for _ in range(count):
                    started = time.perf_counter()
                    response = call()
                    latencies.append(time.perf_counter() - started)
                    if response.status_code not in (200, 400):
                        raise RuntimeError(f"{name}: {response.status_code} {response.text}")
                ms = np.array(latencies) * 1e3
                results[name] = (float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))
            return results
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", nargs=2, metavar=("PARSER", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return 0
    kinds = ("healthz", "20 MB body, 400", "compress 64x64", "decompress 768x512")
    print("| round | parser | " + " | ".join(f"{kind} p50 / p99 ms" for kind in kinds) + " |")
    print("| --- " * (2 + len(kinds)) + "|")
    for round_ in range(args.rounds):
        for name in PARSERS if round_ % 2 == 0 else PARSERS[::-1]:  # neither always goes first
            results = measure(name)
            cells = [f"{p50:.2f} / {p99:.2f}" for p50, p99 in results.values()]
            print(f"| {round_} | {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
