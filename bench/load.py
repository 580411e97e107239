"""Load test of the real REST service on loopback: throughput, latency percentiles, errors.

Run from the repository root with the venv active, e.g.::

    python bench/load.py                                  # 1, 4, 16, 64 clients x batching off/on
    python bench/load.py --concurrency 1 4 --duration 10 --endpoints decompress
    python bench/load.py --pause ~/.cache/lalic/train.pid # SIGSTOP a background job meanwhile

For each batching setting (``LALIC_MAX_BATCH_SIZE`` 1 and 8) the script starts the service
(``python -m service``) on a free loopback port with random lalic-s weights
(``LALIC_RANDOM_WEIGHTS=true``; ``--weights`` for a weight file), waits for ``/readyz``, then for
each endpoint and client count runs closed-loop clients (httpx, asyncio) for ``--duration``
seconds: every client sends its next request as soon as the previous one is answered.
``/compress`` gets a 768x512 PNG (Kodak kodim23) at quality 3; ``/decompress`` gets that image's
bitstream and returns PNG. Reported: successful requests per second, p50/p90/p95/p99 latency of
successful requests, and error counts by status. One extra overload run (64 clients, a queue of
``--overload-queue``) checks that the service sheds load with 503 instead of queueing without
bound. Results go to ``bench/results/load.{json,md}`` and ``load_latency.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from codec import Pauser, cpu_jiffies, machine, set_autogroup_nice, test_image  # noqa: E402

from model.malloc import MALLOC_ENVIRONMENT  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def service(args: argparse.Namespace, batch: int, queue: int | None = None):
    """Start ``python -m service`` with the given batching; yield its base URL; stop it."""
    port = free_port()
    env = {
        **os.environ,
        **MALLOC_ENVIRONMENT,
        "PYTHONPATH": str(ROOT),
        "LALIC_PORT": str(port),
        "LALIC_HOST": "127.0.0.1",
        "LALIC_MAX_BATCH_SIZE": str(batch),
        "LALIC_QUALITIES": str(int(args.quality)),
        "LALIC_LOG_LEVEL": "warning",
        "LALIC_BACKEND": args.backend,
    }
    if args.weights:
        env["LALIC_WEIGHTS"] = args.weights
    else:
        env["LALIC_RANDOM_WEIGHTS"] = "true"
    if queue is not None:
        env["LALIC_QUEUE_SIZE"] = str(queue)
    log = open(Path(args.out) / f"service-batch{batch}.log", "w")  # noqa: SIM115
    # own process group (to stop it with its children) but the same session: a new session would
    # be a new scheduler autogroup, outside --autogroup-nice
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        process_group=0,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + args.startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"service exited with {proc.returncode}; see {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"service not ready after {args.startup_timeout} s; see {log.name}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


async def load(
    url: str, endpoint: str, body: bytes, content_type: str, clients: int, duration: float, quality: float
) -> dict:
    """Closed-loop clients for ``duration`` s; returns latencies (s) of successes and status counts."""
    import httpx

    path = f"/compress?quality={quality:g}" if endpoint == "compress" else "/decompress"
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    stop = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one_client() -> None:
            while time.perf_counter() < stop:
                start = time.perf_counter()
                try:
                    r = await client.post(path, content=body, headers={"Content-Type": content_type})
                    key = str(r.status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                    r = None
                statuses[key] = statuses.get(key, 0) + 1
                if r is not None and r.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                elif r is not None and r.status_code == 503:
                    # a shed client waits as told (Retry-After, whole seconds), as well-behaved ones do
                    try:
                        wait = float(r.headers.get("retry-after", "1"))
                    except ValueError:
                        wait = 1.0
                    await asyncio.sleep(min(wait, max(0.0, stop - time.perf_counter())))

        begin = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - begin
    return {"latencies": latencies, "statuses": statuses, "elapsed": elapsed}


def summarize(res: dict) -> dict:
    lat = np.array(res["latencies"]) * 1e3
    pct = (lambda q: float(np.percentile(lat, q))) if lat.size else (lambda q: float("nan"))
    return {
        "ok": int(lat.size),
        "throughput": lat.size / res["elapsed"],
        "p50": pct(50),
        "p90": pct(90),
        "p95": pct(95),
        "p99": pct(99),
        "statuses": res["statuses"],
        "elapsed": res["elapsed"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 8], help="LALIC_MAX_BATCH_SIZE values"
    )
    parser.add_argument(
        "--endpoints", nargs="+", default=["compress", "decompress"], choices=["compress", "decompress"]
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per run (default 20)")
    parser.add_argument("--size", default="768x512", help="image size WIDTHxHEIGHT (default 768x512)")
    parser.add_argument("--quality", type=float, default=3.0)
    parser.add_argument("--backend", default="torchscript", choices=["torch", "torchscript", "onnxruntime"])
    parser.add_argument("--weights", help="weight file (default: random lalic-s weights)")
    parser.add_argument(
        "--overload-queue",
        type=int,
        default=8,
        help="queue size of the extra 64-client overload run (0 = skip)",
    )
    parser.add_argument("--only-overload", action="store_true", help="run the overload check only")
    parser.add_argument("--startup-timeout", type=float, default=300)
    parser.add_argument("--pause", metavar="PIDFILE", help="SIGSTOP this pid while testing (always resumed)")
    parser.add_argument(
        "--autogroup-nice",
        type=int,
        metavar="N",
        help="set this session's scheduler autogroup nice (e.g. -10) while testing",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    from PIL import Image
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    w, h = (int(v) for v in args.size.split("x"))
    image = test_image(w, h)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    png = buf.getvalue()
    pauser = Pauser(args.pause)
    set_autogroup_nice(args.autogroup_nice)
    plan = [] if args.only_overload else [(b, None) for b in args.batch_sizes]
    if args.overload_queue:
        plan.append((max(args.batch_sizes), args.overload_queue))
    rows = []
    with pauser.paused():
        for batch, queue in plan:
            with service(args, batch, queue) as url:
                import httpx

                stream = httpx.post(
                    f"{url}/compress?quality={args.quality:g}",
                    content=png,
                    headers={"Content-Type": "image/png"},
                    timeout=120,
                ).content
                bodies = {"compress": (png, "image/png"), "decompress": (stream, "application/x-lalic")}
                runs = (
                    [(e, c) for e in args.endpoints for c in args.concurrency]
                    if queue is None
                    else [(e, 64) for e in args.endpoints]
                )
                desc = f"batch {batch}" + (f", queue {queue}" if queue else "")
                for endpoint, clients in tqdm(runs, desc=desc):
                    body, ctype = bodies[endpoint]
                    asyncio.run(load(url, endpoint, body, ctype, 1, 2.0, args.quality))  # warm-up
                    busy0, total0 = cpu_jiffies()
                    res = asyncio.run(load(url, endpoint, body, ctype, clients, args.duration, args.quality))
                    busy1, total1 = cpu_jiffies()
                    row = summarize(res) | {
                        "batch": batch,
                        "queue": queue or "default",
                        "endpoint": endpoint,
                        "clients": clients,
                        "machine_busy": (busy1 - busy0) / (total1 - total0),
                    }
                    rows.append(row)
                    tqdm.write(
                        f"batch {batch} q {queue or 'default'} {endpoint:>10} x{clients:<3}: "
                        f"{row['throughput']:.2f} req/s, p50 {row['p50']:.0f} ms, "
                        f"p95 {row['p95']:.0f} ms, "
                        f"p99 {row['p99']:.0f} ms, statuses {row['statuses']}"
                    )
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "args": {k: v for k, v in vars(args).items()},
        "argv": sys.argv[1:] if argv is None else argv,
        "bytes": {"png": len(png)},
    }
    (out / "load.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Service load test",
        "",
        f"- Command: `python bench/load.py {' '.join(meta['argv'])}`",
        f"- Date: {meta['date']}; machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores",
        f"- Service: `python -m service`, backend {args.backend}, lalic-s "
        f"{'weights ' + args.weights if args.weights else 'random weights'}, quality {args.quality:g}; "
        f"load generator (httpx, asyncio) on the same machine; {args.duration:g} s closed-loop runs",
        f"- Requests: {args.size} PNG ({len(png):,} bytes) to `/compress`; its bitstream to `/decompress` "
        "(PNG out). Latency percentiles over successful requests; 'busy' = whole-machine CPU use",
        "",
        "| max batch | queue | endpoint | clients | req/s | p50 ms | p90 ms | p95 ms | p99 ms | statuses "
        "| busy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        st = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        lines.append(
            f"| {r['batch']} | {r['queue']} | {r['endpoint']} | {r['clients']} | "
            f"{r['throughput']:.2f} | {r['p50']:.0f} | {r['p90']:.0f} | {r['p95']:.0f} | {r['p99']:.0f} | "
            f"{st} | "
            f"{100 * r['machine_busy']:.0f} % |"
        )
    (out / "load.md").write_text("\n".join(lines) + "\n")
    plot(rows, out)
    print("\n".join(lines))
    return 0


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, endpoint in zip(axes, ("compress", "decompress"), strict=True):
        for batch in sorted({r["batch"] for r in rows}):
            pts = [
                (r["clients"], r["p50"], r["p95"])
                for r in rows
                if r["endpoint"] == endpoint and r["batch"] == batch and r["queue"] == "default"
            ]
            if not pts:
                continue
            c, p50, p95 = zip(*sorted(pts), strict=True)
            ax.plot(c, p50, marker="o", label=f"max batch {batch}: p50")
            ax.plot(c, p95, marker="x", linestyle="--", label=f"max batch {batch}: p95")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("latency ms")
        ax.set_title(f"/{endpoint}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "load_latency.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
