"""Large images: tiled vs whole-image coding (rate, PSNR) and peak memory at 4K and 8K.

The test images are mosaics of Kodak photos (3840x2160 and 7680x4320), so the content is
photographic. Each measurement runs in a fresh subprocess so that its peak RSS
(``ru_maxrss``) is its own.

    python bench/tiling.py --quality 3            # 4K whole vs tiled, 8K tiled
    python bench/tiling.py --sizes 4k --quality 1 3 6
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from model.paths import KODAK_DIR  # noqa: E402

KODAK = KODAK_DIR
SIZES = {"4k": (2160, 3840), "8k": (4320, 7680)}


def mosaic(height: int, width: int) -> np.ndarray:
    from model.image import load_image

    photos = [load_image(p) for p in sorted(KODAK.glob("*.png"))]
    photos = [p if p.shape[0] == 512 else np.rot90(p).copy() for p in photos]  # all 512 x 768
    out = np.empty((height, width, 3), np.uint8)
    k = 0
    for top in range(0, height, 512):
        for left in range(0, width, 768):
            tile = photos[k % len(photos)]
            k += 1
            h, w = min(512, height - top), min(768, width - left)
            out[top : top + h, left : left + w] = tile[:h, :w]
    return out


def measure(size: str, quality: float, tiled: bool, weights: str | None) -> dict:
    """Runs in the child process: one encode + decode, returns rate, PSNR, times, peak RSS."""
    import model.tiling as tiling
    from model.codec import Codec
    from model.metrics import psnr

    if not tiled:
        tiling.MAX_TILE_PIXELS = 1 << 40
    image = mosaic(*SIZES[size])
    codec = Codec.from_pretrained(weights)
    start = time.perf_counter()
    data = codec.compress(image, quality)
    encode = time.perf_counter() - start
    start = time.perf_counter()
    out = codec.decompress(data)
    decode = time.perf_counter() - start
    return {
        "size": size,
        "quality": quality,
        "tiled": tiled,
        "bpp": 8 * len(data) / (image.shape[0] * image.shape[1]),
        "psnr": psnr(image, out),
        "encode_s": encode,
        "decode_s": decode,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["4k", "8k"], choices=sorted(SIZES))
    p.add_argument("--quality", nargs="+", type=float, default=[3.0])
    p.add_argument("--weights", help="weight file (default: shipped)")
    p.add_argument("--whole-8k", action="store_true", help="also try 8K without tiling (needs > 12 GB)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        size, q, tiled = args.child.split(",")
        print(json.dumps(measure(size, float(q), tiled == "1", args.weights)))
        return 0
    rows = []
    for size in args.sizes:
        for q in args.quality:
            modes = [True] + ([False] if size == "4k" or args.whole_8k else [])
            for tiled in modes:
                cmd = [sys.executable, __file__, "--child", f"{size},{q},{int(tiled)}"]
                if args.weights:
                    cmd += ["--weights", args.weights]
                env = {**os.environ, "PYTHONPATH": str(REPO)}
                res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| size | quality | mode | bpp | PSNR dB | encode s | decode s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mode = "tiled" if r["tiled"] else "whole"
        print(
            f"| {r['size']} | {r['quality']:g} | {mode} | {r['bpp']:.4f} | {r['psnr']:.3f} | "
            f"{r['encode_s']:.1f} | {r['decode_s']:.1f} | {r['peak_rss_gb']:.2f} |"
        )
    for size in args.sizes:
        for q in args.quality:
            pair = {r["tiled"]: r for r in rows if r["size"] == size and r["quality"] == q}
            if len(pair) == 2:
                rate = 100 * (pair[True]["bpp"] / pair[False]["bpp"] - 1)
                print(
                    f"{size} q{q:g}: tiling costs {rate:+.2f} % rate, "
                    f"{pair[True]['psnr'] - pair[False]['psnr']:+.3f} dB"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
