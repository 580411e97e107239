"""What fewer weight bits in the reproducible entropy path would cost in rate (issue 39).

The entropy path multiplies 14-bit weight mantissas (two int8 digits each: three digit products per
weight, :mod:`model.fixedpoint` rule 1). Weights of at most 7 bits would need two digit products, a
third fewer int8 multiply-accumulates per decode and encode, but a new container version. This
measures what such weights would cost before anyone builds that format: every weight the path
quantises (:func:`model.fixedpoint.quantize_weight`) is first rounded to ``--bits``-bit block
floating point per output channel; those values are exact in 14 bits, so the unchanged path then
computes exactly what a ``--bits``-bit path would. All Kodak images are compressed at each quality
with the shipped weights, and the total bytes are compared with the 14-bit path's.

Run from the repository root with the venv active::

    python bench/entropy_weight_bits.py --bits 7 8 --out bench/results/entropy-weight-bits

Results: ``--out``/``entropy_weight_bits.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(1, str(ROOT))
from codec import machine  # noqa: E402

from model import fixedpoint as fx  # noqa: E402
from model.paths import KODAK_DIR  # noqa: E402


def rounded_weights(bits: int):
    """A :func:`model.fixedpoint.quantize_weight` whose weights are first rounded to ``bits`` bits."""
    exact = fx.quantize_weight

    def quantize(weight):
        w = weight.detach().float()
        q, shift = fx.block_quantize(w, bits, tuple(range(1, w.dim())))
        return exact(q * fx.pow2(-shift))

    return quantize


def stream_bytes(bits: int, qualities: list[float], images: list[np.ndarray]) -> dict[float, int]:
    """Total Kodak bytes per quality with the path's weights rounded to ``bits`` bits (14: as shipped)."""
    from model.codecset import load_codec

    saved = fx.quantize_weight
    if bits < fx.MANTISSA_BITS:
        fx.quantize_weight = rounded_weights(bits)
    try:
        codec = load_codec(stream_version=2)  # the path's weights are quantised here, once
    finally:
        fx.quantize_weight = saved
    totals = {}
    for q in qualities:
        totals[q] = sum(len(codec.compress(im, q)) for im in tqdm(images, desc=f"{bits} bits, quality {q:g}"))
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[7, 8], help="weight bits to try (< 14)")
    parser.add_argument("--qualities", type=float, nargs="+", default=[1.0, 3.0, 6.0])
    parser.add_argument("--limit", type=int, default=None, help="first N Kodak images only")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/entropy-weight-bits")
    args = parser.parse_args(argv)
    if any(not 2 <= b < fx.MANTISSA_BITS for b in args.bits):
        parser.error(f"--bits must lie in 2..{fx.MANTISSA_BITS - 1}")

    import torch
    from PIL import Image

    files = sorted(KODAK_DIR.glob("kodim*.png"))[: args.limit]
    if not files:
        parser.error(f"no Kodak images in {KODAK_DIR}")
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        base = stream_bytes(fx.MANTISSA_BITS, args.qualities, images)
        by_bits = {bits: stream_bytes(bits, args.qualities, images) for bits in args.bits}
    finally:
        torch.set_num_threads(threads)
    rows = []
    for bits, totals in by_bits.items():
        for q in args.qualities:
            change = 100.0 * (totals[q] - base[q]) / base[q]
            rows.append(
                {
                    "bits": bits,
                    "quality": q,
                    "bytes": totals[q],
                    "bytes_14": base[q],
                    "rate_change_pct": change,
                }
            )
    command = "python bench/entropy_weight_bits.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {
        "command": command,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
    }
    meta["images"] = len(images)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "entropy_weight_bits.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n"
    )
    lines = [
        "# Entropy-path weights in fewer bits: rate change (issue 39)",
        "",
        f"- Command: `{command}`",
        f"- Date: {meta['date']}; machine: {meta['machine']['cpu']}",
        f"- {len(images)} Kodak images, shipped weights, the reproducible path (container version 2)",
        "",
        "| weight bits | quality | total bytes | 14-bit bytes | rate change |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['bits']} | {r['quality']:g} | {r['bytes']} | {r['bytes_14']} | {r['rate_change_pct']:+.2f} % |"
        for r in rows
    ]
    (args.out / "entropy_weight_bits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
