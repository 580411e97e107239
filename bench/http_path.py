"""What HTTP adds to the codec: /decompress and /compress of a 768x512 photo against the codec call.

Run from the repository root with the venv active, e.g.::

    python bench/http_path.py                                   # shipped weights, the service defaults
    python bench/http_path.py --backend torch --requests 30 --out bench/results

Starts ``python -m service`` on a free loopback port (shipped weights unless ``--weights random``,
``--backend``, ``--threads`` torch threads), sends ``--requests`` sequential
/decompress (PNG out) and /compress requests of Kodak kodim23 (768x512) at ``--quality`` after a
warm-up, and reads the server's own split of each request, ``lalic_request_stage_seconds`` (mean
per stage over the timed requests). Then, with the server stopped, times the same codec calls in
this process (same weights, backend and threads). Rounds alternate which of the two goes first.

Reported per operation: HTTP latency as the client sees it (median), the codec call alone
(median), their difference (what the HTTP path costs), and the server's stages. Results:
``--out``/``http_path.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(1, str(ROOT))
from codec import machine, test_image  # noqa: E402

from tests.service.helpers import MetricKey, encode, start_server  # noqa: E402

OPERATIONS = ("decompress", "compress")


def stage_means(before: dict[MetricKey, float], after: dict[MetricKey, float], endpoint: str) -> dict:
    """Mean seconds per stage of ``endpoint`` between two /metrics snapshots."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for (name, labels), value in after.items():
        label = dict(labels)
        if label.get("endpoint") != endpoint or not name.startswith("lalic_request_stage_seconds_"):
            continue
        delta = value - before.get((name, labels), 0.0)
        if name.endswith("_sum"):
            sums[label["stage"]] = delta
        elif name.endswith("_count"):
            counts[label["stage"]] = delta
    return {stage: sums[stage] / counts[stage] for stage in sums if counts.get(stage)}


def time_http(args: argparse.Namespace, png: bytes, stream: bytes) -> dict:
    """Client latencies and server stage means of each operation through a fresh server."""
    settings = {
        "backend": args.backend,
        "qualities": str(args.quality),
        "log_level": "warning",
        "torch_threads": args.threads,
        "synthesis_precision": args.synthesis_precision,
        "analysis_precision": args.analysis_precision,
        "random_weights": "true" if args.weights == "random" else "false",
    }
    if args.weights not in ("random", "shipped"):
        settings["weights"] = args.weights
    with tempfile.TemporaryDirectory() as logs:
        server = start_server(Path(logs), **settings)
        try:
            server.wait_ready()
            results = {}
            with server.client() as http:
                requests = {
                    "decompress": lambda: http.post("/decompress?format=png", content=stream),
                    "compress": lambda: http.post(
                        f"/compress?quality={args.quality}",
                        content=png,
                        headers={"Content-Type": "image/png"},
                    ),
                }
                for operation in OPERATIONS:
                    for _ in range(args.warmup):
                        requests[operation]().raise_for_status()
                    before = server.metrics()
                    latencies = []
                    for _ in range(args.requests):
                        started = time.perf_counter()
                        requests[operation]().raise_for_status()
                        latencies.append(time.perf_counter() - started)
                    results[operation] = {
                        "latencies": latencies,
                        "stages": stage_means(before, server.metrics(), operation),
                    }
            return results
        finally:
            server.stop()


def time_codec(args: argparse.Namespace, image, stream: bytes) -> dict:
    """Medians of the codec calls alone, in this process."""
    import torch

    from model.codec import Codec

    torch.set_num_threads(args.threads)
    if args.weights == "random":
        codec = Codec.random(
            backend=args.backend,
            synthesis_precision=args.synthesis_precision,
            analysis_precision=args.analysis_precision,
        )
    else:
        codec = Codec.from_pretrained(
            None if args.weights == "shipped" else args.weights,
            backend=args.backend,
            synthesis_precision=args.synthesis_precision,
            analysis_precision=args.analysis_precision,
        )
    calls = {
        "decompress": lambda: codec.decompress(stream),
        "compress": lambda: codec.compress(image, args.quality),
    }
    results = {}
    for operation in OPERATIONS:
        for _ in range(args.warmup):
            calls[operation]()
        times = []
        for _ in range(args.requests):
            started = time.perf_counter()
            calls[operation]()
            times.append(time.perf_counter() - started)
        results[operation] = times
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="shipped", help="shipped, random, or a weight file")
    parser.add_argument("--backend", default="torchscript", choices=("torch", "torchscript", "onnxruntime"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads, server and codec (default 2)")
    parser.add_argument("--quality", type=float, default=3.0)
    parser.add_argument("--synthesis-precision", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--analysis-precision", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--requests", type=int, default=20, help="timed requests per operation and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="rounds; each alternates HTTP and codec first")
    parser.add_argument("--out", type=Path, default=None, help="write http_path.{json,md} here")
    args = parser.parse_args(argv)

    from model.codec import Codec

    image = test_image(768, 512)
    png = encode(image)
    reference = (
        Codec.random()
        if args.weights == "random"
        else Codec.from_pretrained(None if args.weights == "shipped" else args.weights)
    )
    stream = reference.compress(image, args.quality)
    del reference
    http: dict[str, dict] = {op: {"latencies": [], "stages": []} for op in OPERATIONS}
    codec: dict[str, list[float]] = {op: [] for op in OPERATIONS}
    for round_ in range(args.rounds):
        order = ("http", "codec") if round_ % 2 == 0 else ("codec", "http")
        for part in order:
            print(f"round {round_}: {part}", flush=True)
            if part == "http":
                for op, res in time_http(args, png, stream).items():
                    http[op]["latencies"] += res["latencies"]
                    http[op]["stages"].append(res["stages"])
            else:
                for op, times in time_codec(args, image, stream).items():
                    codec[op] += times
    rows = []
    for op in OPERATIONS:
        stages = {
            stage: statistics.mean(r[stage] for r in http[op]["stages"] if stage in r)
            for stage in http[op]["stages"][0]
        }
        http_ms = statistics.median(http[op]["latencies"]) * 1e3
        codec_ms = statistics.median(codec[op]) * 1e3
        rows.append(
            {
                "operation": op,
                "http_p50_ms": http_ms,
                "codec_p50_ms": codec_ms,
                "overhead_ms": http_ms - codec_ms,
                "stages_ms": {k: v * 1e3 for k, v in stages.items()},
            }
        )
    meta = {
        "command": "python bench/http_path.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "settings": vars(args) | {"out": str(args.out)},
    }
    lines = [
        "# What HTTP adds to the codec at 768x512 (issue 39)",
        "",
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}; machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores",
        f"- Weights {args.weights}, backend {args.backend}, torch threads "
        f"{args.threads}, g_s {args.synthesis_precision}, g_a {args.analysis_precision}, "
        f"quality {args.quality:g}, "
        f"{args.rounds} rounds x {args.requests} sequential requests per operation (kodim23, PNG in and out)",
        "",
        "| operation | HTTP p50 ms | codec p50 ms | HTTP - codec ms | server stages, mean ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in row["stages_ms"].items())
        lines.append(
            f"| {row['operation']} | {row['http_p50_ms']:.1f} | {row['codec_p50_ms']:.1f} | "
            f"{row['overhead_ms']:.1f} | {stages} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "http_path.md").write_text(report)
        raw = {"meta": meta, "rows": rows, "http": http, "codec": codec}
        (args.out / "http_path.json").write_text(json.dumps(raw, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
