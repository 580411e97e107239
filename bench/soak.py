"""Soak test: a steady mixed compress/decompress load on a service this script starts, then checks.

    python bench/soak.py                          # 30 minutes, random weights, 2 clients
    python bench/soak.py --minutes 5 --report bench/results/soak.md
    python bench/soak.py --weights shipped --backend torchscript

The server is ``python -m service`` on a free loopback port (same machine: the load never leaves
127.0.0.1). ``--concurrency`` client threads loop without pause (a closed loop: a steady load that
the server can sustain, rather than an open-loop rate that would only measure queueing). Each
request is, at random (``--decompress-share``), a /compress of one of a fixed set of images
(several sizes, every quality plus fractional ones) or a /decompress of a stream a /compress
returned: streams not yet decompressed go first, so every stream is decompressed by the server at
least once (the rest are drained after the timed window).

Reported: throughput, latency percentiles per operation, errors (any non-200 or transport error;
there must be none), and the server's RSS after the warm-up (a full pass over every image size and
operation, and at least ``--warmup-s``) against its RSS at the end (growth must stay below
``--max-rss-growth`` percent). Then, offline, the same codec as the server (same weights,
backend and thread count) re-compresses every request image (the streams must be identical) and
decodes every returned stream (the image must equal every image the server's /decompress gave for
it). Exit status 0 only if everything passed.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIZES = ((64, 64), (48, 80), (128, 128), (96, 160), (200, 150), (256, 192))
"""(height, width) of the request images: one to four padded 64-blocks a side."""
QUALITIES = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 1.5, 3.25, 5.75)
START_TIMEOUT_S = 300.0
RSS_SAMPLE_EVERY_S = 5.0
RSS_TRACE_EVERY_S = 30.0
"""Spacing of the RSS samples listed in the report."""
WARMUP_REQUESTS = 2 * 2 * len(SIZES)
"""Untimed requests of the warm-up: every size, two qualities, compress then decompress."""


def soak_image(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like RGB image: gradients, edges and noise, uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    planes = [128 + 90 * np.sin(x / (6 + 3 * c) + phase[c]) * np.cos(y / (10 + 2 * c)) for c in range(3)]
    image = np.stack(planes, axis=-1) + rng.normal(0, 10, (height, width, 3))
    image[height // 3 : height // 2, width // 4 : width // 2] = rng.integers(0, 256, 3)  # a flat block
    return np.clip(image, 0, 255).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """Lossless PNG of an RGB array (the request body)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def pixel_digest(image: np.ndarray) -> str:
    """SHA-256 of an image's shape and pixels."""
    return hashlib.sha256(str(image.shape).encode() + np.ascontiguousarray(image).tobytes()).hexdigest()


@dataclass
class Server:
    """The service under test, as a subprocess."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @classmethod
    def start(cls, settings: dict[str, Any], log_path: Path) -> Server:
        """Start ``python -m service`` with ``settings`` on a free loopback port; return once it is ready."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {name: value for name, value in os.environ.items() if not name.startswith("LALIC_")}
        env.update(
            {f"LALIC_{name.upper()}": str(value) for name, value in {**settings, "port": port}.items()}
        )
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        server = cls(process, f"http://127.0.0.1:{port}", log_path)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}; see {log_path}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        server.stop()
        raise TimeoutError(f"the server was not ready within {START_TIMEOUT_S} s; see {log_path}")

    def rss(self) -> int:
        """Resident set size of the server process, in bytes."""
        return psutil.Process(self.process.pid).memory_info().rss

    def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL after a minute."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@dataclass
class Record:
    """Everything the load produced, shared by the client threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    streams: dict[bytes, tuple[int, float]] = field(default_factory=dict)
    """Every stream /compress returned -> (image index, quality)."""
    stream_order: list[bytes] = field(default_factory=list)
    pending: list[bytes] = field(default_factory=list)
    """Streams not yet decompressed by the server."""
    compress_results: dict[tuple[int, float], set[bytes]] = field(default_factory=lambda: defaultdict(set))
    decoded: dict[bytes, set[str]] = field(default_factory=lambda: defaultdict(set))
    """Stream -> pixel digests of the images the server's /decompress returned for it."""
    bytes_sent: int = 0
    bytes_received: int = 0


class Load:
    """The client side: images, the operation mix and the request loop."""

    def __init__(self, server: Server, args: argparse.Namespace, record: Record) -> None:
        self.server = server
        self.args = args
        self.record = record
        self.images = [soak_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
        self.bodies = [png_bytes(image) for image in self.images]
        self.stop_at = 0.0
        self.rng = np.random.default_rng(args.seed)
        self.rng_lock = threading.Lock()

    def compress(self, http: httpx.Client, index: int, quality: float, timed: bool = True) -> bytes | None:
        """POST one image; records the stream (and its latency if ``timed``); None on an error."""
        body = self.bodies[index]
        started = time.perf_counter()
        try:
            response = http.post(
                f"/compress?quality={quality:g}", content=body, headers={"content-type": "image/png"}
            )
        except httpx.HTTPError as exc:
            self._error(f"compress: {type(exc).__name__}: {exc}")
            return None
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            self._error(f"compress: {response.status_code} {response.text[:200]}")
            return None
        stream = response.content
        with self.record.lock:
            if timed:
                self.record.latencies["compress"].append(elapsed)
            self.record.bytes_sent += len(body)
            self.record.bytes_received += len(stream)
            if stream not in self.record.streams:
                self.record.streams[stream] = (index, quality)
                self.record.stream_order.append(stream)
                self.record.pending.append(stream)
            self.record.compress_results[(index, quality)].add(stream)
        return stream

    def decompress(self, http: httpx.Client, stream: bytes, timed: bool = True) -> None:
        """POST one stream; records the digest of the returned image (and the latency if ``timed``)."""
        started = time.perf_counter()
        try:
            response = http.post(
                "/decompress", content=stream, headers={"content-type": "application/x-lalic"}
            )
        except httpx.HTTPError as exc:
            self._error(f"decompress: {type(exc).__name__}: {exc}")
            return
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            self._error(f"decompress: {response.status_code} {response.text[:200]}")
            return
        image = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
        with self.record.lock:
            if timed:
                self.record.latencies["decompress"].append(elapsed)
            self.record.bytes_sent += len(stream)
            self.record.bytes_received += len(response.content)
            self.record.decoded[stream].add(pixel_digest(image))

    def _error(self, text: str) -> None:
        """Record a failed request."""
        with self.record.lock:
            self.record.errors.append(f"{time.strftime('%H:%M:%S')} {text}")

    def _next_stream(self) -> bytes | None:
        """The next stream to decompress: the oldest not yet decoded, else a random earlier one."""
        with self.record.lock:
            if self.record.pending:
                return self.record.pending.pop(0)
            if self.record.stream_order:
                with self.rng_lock:
                    return self.record.stream_order[int(self.rng.integers(len(self.record.stream_order)))]
        return None

    def warm_up(self) -> None:
        """Every image size, compress and decompress, at two qualities, one request at a time."""
        with httpx.Client(base_url=self.server.url, timeout=self.args.timeout) as http:
            for index in range(len(self.images)):
                for quality in (QUALITIES[0], QUALITIES[-1]):
                    stream = self.compress(http, index, quality, timed=False)
                    if stream is not None:
                        self.decompress(http, stream, timed=False)
        with self.record.lock:
            self.record.pending.clear()  # decoded already

    def client(self) -> None:
        """One client thread: requests back to back until the end of the timed window."""
        with httpx.Client(base_url=self.server.url, timeout=self.args.timeout) as http:
            while time.monotonic() < self.stop_at:
                with self.rng_lock:
                    decompress = self.rng.random() < self.args.decompress_share
                    index = int(self.rng.integers(len(self.images)))
                    quality = float(QUALITIES[int(self.rng.integers(len(QUALITIES)))])
                stream = self._next_stream() if decompress else None
                if stream is not None:
                    self.decompress(http, stream)
                else:
                    self.compress(http, index, quality)

    def drain(self) -> int:
        """Decompress the streams the server has not decoded yet (outside the timed window)."""
        with self.record.lock:
            pending, self.record.pending = self.record.pending, []
        with httpx.Client(base_url=self.server.url, timeout=self.args.timeout) as http:
            for stream in pending:
                self.decompress(http, stream, timed=False)
        return len(pending)


def percentiles(values: list[float]) -> dict[str, float]:
    """Count and p50/p95/p99/max in milliseconds of latencies in seconds."""
    if not values:
        return {}
    array = np.asarray(values) * 1000.0
    return {
        "count": len(values),
        "p50_ms": round(float(np.percentile(array, 50)), 1),
        "p95_ms": round(float(np.percentile(array, 95)), 1),
        "p99_ms": round(float(np.percentile(array, 99)), 1),
        "max_ms": round(float(array.max()), 1),
    }


def verify_offline(load: Load, record: Record, args: argparse.Namespace) -> dict[str, Any]:
    """Re-run every request with the server's codec in-process and compare."""
    import torch

    from model.codec import Codec

    if args.threads:
        torch.set_num_threads(args.threads)
    options = {"device": "cpu", "backend": args.backend}
    if args.weights == "random":
        codec = Codec.random(args.model, seed=0, **options)
    else:
        codec = Codec.from_pretrained(None if args.weights == "shipped" else args.weights, **options)
    started = time.monotonic()
    stream_mismatches = []
    for (index, quality), streams in record.compress_results.items():
        expected = codec.compress(load.images[index], quality)
        if streams != {expected}:
            stream_mismatches.append(
                f"image {index} q{quality:g}: {len(streams)} stream(s), none or more than the codec's"
            )
    image_mismatches = []
    undecoded = []
    for stream in record.stream_order:
        digests = record.decoded.get(stream)
        if not digests:
            undecoded.append(stream)
            continue
        offline = pixel_digest(codec.decompress(stream))
        if digests != {offline}:
            index, quality = record.streams[stream]
            image_mismatches.append(
                f"image {index} q{quality:g}: server gave {len(digests)} image(s) != offline"
            )
    return {
        "distinct_streams": sum(len(s) for s in record.compress_results.values()),
        "distinct_compress_inputs": len(record.compress_results),
        "streams_checked": len(record.stream_order) - len(undecoded),
        "stream_mismatches": stream_mismatches,
        "image_mismatches": image_mismatches,
        "streams_never_decompressed": len(undecoded),
        "seconds": round(time.monotonic() - started, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the server, warm up, run the timed window, drain, stop, verify; returns the results."""
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "device": "cpu",
        "backend": args.backend,
        "max_batch_size": args.max_batch_size,
        "max_batch_delay_ms": args.max_batch_delay_ms,
        "request_timeout_s": args.timeout,
        "log_level": "warning",
    }
    if args.threads:
        settings["torch_threads"] = args.threads
    if args.weights == "random":
        settings.update(random_weights="true", model=args.model)
    elif args.weights != "shipped":
        settings["weights"] = args.weights
    log_path = Path(args.server_log)
    started_at = datetime.now(UTC)
    server = Server.start(settings, log_path)
    record = Record()
    load = Load(server, args, record)
    rss_samples: list[tuple[float, int]] = []
    try:
        warm_started = time.monotonic()
        load.warm_up()
        remaining_warmup = args.warmup_s - (time.monotonic() - warm_started)
        duration = args.minutes * 60.0
        t0 = time.monotonic()
        load.stop_at = t0 + duration
        threads = [threading.Thread(target=load.client, daemon=True) for _ in range(args.concurrency)]
        for thread in threads:
            thread.start()
        baseline_at = t0 + max(0.0, remaining_warmup)
        baseline_rss: int | None = None
        while any(thread.is_alive() for thread in threads):
            now = time.monotonic()
            rss = server.rss()
            rss_samples.append((now - t0, rss))
            if baseline_rss is None and now >= baseline_at:
                baseline_rss = rss
                baseline_requests = sum(len(v) for v in record.latencies.values())
            time.sleep(min(RSS_SAMPLE_EVERY_S, max(0.05, load.stop_at - time.monotonic() + 0.05)))
        window = time.monotonic() - t0
        final_rss = server.rss()
        drained = load.drain()
        rss_after_drain = server.rss()
    finally:
        server.stop()
    verification = verify_offline(load, record, args)
    requests = {op: len(values) for op, values in record.latencies.items()}
    total = sum(requests.values())
    assert baseline_rss is not None
    growth = (final_rss - baseline_rss) / baseline_rss * 100.0
    passed = (
        not record.errors
        and growth < args.max_rss_growth
        and not verification["stream_mismatches"]
        and not verification["image_mismatches"]
        and verification["streams_never_decompressed"] == 0
    )
    return {
        "started": started_at.isoformat(timespec="seconds"),
        "passed": passed,
        "minutes": args.minutes,
        "window_s": round(window, 1),
        "settings": {**settings, "concurrency": args.concurrency, "decompress_share": args.decompress_share},
        "weights": args.weights,
        "requests": requests,
        "throughput_rps": round(total / window, 2),
        "throughput_by_op_rps": {op: round(n / window, 2) for op, n in requests.items()},
        "latency": {op: percentiles(values) for op, values in sorted(record.latencies.items())},
        "all_latency": percentiles([v for values in record.latencies.values() for v in values]),
        "errors": len(record.errors),
        "error_samples": record.errors[:20],
        "rss_mb": {
            "after_warmup": round(baseline_rss / 2**20, 1),
            "end": round(final_rss / 2**20, 1),
            "max": round(max(r for _, r in rss_samples) / 2**20, 1),
            "after_drain": round(rss_after_drain / 2**20, 1),
            "growth_percent": round(growth, 2),
            "requests_before_baseline": baseline_requests,
        },
        "rss_trace_mb": [
            (round(t), round(r / 2**20, 1))
            for t, r in rss_samples[:: max(1, round(RSS_TRACE_EVERY_S / RSS_SAMPLE_EVERY_S))]
            + rss_samples[-1:]
        ],
        "drained_after_window": drained,
        "verification": verification,
        "bytes": {"sent": record.bytes_sent, "received": record.bytes_received},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "nice": os.nice(0),
        },
    }


def markdown(result: dict[str, Any]) -> str:
    """The report as Markdown."""
    r = result
    st = r["settings"]
    lines = [
        "# Soak test",
        "",
        *([r["note"], ""] if r.get("note") else []),
        f"Command: `{r['command']}`  ",
        f"Started {r['started']}; timed window {r['window_s']} s ({r['minutes']} min requested); "
        f"**{'PASS' if r['passed'] else 'FAIL'}**.",
        "",
        f"Machine: {r['machine']['cpus']} CPUs, {r['machine']['platform']}, Python {r['machine']['python']}, "
        f"soak and server at nice {r['machine']['nice']}, load average at the end "
        f"{r['machine']['load_average_at_end']}.",
        "",
        f"Server: `python -m service`, weights {r['weights']}, backend {st['backend']}, torch threads "
        f"{st.get('torch_threads', 'default')}, batch {st['max_batch_size']} / {st['max_batch_delay_ms']} ms."
        " "
        f"Load: {st['concurrency']} closed-loop clients, {st['decompress_share']:.0%} decompress; images "
        f"{', '.join(f'{w}x{h}' for h, w in SIZES)}; qualities {', '.join(f'{q:g}' for q in QUALITIES)}.",
        "",
        "| operation | requests | throughput (req/s) | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for op, stats in r["latency"].items():
        lines.append(
            f"| {op} | {stats['count']} | {r['throughput_by_op_rps'][op]} | {stats['p50_ms']} | "
            f"{stats['p95_ms']} | {stats['p99_ms']} | {stats['max_ms']} |"
        )
    all_stats = r["all_latency"]
    lines.append(
        f"| all | {all_stats['count']} | {r['throughput_rps']} | {all_stats['p50_ms']} | "
        f"{all_stats['p95_ms']} | {all_stats['p99_ms']} | {all_stats['max_ms']} |"
    )
    rss = r["rss_mb"]
    v = r["verification"]
    n_compress, n_decompress = r["requests"].get("compress", 0), r["requests"].get("decompress", 0)
    lines += [
        "",
        f"Errors: **{r['errors']}** (any non-200 or transport error).",
        "",
        f"Server RSS: {rss['after_warmup']} MiB after the warm-up ({rss['requests_before_baseline']} timed "
        f"requests in), {rss['end']} MiB at the end, max {rss['max']} MiB: growth "
        f"**{rss['growth_percent']} %** (limit {result['max_rss_growth']} %). Trace (s, MiB): "
        + ", ".join(f"{t}: {m}" for t, m in r["rss_trace_mb"]),
        "",
        f"Offline check with the same codec: every /compress response ({n_compress} timed "
        f"+ {WARMUP_REQUESTS // 2} warm-up) was one of {v['distinct_streams']} distinct streams for "
        f"{v['distinct_compress_inputs']} (image, quality) inputs, each re-compressed offline: "
        f"{len(v['stream_mismatches'])} mismatches. Every returned stream ({v['streams_checked']}) was "
        f"decoded offline and compared with every image the server's /decompress gave for it "
        f"({n_decompress} timed + {WARMUP_REQUESTS // 2} warm-up responses): "
        f"{len(v['image_mismatches'])} mismatches; "
        f"{v['streams_never_decompressed']} streams left undecoded ({r['drained_after_window']} were "
        f"decompressed after the timed window). Took {v['seconds']} s.",
    ]
    if r["error_samples"] or v["stream_mismatches"] or v["image_mismatches"]:
        lines += ["", "First problems:", ""]
        lines += [
            f"- {text}" for text in r["error_samples"] + v["stream_mismatches"] + v["image_mismatches"]
        ][:30]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the timed window")
    parser.add_argument("--concurrency", type=int, default=2, help="closed-loop client threads")
    parser.add_argument(
        "--decompress-share", type=float, default=0.5, help="fraction of /decompress requests"
    )
    parser.add_argument("--weights", default="random", help="random (seed 0), shipped, or a weight file")
    parser.add_argument("--model", default="lalic-s", help="configuration of the random weights")
    parser.add_argument("--backend", default="torch", choices=("torch", "torchscript", "onnxruntime"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads, server and offline codec")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-batch-delay-ms", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="client and server request timeout, s")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="the RSS baseline is taken after this")
    parser.add_argument("--max-rss-growth", type=float, default=5.0, help="percent, baseline to end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, help="write the Markdown report here (and JSON beside it)")
    parser.add_argument("--server-log", default="/tmp/lalic-soak-server.log")
    parser.add_argument("--note", default="", help="a paragraph put at the top of the report")
    parser.add_argument("--render", type=Path, help="only rewrite the report from a saved JSON result")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the soak, print (and write) the report; exit status 0 only on a pass."""
    args = parse_args(argv)
    if args.render:
        result = json.loads(args.render.read_text())
        if args.note:
            result["note"] = args.note
    else:
        result = run(args)
        result["max_rss_growth"] = args.max_rss_growth
        result["command"] = (
            "python bench/soak.py " + " ".join(sys.argv[1:] if argv is None else argv)
        ).strip()
        result["note"] = args.note
    text = markdown(result)
    print(text)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text)
        args.report.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
