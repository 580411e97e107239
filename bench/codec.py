"""Codec speed benchmark: LALIC per stage and per backend, learned and classical peers side by side.

Run from the repository root with the venv active, e.g.::

    python bench/codec.py                                   # everything (about 30-40 min on 2 cores)
    python bench/codec.py --sizes 768x512 --runs 5 --peers bmshj2018-hyperprior jpeg
    python bench/codec.py --pause ~/.cache/lalic/train.pid  # SIGSTOP a background job while timing
    python bench/codec.py --config lalic --sizes 768x512 --backends torch --peers  # the paper's model
    python bench/codec.py --backends torch+v1 torch torch+bf16 --peers bmshj2018-hyperprior  # variants

Every (codec, size) pair runs in its own subprocess, so its peak resident memory
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``) is its own. Each subprocess warms up once, then times
``--runs`` encodes and decodes of one photo (a Kodak image, cropped or resized to the size) and
reports the median and p90 of every stage. With ``--rounds N`` the whole list of subprocesses runs
N times over and each (codec, size) reports the median of its runs from all rounds: codecs timed
in one minute of a VM whose speed drifts between phases otherwise compare one phase with another.
The parent reads ``/proc/stat`` around each subprocess and reports how much CPU *other* processes
used meanwhile ("other load"): numbers taken while that is above ~5 % of the machine are not
trustworthy on a 2-core host.

A LALIC backend may carry modifiers after ``+``: ``v1`` writes (and decodes) container version 1,
the float32 entropy path of releases before 2026-12-06 (the default is version 2, the reproducible
path); ``bf16`` runs g_a and g_s in bfloat16 (``analysis_precision``, ``synthesis_precision``);
``exact`` runs g_a and h_a in the reproducible arithmetic (the same bytes from every machine);
``unfused`` keeps PyTorch's chunked BiWKV in g_a and g_s instead of the fused CPU kernel
(``fused_kernels=False``). So ``torch+v1+unfused`` is the codec as it was before issues 38 and 39,
and ``torch+bf16`` the fastest today.

LALIC stages (timers inside :class:`model.codec.Codec`): ``analysis`` (g_a with gain),
``hyper`` (h_a, z quantisation), ``entropy_parameters`` (h_s and the 10 context/parameter-network
passes; in decode it also includes z decoding setup), ``entropy_coding`` (range coding), and
``synthesis`` (g_s with inverse gain). Peers: CompressAI 1.2.8 (``bmshj2018-hyperprior``,
``mbt2018-mean``, ``cheng2020-anchor``; random weights, quality 3: N=128, M=192; timing does
not depend on the weights; cheng2020-anchor decodes pixel by pixel in Python, so it only runs
up to ``--slow-max-pixels``), and Pillow's JPEG (quality 85), WebP (80), AVIF (60, speed 6) and
JPEG XL (pillow-jxl-plugin, quality 80, effort 7) encoders and decoders.

Results go to ``--out`` (default ``bench/results``): ``codec.json`` (all raw times),
``codec.md`` (tables) and ``codec_time_vs_pixels.png``. Every subprocess gets
glibc's malloc tuning (:data:`model.malloc.MALLOC_ENVIRONMENT`), as the service's launcher does:
large tensor allocations are otherwise 5-8x slower on these VMs.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime as dt
import importlib.util
import io
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model.malloc import MALLOC_ENVIRONMENT  # noqa: E402
from model.paths import KODAK_DIR  # noqa: E402

KODAK = KODAK_DIR / "kodim23.png"
SIZES = ["512x512", "768x512", "1920x1080", "3840x2160"]
LALIC_BACKENDS = ["torch", "torchscript", "onnxruntime"]
PEERS = ["bmshj2018-hyperprior", "mbt2018-mean", "cheng2020-anchor", "jpeg", "webp", "avif", "jxl"]


# ------------------------------------------------------------------------------------ worker
def test_image(width: int, height: int) -> np.ndarray:
    """A photo of the requested size: Kodak kodim23 centre-cropped or resized (Lanczos)."""
    from PIL import Image

    if KODAK.exists():
        img = Image.open(KODAK).convert("RGB")
    else:  # synthetic fallback: smooth gradients plus texture
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:512, 0:768] / 768
        base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1) * 80 + 128
        img = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    if width <= img.width and height <= img.height:
        left, top = (img.width - width) // 2, (img.height - height) // 2
        img = img.crop((left, top, left + width, top + height))
    else:
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8).copy()


def _stub_compressai() -> None:
    """Import CompressAI's image models without its dataset/registry dependencies (torchvision,
    requests, pandas, torch_geometric): stub those, and skip ``compressai/__init__``."""
    for name in (
        "torchvision",
        "torchvision.transforms",
        "requests",
        "torch_geometric",
        "torch_geometric.transforms",
    ):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torch_geometric"].transforms = sys.modules["torch_geometric.transforms"]
    spec = importlib.util.find_spec("compressai")
    if spec is None:
        raise ImportError("compressai is not installed (pip install --no-deps compressai)")
    pkg = types.ModuleType("compressai")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.get_entropy_coder = lambda: "ans"
    pkg.available_entropy_coders = lambda: ["ans"]
    sys.modules["compressai"] = pkg
    models = types.ModuleType("compressai.models")
    models.__path__ = [str(Path(pkg.__path__[0]) / "models")]
    sys.modules["compressai.models"] = models


def _timed(fn, runs: int) -> tuple[list[float], object]:
    out = fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def alternate(
    calls: dict[str, Callable[[dict[str, float]], object]], runs: int, desc: str = "timing"
) -> dict[str, list[dict]]:
    """Call each of ``calls`` (it fills the codec's ``timings`` dict) ``runs`` times, the calls
    alternating so that all of them see the same machine, after one warm-up each: by name, the
    timings of every call with its whole duration under ``"total"`` (seconds). ``desc`` labels
    the progress bar."""
    from tqdm import tqdm

    for call in calls.values():
        call({})
    samples: dict[str, list[dict]] = {name: [] for name in calls}
    for _ in tqdm(range(runs), desc=desc, leave=False):
        for name, call in calls.items():
            timings: dict[str, float] = {}
            started = time.perf_counter()
            call(timings)
            timings["total"] = time.perf_counter() - started
            samples[name].append(timings)
    return samples


def median_ms(samples: list[dict], key: str) -> float:
    """The median of one timing of :func:`alternate`'s samples, in milliseconds."""
    return statistics.median(s[key] for s in samples) * 1e3


MODIFIERS = {
    "v1": {"stream_version": 1},
    "bf16": {"analysis_precision": "bfloat16", "synthesis_precision": "bfloat16"},
    "exact": {"analysis_precision": "exact"},
    "unfused": {"fused_kernels": False},
}
"""What a ``+modifier`` after a LALIC backend passes to :class:`model.codec.Codec`."""


def lalic_variant(spec: str) -> tuple[str, dict]:
    """``"torch+v1+bf16"`` -> (``"torch"``, the codec options of its modifiers)."""
    backend, *mods = spec.split("+")
    if backend not in LALIC_BACKENDS or any(m not in MODIFIERS for m in mods):
        raise argparse.ArgumentTypeError(
            f"{spec!r}: a backend of {LALIC_BACKENDS} with optional +modifiers of {sorted(MODIFIERS)}"
        )
    options: dict = {}
    for mod in mods:
        options.update(MODIFIERS[mod])
    return backend, options


def _variant_arg(spec: str) -> str:
    lalic_variant(spec)
    return spec


def run_lalic(
    backend: str, image: np.ndarray, runs: int, quality: float, threads: int, config: str = "lalic-s"
) -> dict:
    import torch

    from model.codec import Codec

    torch.set_num_threads(threads)
    backend, options = lalic_variant(backend)
    codec = Codec.random(config, seed=0, backend=backend, **options)
    data = codec.compress(image, quality)
    codec.decompress(data)
    enc: dict[str, list[float]] = {}
    dec: dict[str, list[float]] = {}
    for _ in range(runs):
        t: dict[str, float] = {}
        start = time.perf_counter()
        data = codec.compress_batch([image], quality, timings=t)[0]
        t["total"] = time.perf_counter() - start
        for k, v in t.items():
            enc.setdefault(k, []).append(v)
        t = {}
        start = time.perf_counter()
        codec.decompress_batch([data], timings=t)
        t["total"] = time.perf_counter() - start
        for k, v in t.items():
            dec.setdefault(k, []).append(v)
    return {"encode": enc, "decode": dec, "bytes": len(data)}


def run_compressai(name: str, image: np.ndarray, runs: int, threads: int) -> dict:
    import torch

    _stub_compressai()
    from compressai.models.google import MeanScaleHyperprior, ScaleHyperprior
    from compressai.models.waseda import Cheng2020Anchor

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cls = {
        "bmshj2018-hyperprior": ScaleHyperprior,
        "mbt2018-mean": MeanScaleHyperprior,
        "cheng2020-anchor": Cheng2020Anchor,
    }[name]
    net = (cls(128) if cls is Cheng2020Anchor else cls(128, 192)).eval()
    net.update(force=True)
    h, w = image.shape[:2]
    pad_h, pad_w = -h % 64, -w % 64
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255)
    x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    with torch.inference_mode():
        enc, out = _timed(lambda: net.compress(x), runs)
        dec, _ = _timed(lambda: net.decompress(out["strings"], out["shape"]), runs)
    size = sum(len(s) for group in out["strings"] for s in group)
    return {"encode": {"total": enc}, "decode": {"total": dec}, "bytes": size}


def run_pillow(name: str, image: np.ndarray, runs: int) -> dict:
    from PIL import Image

    if name == "jxl":
        import pillow_jxl  # noqa: F401  (registers the JXL plugin)
    fmt, opts = {
        "jpeg": ("JPEG", {"quality": 85}),
        "webp": ("WEBP", {"quality": 80, "method": 4}),
        "avif": ("AVIF", {"quality": 60, "speed": 6}),
        "jxl": ("JXL", {"quality": 80, "effort": 7}),
    }[name]
    pil = Image.fromarray(image)

    def encode() -> bytes:
        buf = io.BytesIO()
        pil.save(buf, format=fmt, **opts)
        return buf.getvalue()

    def decode(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))

    enc, data = _timed(encode, runs)
    dec, _ = _timed(lambda: decode(data), runs)
    return {"encode": {"total": enc}, "decode": {"total": dec}, "bytes": len(data)}


def worker(spec: dict) -> dict:
    w, h = spec["size"]
    image = test_image(w, h)
    name = spec["codec"]
    if name.startswith("lalic:"):
        backend = name.split(":", 1)[1]
        config = spec.get("config", "lalic-s")
        result = run_lalic(backend, image, spec["runs"], spec["quality"], spec["threads"], config)
    elif name in ("bmshj2018-hyperprior", "mbt2018-mean", "cheng2020-anchor"):
        result = run_compressai(name, image, spec["runs"], spec["threads"])
    else:
        result = run_pillow(name, image, spec["runs"])
    result["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# ------------------------------------------------------------------------------------ parent
def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


def set_autogroup_nice(nice: int | None) -> None:
    """Set the scheduler autogroup nice of this session (Linux autogroups: plain nice values do not
    weigh against processes of other sessions, so a background job elsewhere takes a whole core
    and two-thread OpenMP runs stall). Needs permission to lower it; restored at exit."""
    path = Path("/proc/self/autogroup")
    if nice is None or not path.exists():
        return
    before = path.read_text().split("nice")[-1].strip()
    try:
        path.write_text(str(nice))
    except OSError as exc:
        print(f"warning: cannot set autogroup nice: {exc}", file=sys.stderr)
        return
    atexit.register(lambda: path.write_text(before))


class Pauser:
    """SIGSTOP a background job (pid read from a file) while timing; always SIGCONT it again."""

    def __init__(self, pidfile: str | None) -> None:
        self.pid = int(Path(pidfile).expanduser().read_text().split()[0]) if pidfile else None
        self.stopped = False
        atexit.register(self.resume)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.resume()
        raise SystemExit(128 + signum)

    @contextlib.contextmanager
    def paused(self):
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGSTOP)
                self.stopped = True
        try:
            yield
        finally:
            self.resume()

    def resume(self) -> None:
        if self.pid and self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
            self.stopped = False


def run_child(spec: dict, pauser: Pauser, timeout: float) -> dict:
    env = {**os.environ, **MALLOC_ENVIRONMENT, "PYTHONPATH": str(ROOT)}
    env.setdefault("OMP_NUM_THREADS", str(spec["threads"]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    with pauser.paused():
        busy0, total0 = cpu_jiffies()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return {"error": f"timed out after {timeout:.0f} s"}
        elapsed = time.perf_counter() - start
        busy1, total1 = cpu_jiffies()
    if proc.returncode != 0:
        return {"error": err.decode(errors="replace").strip().splitlines()[-1:] or ["failed"]}
    result = json.loads(out.decode().strip().splitlines()[-1])
    ours = result.pop("cpu_seconds", 0.0)
    hz = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1
    other = max(0.0, (busy1 - busy0) / hz - ours) / (elapsed * ncpu)
    result["other_load"] = round(other, 3)
    result["wall_seconds"] = round(elapsed, 1)
    return result


def pool_rounds(rounds: list[dict]) -> dict:
    """One result from the runs of one codec and size in several rounds (``--rounds``): every
    stage's times together, the largest peak RSS, the mean other load; the first error if any."""
    failed = [r for r in rounds if "error" in r]
    if failed or len(rounds) == 1:
        return failed[0] if failed else rounds[0]
    pooled = dict(rounds[0])
    for direction in ("encode", "decode"):
        pooled[direction] = {
            stage: [t for r in rounds for t in r[direction][stage]] for stage in rounds[0][direction]
        }
    pooled["runs"] = sum(r["runs"] for r in rounds)
    pooled["rounds"] = len(rounds)
    pooled["maxrss_mb"] = max(r["maxrss_mb"] for r in rounds)
    pooled["other_load"] = round(statistics.mean(r["other_load"] for r in rounds), 3)
    pooled["wall_seconds"] = round(sum(r.get("wall_seconds", 0.0) for r in rounds), 1)
    return pooled


def stats(times: list[float]) -> tuple[float, float]:
    ms = sorted(1e3 * t for t in times)
    p90 = ms[min(len(ms) - 1, int(np.ceil(0.9 * len(ms))) - 1)]
    return statistics.median(ms), p90


def machine() -> dict:
    model = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("onnxruntime", "pillow", "pillow-jxl-plugin", "compressai", "constriction"):
        with contextlib.suppress(PackageNotFoundError):
            versions[dist] = version(dist)
    return {"cpu": model, "cores": os.cpu_count(), "versions": versions}


def ms(value: float) -> str:
    """Milliseconds with one decimal below 10 ms."""
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def fmt_row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write_report(results: list[dict], args: argparse.Namespace, meta: dict, out: Path) -> None:
    """``codec.md``: the run's settings, LALIC's stage times, the codecs side by side, and scaling."""
    by_key = {(r["codec"], r["size"]): r for r in results}
    lalic = [f"lalic:{b}" for b in args.backends]
    lines = _report_settings(args, meta)
    lines += _stage_tables(by_key, args.sizes, lalic)
    lines += _side_by_side(by_key, args.sizes, lalic + args.peers)
    lines += _scaling_table(by_key, args.sizes, lalic + args.peers)
    lines.append(_quietness([r["other_load"] for r in results if "other_load" in r]))
    if meta.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(meta["skipped"]) + "."]
    (out / "codec.md").write_text("\n".join(lines) + "\n")


Results = dict[tuple[str, str], dict]
"""Benchmark results by (codec, size)."""


def _report_settings(args: argparse.Namespace, meta: dict) -> list[str]:
    """The report's title and what was run, where and how."""
    return [
        "# Codec speed benchmark",
        "",
        f"- Command: `python bench/codec.py {' '.join(args.argv)}`",
        f"- Date: {meta['date']}",
        f"- Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores; "
        f"versions: {', '.join(f'{k} {v}' for k, v in meta['machine']['versions'].items())}",
        f"- LALIC: {getattr(args, 'config', 'lalic-s')}, random weights (seed 0), quality {args.quality:g}, "
        f"{args.threads} torch threads "
        "(the entropy-parameter path runs on its own pinned thread count, model.codec.ENTROPY_THREADS)",
        f"- Runs: {args.runs} timed runs after one warm-up (sizes above 2 MP: {args.large_runs}; "
        f"cheng2020-anchor: {args.slow_runs}){rounds_note(args)}; images above 4.2 MP are coded as "
        "2048-pixel tiles; median and p90 in ms; 'other load' = CPU used by other processes during the run, "
        "as a fraction of the machine",
        "",
    ]


def rounds_note(args: argparse.Namespace) -> str:
    """How the runs were spread (``--rounds``), for the report's header."""
    rounds = getattr(args, "rounds", 1)
    if rounds <= 1:
        return ""
    return f", in each of {rounds} rounds of every codec and size in turn, pooled"


STAGE_COLUMNS = ("analysis", "hyper", "entropy_parameters", "entropy_coding", "synthesis")
"""LALIC's stages in the order of the table's columns (the codec's timing keys)."""


def _stage_cell(timings: dict, stage: str) -> str:
    """Median milliseconds of one stage, or "-" where the direction has no such stage."""
    return f"{stats(timings[stage])[0]:.0f}" if stage in timings else "-"


def _stage_tables(by_key: Results, sizes: list[str], lalic: list[str]) -> list[str]:
    """Per size, LALIC's stage times for every backend, encode and decode."""
    lines: list[str] = []
    for size in sizes:
        lines += [
            f"## LALIC stages at {size}",
            "",
            fmt_row(
                [
                    "backend",
                    "direction",
                    "analysis",
                    "hyper",
                    "entropy params",
                    "range coding",
                    "synthesis",
                    "total (median / p90)",
                    "peak RSS MB",
                    "other load",
                ]
            ),
            fmt_row(["---"] * 10),
        ]
        for name in lalic:
            r = by_key.get((name, size))
            if r is None or "error" in r:
                lines.append(
                    fmt_row(
                        [name[6:], "-", "-", "-", "-", "-", "-", (r or {}).get("error", "skipped"), "-", "-"]
                    )
                )
                continue
            for direction in ("encode", "decode"):
                st = r[direction]
                med, p90 = stats(st["total"])
                lines.append(
                    fmt_row(
                        [
                            name[6:],
                            direction,
                            *(_stage_cell(st, stage) for stage in STAGE_COLUMNS),
                            f"**{med:.0f}** / {p90:.0f}",
                            f"{r['maxrss_mb']:.0f}",
                            f"{100 * r['other_load']:.0f} %",
                        ]
                    )
                )
        lines.append("")
    return lines


def _side_by_side(by_key: Results, sizes: list[str], names: list[str]) -> list[str]:
    """Every codec's total times, bytes and ratios to LALIC on torch, size by size."""
    lines = [
        "## Side by side (total ms, median; ratio = peer time / LALIC torch time)",
        "",
        fmt_row(
            [
                "codec",
                "size",
                "encode ms",
                "decode ms",
                "bytes",
                "encode ratio",
                "decode ratio",
                "peak RSS MB",
                "other load",
            ]
        ),
        fmt_row(["---"] * 9),
    ]
    for size in sizes:
        ref = by_key.get(("lalic:torch", size))
        ref_ok = ref is not None and "error" not in ref
        for name in names:
            r = by_key.get((name, size))
            if r is None:
                continue
            if "error" in r:
                lines.append(fmt_row([name, size, "-", "-", "-", "-", "-", "-", str(r["error"])[:60]]))
                continue
            enc, dec = stats(r["encode"]["total"])[0], stats(r["decode"]["total"])[0]
            if ref_ok:
                renc = enc / stats(ref["encode"]["total"])[0]
                rdec = dec / stats(ref["decode"]["total"])[0]
                ratios = [f"{renc:.2f}", f"{rdec:.2f}"]
            else:
                ratios = ["-", "-"]
            lines.append(
                fmt_row(
                    [
                        name,
                        size,
                        ms(enc),
                        ms(dec),
                        f"{r['bytes']:,}",
                        *ratios,
                        f"{r['maxrss_mb']:.0f}",
                        f"{100 * r['other_load']:.0f} %",
                    ]
                )
            )
    lines.append("")
    return lines


def _scaling_table(by_key: Results, sizes: list[str], names: list[str]) -> list[str]:
    """Time per megapixel at the largest size and the exponent of time against pixels."""
    lines = [
        "## Time per megapixel and scaling exponent",
        "",
        "Exponent b of time = a * pixels^b fitted over the sizes measured (1.0 = linear).",
        "",
        fmt_row(
            [
                "codec",
                "encode ms/MP (largest size)",
                "decode ms/MP (largest size)",
                "encode exponent",
                "decode exponent",
            ]
        ),
        fmt_row(["---"] * 5),
    ]
    for name in names:
        pts = [
            (px(size), by_key[(name, size)])
            for size in sizes
            if (name, size) in by_key and "error" not in by_key[(name, size)]
        ]
        if len(pts) < 1:
            continue
        row = [name]
        mp, r = pts[-1]
        row += [ms(stats(r[d]["total"])[0] / (mp / 1e6)) for d in ("encode", "decode")]
        for direction in ("encode", "decode"):
            if len(pts) >= 2:
                xs = np.log([p for p, _ in pts])
                ys = np.log([stats(r[direction]["total"])[0] for _, r in pts])
                row.append(f"{np.polyfit(xs, ys, 1)[0]:.2f}")
            else:
                row.append("-")
        lines.append(fmt_row(row))
    lines.append("")
    return lines


def _quietness(loads: list[float]) -> str:
    """How many runs had at most 5 % of the machine taken by other processes."""
    noisy = [x for x in loads if x > 0.05]
    return f"Quietness: {len(loads) - len(noisy)} of {len(loads)} runs had other load <= 5 %" + (
        f"; other load ranged {100 * min(loads):.0f}-{100 * max(loads):.0f} % "
        f"(median {100 * statistics.median(loads):.0f} %)."
        if loads
        else "."
    )


def px(size: str) -> int:
    w, h = (int(v) for v in size.split("x"))
    return w * h


def plot(results: list[dict], args: argparse.Namespace, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, direction in zip(axes, ("encode", "decode"), strict=True):
        for name in [f"lalic:{b}" for b in args.backends] + args.peers:
            pts = sorted(
                (px(r["size"]) / 1e6, stats(r[direction]["total"])[0] / 1e3)
                for r in results
                if r["codec"] == name and "error" not in r
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({px(size) / 1e6 for size in args.sizes})
        ax.set_xticks(ticks, [f"{t:.2f}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("megapixels")
        ax.set_title(f"{direction} time (median)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("seconds")
    axes[1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "codec_time_vs_pixels.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=SIZES, help="WIDTHxHEIGHT sizes (default: %(default)s)")
    parser.add_argument(
        "--backends",
        nargs="+",
        default=LALIC_BACKENDS,
        type=_variant_arg,
        help="LALIC backends, each with optional +v1 / +bf16 / +exact / +unfused modifiers "
        "(default: %(default)s)",
    )
    parser.add_argument("--peers", nargs="*", default=PEERS, choices=PEERS)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per codec and size (default 5)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every codec and size this many times, round by round, and pool their runs: on a VM "
        "whose speed drifts, each codec then sees every phase (default 1)",
    )
    parser.add_argument("--large-runs", type=int, default=2, help="timed runs above 2 megapixels (default 2)")
    parser.add_argument("--quality", type=float, default=3.0, help="LALIC quality (default 3)")
    parser.add_argument(
        "--config",
        default="lalic-s",
        help="LALIC configuration to time, random weights (default lalic-s; lalic: the paper's 65.6 M)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--slow-max-pixels",
        type=int,
        default=512 * 512,
        help="largest size for cheng2020-anchor, whose decoder is serial (default 512x512)",
    )
    parser.add_argument("--slow-runs", type=int, default=1, help="timed runs of cheng2020-anchor (default 1)")
    parser.add_argument(
        "--autogroup-nice",
        type=int,
        metavar="N",
        help="set this session's scheduler autogroup nice (e.g. -10) while benchmarking",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per codec and size")
    parser.add_argument("--pause", metavar="PIDFILE", help="SIGSTOP this pid while timing (always resumed)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="output folder")
    parser.add_argument(
        "--from-json", metavar="PATH", help="only re-render codec.md and the plot from a codec.json"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        for key, value in saved["args"].items():
            if key not in ("from_json", "out"):
                setattr(args, key, value)
        out = Path(args.out)
        write_report(saved["results"], args, saved["meta"], out)
        plot(saved["results"], args, out)
        print((out / "codec.md").read_text())
        return 0
    if args.worker:
        result = worker(json.loads(args.worker))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
        print(json.dumps(result))
        return 0
    args.argv = sys.argv[1:] if argv is None else argv
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pauser = Pauser(args.pause)
    set_autogroup_nice(args.autogroup_nice)
    jobs, skipped = [], []
    for size in args.sizes:
        w, h = (int(v) for v in size.split("x"))
        runs = args.large_runs if w * h > 2_000_000 else args.runs
        for name in [f"lalic:{b}" for b in args.backends] + args.peers:
            if name == "cheng2020-anchor" and w * h > args.slow_max_pixels:
                skipped.append(f"cheng2020-anchor at {size} (serial decoder; > --slow-max-pixels)")
                continue
            n = args.slow_runs if name == "cheng2020-anchor" else runs
            jobs.append(
                {
                    "codec": name,
                    "size": [w, h],
                    "runs": n,
                    "quality": args.quality,
                    "threads": args.threads,
                    "config": args.config,
                }
            )
    rounds: list[list[dict]] = [[] for _ in jobs]  # per job, its result in every round
    schedule = [(spec, mine) for _ in range(args.rounds) for spec, mine in zip(jobs, rounds, strict=True)]
    for spec, job_rounds in tqdm(schedule, desc="codec x size", unit="run"):
        r = run_child(spec, pauser, args.timeout)
        r.update(codec=spec["codec"], size=f"{spec['size'][0]}x{spec['size'][1]}", runs=spec["runs"])
        job_rounds.append(r)
        if "error" in r:
            summary = str(r["error"])
        else:
            enc, dec = stats(r["encode"]["total"])[0], stats(r["decode"]["total"])[0]
            summary = (
                f"enc {enc:.0f} ms, dec {dec:.0f} ms, {r['maxrss_mb']:.0f} MB, "
                f"other load {100 * r['other_load']:.0f} %"
            )
        tqdm.write(f"{r['codec']:>22} {r['size']:>10}: {summary}")
    results = [pool_rounds(job_rounds) for job_rounds in rounds]
    meta = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "skipped": skipped,
    }
    (out / "codec.json").write_text(
        json.dumps({"meta": meta, "args": vars(args) | {"argv": args.argv}, "results": results}, indent=1)
    )
    write_report(results, args, meta, out)
    plot(results, args, out)
    print((out / "codec.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
