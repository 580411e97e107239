"""Decode time on a worker thread when another thread of the process has run OpenMP work too.

Run from the repository root with the venv active::

    python bench/omp_masters.py --runs 20

Each case runs in a fresh process: the codec (shipped weights, torchscript, bfloat16 g_a and g_s)
loads, warms up and decodes kodim23 at quality 3 ``--runs`` times on one worker thread; in the case
``main thread ran OpenMP first`` the main thread first runs one 2-thread PyTorch ``add`` on a million
floats. Cases alternate ``--repeats`` times; reported: the median decode of each process.
(libgomp keeps one thread pool per thread that starts parallel regions; with more pool threads
than cores it stops spinning between regions, and every small region pays a wake-up.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {"worker thread only": False, "main thread ran OpenMP first": True}


def child(main_first: bool, runs: int) -> None:
    """Decode on a worker thread and print the median in ms (JSON)."""
    from model.malloc import tune_malloc

    tune_malloc()
    import torch

    if main_first:
        torch.set_num_threads(2)
        torch.randn(1_000_000).add(1.0)
    result: dict[str, float] = {}

    def work() -> None:
        import numpy as np
        from PIL import Image

        from model.codec import Codec
        from model.paths import KODAK_DIR

        torch.set_num_threads(2)
        image = np.asarray(Image.open(KODAK_DIR / "kodim23.png").convert("RGB"))
        codec = Codec.from_pretrained(
            backend="torchscript", synthesis_precision="bfloat16", analysis_precision="bfloat16"
        )
        stream = codec.compress(image, 3.0)
        for _ in range(3):
            codec.decompress(stream)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            codec.decompress(stream)
            times.append(time.perf_counter() - start)
        result["decode_ms"] = statistics.median(times) * 1e3

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="timed decodes per process")
    parser.add_argument("--repeats", type=int, default=2, help="processes per case, alternating")
    parser.add_argument("--child", choices=("0", "1"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child == "1", args.runs)
        return 0
    results: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.repeats):
        for name, main_first in CASES.items():
            cmd = [sys.executable, __file__, "--child", str(int(main_first)), "--runs", str(args.runs)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1])["decode_ms"])
    for name, values in results.items():
        print(f"{name}: decode medians {', '.join(f'{v:.1f}' for v in values)} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
