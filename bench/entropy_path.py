"""The reproducible entropy path (container version 2) against the float32 one (version 1).

Run from the repository root with the venv active, e.g.::

    python bench/entropy_path.py                                  # 24 Kodak images x 6 qualities
    python bench/entropy_path.py --limit 3 --qualities 3 --runs 3 --out /tmp/entropy-path

Rate-distortion: every Kodak image is compressed at every quality by a version-1 and a version-2
encoder (the same g_a and g_s: only the entropy parameters differ) and decoded; real bitstream
sizes and PSNR give the Kodak-average curves, the BD-rate of version 2 against version 1 (PCHIP
and cubic) and the per-quality changes. Speed: kodim23 (768x512) at quality 3 is decoded
``--runs`` times by each, and by version 2 on the PyTorch reference of its C kernels,
alternating, and the medians of the decode and of its stages (entropy parameters, range
decoding, g_s) are reported, then the same for encoding. ``--qualities``
with no value skips the rate-distortion part.
Results: ``--out``/``entropy_path.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(1, str(ROOT))
from codec import alternate, machine, median_ms, test_image  # noqa: E402

from model.bdrate import bd_rate  # noqa: E402
from model.metrics import bits_per_pixel, psnr  # noqa: E402
from model.paths import KODAK_DIR  # noqa: E402

STAGES = ("entropy_parameters", "entropy_coding", "synthesis")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--qualities", type=float, nargs="*", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--limit", type=int, default=24, help="Kodak images (default all 24)")
    parser.add_argument("--runs", type=int, default=15, help="timed calls per version")
    parser.add_argument("--out", type=Path, default=None, help="write entropy_path.{json,md} here")
    args = parser.parse_args(argv)

    import torch
    from PIL import Image

    from model import fixedpoint
    from model.codec import Codec

    torch.set_num_threads(args.threads)
    codecs = {v: Codec.from_pretrained(stream_version=v) for v in (1, 2)}
    files = sorted(KODAK_DIR.glob("kodim*.png"))[: args.limit]
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    rows = []
    for quality in args.qualities:
        bpp = {1: [], 2: []}
        dist = {1: [], 2: []}
        for image in tqdm(images, desc=f"quality {quality:g}", leave=False):
            for version, codec in codecs.items():
                stream = codec.compress(image, quality)
                bpp[version].append(bits_per_pixel(len(stream), *image.shape[:2]))
                dist[version].append(psnr(image, codec.decompress(stream)))
        row = {"quality": quality, "images": len(images)}
        for version in (1, 2):
            row[f"bpp_v{version}"] = statistics.mean(bpp[version])
            row[f"psnr_v{version}"] = statistics.mean(dist[version])
        row["rate_change_pct"] = (row["bpp_v2"] / row["bpp_v1"] - 1) * 100
        row["psnr_change_db"] = row["psnr_v2"] - row["psnr_v1"]
        rows.append(row)
    bd = {}
    if len(rows) >= 4:
        curve = lambda v, key: [r[f"{key}_v{v}"] for r in rows]  # noqa: E731
        for method in ("pchip", "cubic"):
            bd[method] = bd_rate(curve(2, "bpp"), curve(2, "psnr"), curve(1, "bpp"), curve(1, "psnr"), method)

    image = test_image(768, 512)
    streams = {v: codecs[v].compress(image, 3.0) for v in (1, 2)}

    def reference(call):  # version 2 on the PyTorch reference of the C kernels (the same bits)
        def run(t):
            with fixedpoint.reference_kernels():
                return call(t)

        return run

    decoders = {f"v{v}": lambda t, v=v: codecs[v].decompress_batch([streams[v]], timings=t) for v in (1, 2)}
    encoders = {f"v{v}": lambda t, v=v: codecs[v].compress_batch([image], 3.0, timings=t) for v in (1, 2)}
    decoders["v2ref"], encoders["v2ref"] = reference(decoders["v2"]), reference(encoders["v2"])
    samples = {
        "decode": alternate(decoders, args.runs, "decode"),
        "encode": alternate(encoders, args.runs, "encode"),
    }
    timing = {
        what: {v: median_ms(runs, "total") for v, runs in by_version.items()}
        for what, by_version in samples.items()
    }
    split = {v: {s: median_ms(runs, s) for s in STAGES} for v, runs in samples["decode"].items()}
    for v, runs in samples["encode"].items():
        split[v]["encode_entropy_parameters"] = median_ms(runs, "entropy_parameters")

    meta = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
        "threads": args.threads,
        **machine(),
    }
    report = {"meta": meta, "rows": rows, "bd_rate_pct": bd, "timing_ms": timing, "decode_split_ms": split}
    lines = [
        f"Entropy path, version 2 (reproducible) against version 1 (float32); {meta['cpu']}, "
        f"{args.threads} threads, {meta['date']}",
        "",
        "| quality | bpp v1 | bpp v2 | rate change | PSNR v1 | PSNR v2 | PSNR change |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['quality']:g} | {r['bpp_v1']:.4f} | {r['bpp_v2']:.4f} | {r['rate_change_pct']:+.3f} % "
            f"| {r['psnr_v1']:.3f} | {r['psnr_v2']:.3f} | {r['psnr_change_db']:+.4f} dB |"
        )
    if bd:
        lines += [
            "",
            f"BD-rate of version 2 against version 1: PCHIP {bd['pchip']:+.3f} %, cubic {bd['cubic']:+.3f} %",
        ]
    lines += [
        "",
        f"768x512 at quality 3, medians of {args.runs} alternating calls (ms):",
        "",
        "| | decode | entropy parameters | range decoding | g_s | encode | its entropy parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"v1": "version 1", "v2": "version 2 (C kernels)", "v2ref": "version 2 (PyTorch reference)"}
    for v, name in names.items():
        s = split[v]
        lines.append(
            f"| {name} | {timing['decode'][v]:.1f} | {s['entropy_parameters']:.1f} | "
            f"{s['entropy_coding']:.1f} | {s['synthesis']:.1f} | {timing['encode'][v]:.1f} | "
            f"{s['encode_entropy_parameters']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "entropy_path.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "entropy_path.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
