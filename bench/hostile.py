"""The service under hostile load: normal requests beside worst-case valid images and slow clients.

Run from the repository root with the venv active, e.g.::

    python bench/hostile.py                          # two phases of 3 minutes each
    python bench/hostile.py --duration 60            # a quick check
    python bench/hostile.py --weights shipped --backend torchscript --out bench/results

Two phases, each on a fresh ``python -m service`` (default settings except: one quality,
``--backend``, random lalic-s weights unless ``--weights``, ``torch_threads`` 1) on a free loopback
port, each ``--duration`` seconds:

1. ``baseline``: ``--clients`` closed-loop normal clients (bench/load.py's client: a 768x512 PNG to
   /compress at ``--quality``, or its bitstream to /decompress, half the clients each; a 503 is
   retried after its Retry-After).
2. ``hostile``: the same normal clients, plus ``--worst-clients`` clients each sending, in turn, one
   of the worst-case valid images of issue 36 every ``--worst-every`` seconds, ignoring Retry-After
   (a 6000x6000 flat grey PNG of 117 KB and a 632-byte JPEG claiming 6000x6000, both at the default
   ``max_pixels``, and a grey PNG of the largest size the server's cost model admits, about 60 % of
   a deadline of work, shrunk to the size a 413 names whenever the estimates grew, and by 15 % when
   refused at once behind the normal load, grown back after a success), and
   ``--slow-clients`` raw connections that misbehave in turn: one header byte every 0.5 s, one body
   byte every 0.5 s, nothing at all, and an endless header (each reconnects 0.5 s after the server
   closed it).

Reported per phase: normal requests (answered, success rate, p50/p99 latency of the successful
ones, statuses), worst-case and slow clients (statuses; how long the server held each kind of slow
connection at most), the server's peak RSS (sampled every 0.25 s), and the 5xx responses the server
counted during the phase (``lalic_requests_total``; its 500s from ``lalic_errors_total``: 500s would
be bugs, 503s are load shed on purpose). Results: ``--out``/``hostile.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import json
import math
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(1, str(ROOT))
from codec import machine, test_image  # noqa: E402
from load import load, summarize  # noqa: E402

from tests.service.helpers import grey_png, jpeg_declaring, parse_metrics, start_server  # noqa: E402

ISSUE_SIDE = 6000
"""The issue's worst-case images: 6000x6000 (36 MP, the default max_pixels)."""
LARGEST_SHARE = 0.6
"""The largest admitted image is sized to this share of the request timeout by the server's estimate."""
BACK_OFF = 0.85
"""Side factor of the largest admitted image after a 503 at once."""
DRIP_EVERY_S = 0.5
RSS_EVERY_S = 0.25
SLOW_KINDS = ("header", "body", "idle", "endless")
ENDLESS_CHUNK = b"a" * 65536


@contextlib.contextmanager
def serving(args: argparse.Namespace, phase: str) -> Iterator[tuple[str, psutil.Process]]:
    """A fresh service for one phase; yields its URL and process."""
    settings: dict[str, object] = {"qualities": str(int(args.quality)), "backend": args.backend}
    settings["log_level"] = "warning"
    if args.weights:  # "shipped": the service's default weights
        settings["random_weights"] = "false"
        if args.weights != "shipped":
            settings["weights"] = args.weights
    logs = Path(args.out) / f"hostile-{phase}"
    logs.mkdir(parents=True, exist_ok=True)
    server = start_server(logs, **settings)
    try:
        server.wait_ready(args.startup_timeout)
        yield server.url, psutil.Process(server.process.pid)
    finally:
        server.stop()


class PeakRss:
    """Samples a process's resident memory in a thread; ``peak`` in bytes."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.peak = process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(RSS_EVERY_S):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


class Largest:
    """The largest image the server admits: a grey square sized from its cost model, shrunk to the
    side a 413 names (``(e.g. NxN)``) when the estimates grew since, and by :data:`BACK_OFF` when
    it is refused at once behind the normal load; grown back by as much (up to the first size)
    after each success."""

    NAME = "largest admitted grey PNG"

    def __init__(self, url: str, timeout_s: float) -> None:
        samples = parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)
        labels = (("operation", "compress"),)
        fixed = samples[("lalic_cost_fixed_seconds", labels)]
        per_pixel = samples[("lalic_cost_seconds_per_megapixel", labels)] / 1e6
        pixels = max((LARGEST_SHARE * timeout_s - fixed) / per_pixel, 64 * 64)
        self.side = max(64, min(int(math.sqrt(pixels)) // 64 * 64, ISSUE_SIDE))
        self.first = self.side
        self.body = grey_png(self.side, self.side)
        self.sides = [self.side]

    async def adapt(self, status: int, detail: str) -> None:
        """Shrink to the side a 413 ``detail`` names, or by :data:`BACK_OFF` after a 503 at once;
        grow after a 200."""
        if status == 413 and "(e.g. " in detail:
            side = int(detail.rsplit("(e.g. ", 1)[1].split("x", 1)[0])
            self.first = min(self.first, side)
        elif status == 503 and detail.startswith("compressing "):  # refused at once, not after waiting
            side = int(self.side * BACK_OFF) // 64 * 64
        elif status == 200:
            side = min(self.first, math.ceil(self.side / BACK_OFF / 64) * 64)
        else:
            return
        if 64 <= side != self.side:
            self.side = side
            self.body = await asyncio.to_thread(grey_png, side, side)
            self.sides.append(side)


async def worst_client(
    url: str, fixed: list[tuple[str, bytes]], largest: Largest, every_s: float, stop: float, results: Counter
) -> None:
    """The worst-case images in turn, one every ``every_s`` (or as soon as answered if slower)."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        turn = 0
        while time.perf_counter() < stop:
            sent = time.perf_counter()
            name, body = (*fixed, (Largest.NAME, largest.body))[turn % (len(fixed) + 1)]
            turn += 1
            try:
                response = await http.post(
                    "/compress?quality=3", content=body, headers={"content-type": "image/png"}
                )
                results[f"{name}: {response.status_code}"] += 1
                if name == Largest.NAME:
                    detail = response.json()["detail"] if response.status_code >= 400 else ""
                    await largest.adapt(response.status_code, detail)
            except httpx.HTTPError as exc:
                results[f"{name}: {type(exc).__name__}"] += 1
            await asyncio.sleep(max(0.0, min(sent + every_s, stop) - time.perf_counter()))


async def slow_client(
    host: str, port: int, kind: str, stop: float, statuses: Counter, held: dict[str, float]
) -> None:
    """One misbehaving connection after another, until ``stop``; ``held``: longest hold per kind."""
    heads = {
        "header": b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
        "body": b"POST /decompress HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-lalic\r\n"
        b"Content-Length: 100000\r\n\r\n",
        "idle": b"",
        "endless": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ",
    }
    while time.perf_counter() < stop:
        opened = time.perf_counter()
        received = b""
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            statuses[f"{kind}: {type(exc).__name__}"] += 1
            await asyncio.sleep(DRIP_EVERY_S)
            continue
        try:
            writer.write(heads[kind])
            await writer.drain()
            wait = 0.001 if kind == "endless" else DRIP_EVERY_S
            while time.perf_counter() < stop:
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), wait)
                except TimeoutError:
                    writer.write(ENDLESS_CHUNK if kind == "endless" else b"" if kind == "idle" else b"x")
                    await writer.drain()
                    continue
                if not chunk:
                    break  # the server closed the connection
                received += chunk
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
        closed = time.perf_counter()
        if closed < stop:  # the server ended it, not the phase
            held[kind] = max(held.get(kind, 0.0), closed - opened)
            status = received.split(b" ", 2)[1].decode() if received.startswith(b"HTTP/1.1 ") else "closed"
            statuses[f"{kind}: {status}"] += 1
            await asyncio.sleep(DRIP_EVERY_S)


async def phase(
    url: str, args: argparse.Namespace, bodies: dict, hostile: tuple[list[tuple[str, bytes]], Largest] | None
) -> dict:
    """Normal clients (and, if ``hostile``, the worst-case and slow clients) for ``--duration`` s."""
    png, stream = bodies["png"], bodies["stream"]
    compress_clients = (args.clients + 1) // 2
    decompress_clients = args.clients // 2
    stop = time.perf_counter() + args.duration
    worst: Counter = Counter()
    slow: Counter = Counter()
    held: dict[str, float] = {}
    tasks = [load(url, "compress", png, "image/png", compress_clients, args.duration, args.quality)]
    if decompress_clients:
        tasks.append(
            load(url, "decompress", stream, "application/x-lalic", decompress_clients, args.duration, 3)
        )
    extra = []
    if hostile is not None:
        host, port = url.removeprefix("http://").split(":")
        extra += [
            worst_client(url, hostile[0], hostile[1], args.worst_every, stop, worst)
            for _ in range(args.worst_clients)
        ]
        extra += [
            slow_client(host, int(port), SLOW_KINDS[i % len(SLOW_KINDS)], stop, slow, held)
            for i in range(args.slow_clients)
        ]
    results = await asyncio.gather(*tasks, *extra)
    normal = {
        "latencies": [],
        "statuses": Counter(),
        "elapsed": max(r["elapsed"] for r in results[: len(tasks)]),
    }
    for result in results[: len(tasks)]:
        normal["latencies"] += result["latencies"]
        normal["statuses"].update(result["statuses"])
    summary = summarize(normal)
    answered = sum(summary["statuses"].values())
    return {
        "normal": summary
        | {"answered": answered, "success": summary["ok"] / answered if answered else math.nan},
        "worst": dict(worst),
        "slow": dict(slow),
        "slow_held_max_s": held,
    }


def server_5xx(url: str) -> dict[str, float]:
    """The server's own count of 5xx responses so far (all endpoints), and of its 500s."""
    samples = parse_metrics(httpx.get(f"{url}/metrics", timeout=30).text)
    total = sum(
        v
        for (name, labels), v in samples.items()
        if name == "lalic_requests_total" and ("status_class", "5xx") in labels
    )
    internal = samples.get(("lalic_errors_total", (("code", "internal_error"),)), 0.0)
    return {"5xx": total, "500": internal}


def run_phase(args: argparse.Namespace, name: str, png: bytes) -> dict:
    with serving(args, name) as (url, process):
        stream = httpx.post(
            f"{url}/compress?quality={args.quality:g}",
            content=png,
            headers={"content-type": "image/png"},
            timeout=300,
        ).content
        hostile = None
        if name == "hostile":
            fixed = [
                ("grey 6000x6000 PNG", grey_png(ISSUE_SIDE, ISSUE_SIDE)),
                ("JPEG claiming 6000x6000", jpeg_declaring(ISSUE_SIDE, ISSUE_SIDE)),
            ]
            hostile = (fixed, Largest(url, args.request_timeout))
        before = server_5xx(url)  # start-up polling of /readyz counted its 503s
        with PeakRss(process) as rss:
            result = asyncio.run(phase(url, args, {"png": png, "stream": stream}, hostile))
        after = server_5xx(url)
        server = {key: after[key] - before[key] for key in after}
        result |= {"phase": name, "peak_rss_mb": rss.peak / 2**20, "server": server}
        result["largest_sides"] = hostile[1].sides if hostile else []
        return result


def report(rows: list[dict], args: argparse.Namespace, argv: list[str]) -> str:
    lines = [
        "# The service under hostile load (issue 36)",
        "",
        f"- Command: `python bench/hostile.py {' '.join(argv)}`",
        f"- Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}; machine: {machine()['cpu']}, "
        f"{machine()['cores']} cores",
        f"- Service: `python -m service`, default settings but one quality ({args.quality:g}), backend "
        f"{args.backend}, {'weights ' + args.weights if args.weights else 'random lalic-s weights'}, "
        f"torch_threads 1; {args.duration:g} s per phase, a fresh server each",
        f"- Normal load: {args.clients} closed-loop clients, {args.size} PNG to /compress and its "
        "bitstream to /decompress; hostile: "
        f"{args.worst_clients} worst-case image client(s) (an image every {args.worst_every:g} s), "
        f"{args.slow_clients} slow clients",
        "",
        "| phase | normal answered | success | p50 ms | p99 ms | normal statuses | peak RSS MB | "
        "server 5xx | server 500 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        n = r["normal"]
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(n["statuses"].items()))
        cells = [
            r["phase"],
            n["answered"],
            f"{100 * n['success']:.1f} %",
            f"{n['p50']:.0f}",
            f"{n['p99']:.0f}",
        ]
        cells += [
            statuses,
            f"{r['peak_rss_mb']:.0f}",
            f"{r['server']['5xx']:.0f}",
            f"{r['server']['500']:.0f}",
        ]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    for r in rows:
        if r["worst"] or r["slow"]:
            lines += ["", f"Hostile clients ({r['phase']}):", ""]
            lines += [f"- worst-case images: {', '.join(f'{k} x{v}' for k, v in sorted(r['worst'].items()))}"]
            lines += [f"- sides of the largest admitted image: {', '.join(map(str, r['largest_sides']))}"]
            lines += [f"- slow connections: {', '.join(f'{k} x{v}' for k, v in sorted(r['slow'].items()))}"]
            held = ", ".join(
                f"{kind} {seconds:.1f} s" for kind, seconds in sorted(r["slow_held_max_s"].items())
            )
            lines += [f"- longest a slow connection of each kind was held: {held}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=180.0, help="seconds per phase (default 180)")
    parser.add_argument("--clients", type=int, default=2, help="normal closed-loop clients (default 2)")
    parser.add_argument("--worst-clients", type=int, default=1, help="worst-case image clients (default 1)")
    parser.add_argument(
        "--worst-every",
        type=float,
        default=1.0,
        help="seconds between a worst-case client's images (default 1)",
    )
    parser.add_argument("--slow-clients", type=int, default=8, help="slow connections (default 8)")
    parser.add_argument("--size", default="768x512", help="normal image WIDTHxHEIGHT (default 768x512)")
    parser.add_argument("--quality", type=float, default=3.0)
    parser.add_argument("--backend", default="torchscript", choices=["torch", "torchscript", "onnxruntime"])
    parser.add_argument("--weights", help="weight file or 'shipped' (default: random lalic-s weights)")
    parser.add_argument(
        "--request-timeout", type=float, default=30.0, help="the servers' request_timeout_s default"
    )
    parser.add_argument(
        "--phases", nargs="+", default=["baseline", "hostile"], choices=["baseline", "hostile"]
    )
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    from PIL import Image

    Path(args.out).mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in args.size.split("x"))
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(test_image(width, height))).save(buffer, format="PNG")
    rows = []
    for name in args.phases:
        print(f"phase {name}: {args.duration:g} s", flush=True)
        rows.append(run_phase(args, name, buffer.getvalue()))
    shown = sys.argv[1:] if argv is None else argv
    text = report(rows, args, shown)
    out = Path(args.out)
    (out / "hostile.json").write_text(
        json.dumps({"argv": shown, "machine": machine(), "rows": rows}, indent=1)
    )
    (out / "hostile.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
