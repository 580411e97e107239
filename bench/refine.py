"""Encoder-side latent refinement: rate-distortion gain and encode time per step count (issue 3).

Run from the repository root with the venv active, e.g.::

    python bench/refine.py --images /tmp/kodak6 --steps 0 10 25     # six Kodak images: about 45 min
    python bench/refine.py --limit 2 --qualities 1 6 --steps 0 5     # a quick look

Every step count is evaluated with :func:`model.evaluate.evaluate_codec` on real bitstreams (bpp
from the stream's length, PSNR and MS-SSIM of the decoded image, wall-clock encode and decode
times), with the shipped weights or ``--weights``. Each refined curve is compared with the first
step count given (normally 0, the plain encoder) by BD-rate (PCHIP and cubic on PSNR, PCHIP on
MS-SSIM dB; :mod:`model.bdrate`). ``--pause`` SIGSTOPs a background job (pid file) while it runs.

Results go to ``--out`` (default ``bench/results``): ``refine.json`` (every curve in CompressAI's
layout plus the BD-rates) and ``refine.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from codec import Pauser, machine  # noqa: E402

from model.bdrate import bd_rate  # noqa: E402
from model.codec import Codec  # noqa: E402
from model.evaluate import DEFAULT_IMAGES, evaluate_codec, list_images, non_negative_int  # noqa: E402


def bd_rates(test: dict, anchor: dict) -> dict[str, float]:
    """BD-rates (percent) of the ``test`` result against ``anchor`` (CompressAI layouts)."""
    t, a = test["results"], anchor["results"]
    return {
        "psnr_pchip": bd_rate(t["bpp"], t["psnr-rgb"], a["bpp"], a["psnr-rgb"], method="pchip"),
        "psnr_cubic": bd_rate(t["bpp"], t["psnr-rgb"], a["bpp"], a["psnr-rgb"], method="cubic"),
        "ms_ssim_db_pchip": bd_rate(t["bpp"], t["ms-ssim-db"], a["bpp"], a["ms-ssim-db"], method="pchip"),
    }


def markdown(report: dict) -> str:
    """The report as Markdown: one row per step count, then the per-level points."""
    anchor = report["steps"][0]
    lines = [
        f"# Latent refinement ({report['num_images']} images, qualities "
        f"{' '.join(f'{q:g}' for q in report['qualities'])})",
        "",
        f"- Command: `python bench/refine.py {' '.join(report['argv'])}`",
        f"- {report['date']}; {report['machine']['cpu']}, {report['machine']['cores']} cores, torch "
        f"{report['torch']}, {report['threads']} threads; weights {report['weights']}; images: "
        f"{', '.join(report['images'])}.",
        f"- BD-rates against {anchor} steps; times are medians over images and qualities.",
        "",
        "| steps | BD PSNR (PCHIP) | BD PSNR (cubic) | BD MS-SSIM dB | encode s | decode s |",
        "|---|---|---|---|---|---|",
    ]
    for steps, entry in zip(report["steps"], report["curves"], strict=True):
        bd = entry["bd_rate"]
        keys = ("psnr_pchip", "psnr_cubic", "ms_ssim_db_pchip")
        cells = [f"{bd[k]:+.2f} %" if bd else "" for k in keys]
        cells += [f"{entry['encode_s_median']:.2f}", f"{entry['decode_s_median']:.3f}"]
        lines.append(f"| {steps} | " + " | ".join(cells) + " |")
    lines += ["", "| steps | " + " | ".join(f"q{q:g} bpp / dB" for q in report["qualities"]) + " |"]
    lines.append("|---" * (len(report["qualities"]) + 1) + "|")
    for steps, entry in zip(report["steps"], report["curves"], strict=True):
        r = entry["result"]["results"]
        points = [f"{b:.4f} / {p:.3f}" for b, p in zip(r["bpp"], r["psnr-rgb"], strict=True)]
        lines.append(f"| {steps} | " + " | ".join(points) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images", default=str(ROOT / DEFAULT_IMAGES), metavar="DIR", help="image folder (default: Kodak)"
    )
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N images")
    parser.add_argument("--qualities", nargs="+", type=float, default=[1, 2, 3, 4, 5, 6], metavar="Q")
    parser.add_argument(
        "--steps",
        nargs="+",
        type=non_negative_int,
        default=[0, 10, 25],
        metavar="N",
        help="refinement step counts; the first is the anchor of the BD-rates (default: 0 10 25)",
    )
    parser.add_argument("--weights", default=None, metavar="PATH", help="weights (default: the shipped ones)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), metavar="DIR", help="output folder")
    parser.add_argument("--pause", metavar="PIDFILE", help="SIGSTOP this job while measuring")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    images = list_images(Path(args.images), args.limit)
    if not images:
        parser.error(f"no images in {args.images}")
    codec = Codec.from_pretrained(args.weights)
    curves = []
    with Pauser(args.pause).paused():
        for steps in args.steps:
            result = evaluate_codec(
                codec, images, args.qualities, progress=not args.no_progress, refine_steps=steps
            )
            records = result["per_image"]
            curves.append(
                {
                    "steps": steps,
                    "result": result,
                    "bd_rate": bd_rates(result, curves[0]["result"]) if curves else None,
                    "encode_s_median": statistics.median(r["encoding_time"] for r in records),
                    "decode_s_median": statistics.median(r["decoding_time"] for r in records),
                }
            )
    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "weights": codec.weights_digest,
        "images": [p.name for p in images],
        "num_images": len(images),
        "qualities": args.qualities,
        "steps": args.steps,
        "curves": curves,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "refine.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / "refine.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
