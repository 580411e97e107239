"""g_s and g_a in bfloat16 (and g_a exact) against float32: PSNR and rate changes on Kodak, and the times.

Run from the repository root with the venv active, e.g.::

    python bench/precision.py                        # shipped weights, torch, 24 images x 6 qualities
    python bench/precision.py --limit 4 --qualities 6 --out /tmp/precision

Every Kodak image is compressed per quality by a float32 codec (the network as trained: PyTorch's
BiWKV, ``fused_kernels=False``) and by one per g_a precision of ``--analysis-precisions`` (float32
and bfloat16 on the fused BiWKV kernel, and exact: the reproducible arithmetic of the entropy path;
``--unfused`` keeps PyTorch's BiWKV in these too).
The float32 stream is decoded by the float32 codec and by a bfloat16 one (``synthesis_precision``): per
quality, the mean and the worst PSNR change (bfloat16 minus float32, dB) and the largest pixel
difference. Each other encoder's stream is decoded in float32: per
quality, its rate change (total bytes) and mean PSNR change against the float32 encoder's. Then
kodim23 (768x512) at quality 3 is decoded and encoded ``--runs`` times by each codec, alternating,
and the medians of the calls and of g_s / g_a (the codec's ``synthesis`` / ``analysis`` timings)
are reported.
Results: ``--out``/``precision.{json,md}``.
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

from model.metrics import psnr  # noqa: E402
from model.paths import KODAK_DIR  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="torch", choices=("torch", "torchscript"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--qualities", type=float, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--limit", type=int, default=24, help="Kodak images (default all 24)")
    parser.add_argument("--runs", type=int, default=9, help="timed decodes per precision")
    parser.add_argument(
        "--analysis-precisions",
        nargs="+",
        default=["float32", "bfloat16", "exact"],
        help="g_a precisions compared with float32 (default %(default)s; float32 here: the fused kernel)",
    )
    parser.add_argument(
        "--unfused", action="store_true", help="PyTorch's BiWKV in the compared codecs too (no fused kernel)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write precision.{json,md} here")
    args = parser.parse_args(argv)

    import torch
    from PIL import Image

    from model.codec import Codec

    torch.set_num_threads(args.threads)
    fused = not args.unfused
    codecs = {
        "float32": Codec.from_pretrained(backend=args.backend, fused_kernels=False),
        "bfloat16": Codec.from_pretrained(
            backend=args.backend, synthesis_precision="bfloat16", fused_kernels=fused
        ),
    }
    encoders = {"float32": codecs["float32"]} | {
        p: Codec.from_pretrained(backend=args.backend, analysis_precision=p, fused_kernels=fused)
        for p in args.analysis_precisions
        if p != "float32"
    }
    compared = [p for p in args.analysis_precisions if p != "float32"]
    if "float32" in args.analysis_precisions:  # g_a in float32 on the fused kernel
        encoders["float32 fused"] = Codec.from_pretrained(backend=args.backend, fused_kernels=fused)
        compared.append("float32 fused")
    files = sorted(KODAK_DIR.glob("kodim*.png"))[: args.limit]
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    rows = []
    for quality in args.qualities:
        deltas, diffs = [], []
        encoded: dict[str, list[float]] = {p: [] for p in compared}
        sizes = dict.fromkeys(encoders, 0)
        for image in tqdm(images, desc=f"quality {quality:g}", leave=False):
            stream = codecs["float32"].compress(image, quality)
            reference = codecs["float32"].decompress(stream)
            fast = codecs["bfloat16"].decompress(stream)
            deltas.append(psnr(image, fast) - psnr(image, reference))
            diffs.append(int(np.abs(fast.astype(int) - reference.astype(int)).max()))
            sizes["float32"] += len(stream)
            for p in compared:
                other = encoders[p].compress(image, quality)
                encoded[p].append(psnr(image, codecs["float32"].decompress(other)) - psnr(image, reference))
                sizes[p] += len(other)
        rows.append(
            {
                "quality": quality,
                "mean_dpsnr_db": statistics.mean(deltas),
                "worst_dpsnr_db": min(deltas),
                "max_pixel_diff": max(diffs),
                "images": len(deltas),
                "encoders": {
                    p: {
                        "rate_change_pct": (sizes[p] / sizes["float32"] - 1) * 100,
                        "mean_dpsnr_db": statistics.mean(encoded[p]),
                        "worst_dpsnr_db": min(encoded[p]),
                    }
                    for p in compared
                },
            }
        )
    image = test_image(768, 512)
    stream = codecs["float32"].compress(image, 3.0)
    decodes = alternate(
        {p: lambda timings, c=c: c.decompress_batch([stream], timings) for p, c in codecs.items()}, args.runs
    )
    timing = {
        p: {"decode_ms": median_ms(decodes[p], "total"), "synthesis_ms": median_ms(decodes[p], "synthesis")}
        for p in codecs
    }
    encodes = alternate(
        {p: lambda timings, c=c: c.compress_batch([image], 3.0, timings) for p, c in encoders.items()},
        args.runs,
    )
    encode_timing = {
        p: {"encode_ms": median_ms(encodes[p], "total"), "analysis_ms": median_ms(encodes[p], "analysis")}
        for p in encoders
    }
    meta = {
        "command": "python bench/precision.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
    }
    lines = [
        "# g_s in bfloat16, g_a in other precisions, against float32 (issues 38 and 39)",
        "",
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}; machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores; "
        f"backend {args.backend}, {args.threads} torch threads, shipped weights; float32 reference: "
        f"PyTorch's BiWKV; the others: {'PyTorch' if args.unfused else 'the fused'} BiWKV",
        "",
        "| quality | images | mean PSNR change dB | worst dB | largest pixel difference |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['quality']:g} | {r['images']} | {r['mean_dpsnr_db']:+.4f} | {r['worst_dpsnr_db']:+.4f} | "
            f"{r['max_pixel_diff']} |"
        )
    lines += [
        "",
        f"Decode of kodim23 (768x512) at quality 3, median of {args.runs}, alternating:",
        "",
        "| g_s precision | decode ms | of which g_s ms |",
        "| --- | --- | --- |",
    ]
    for p, t in timing.items():
        lines.append(f"| {p} | {t['decode_ms']:.1f} | {t['synthesis_ms']:.1f} |")
    for p in compared:
        lines += [
            "",
            f"g_a in {p}: its streams decoded in float32, against the float32 encoder's:",
            "",
            "| quality | rate change | mean PSNR change dB | worst image dB |",
            "| --- | --- | --- | --- |",
        ]
        for r in rows:
            e = r["encoders"][p]
            lines.append(
                f"| {r['quality']:g} | {e['rate_change_pct']:+.3f} % | "
                f"{e['mean_dpsnr_db']:+.4f} | {e['worst_dpsnr_db']:+.4f} |"
            )
    lines += [
        "",
        f"Encode of kodim23 (768x512) at quality 3, median of {args.runs}, alternating:",
        "",
        "| g_a precision | encode ms | of which g_a ms |",
        "| --- | --- | --- |",
    ]
    for p, t in encode_timing.items():
        lines.append(f"| {p} | {t['encode_ms']:.1f} | {t['analysis_ms']:.1f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "precision.md").write_text(report)
        raw = {
            "meta": meta,
            "rows": rows,
            "timing": timing,
            "encode_timing": encode_timing,
            "times": {p: [s["total"] for s in runs] for p, runs in decodes.items()},
            "synthesis": {p: [s["synthesis"] for s in runs] for p, runs in decodes.items()},
            "encode_times": {p: [s["total"] for s in runs] for p, runs in encodes.items()},
            "analysis": {p: [s["analysis"] for s in runs] for p, runs in encodes.items()},
        }
        (args.out / "precision.json").write_text(json.dumps(raw, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
