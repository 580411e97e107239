"""What y's integer CDF tables cost over the exact Gaussian, per table layout (issue 3).

Run from the repository root with the venv active, e.g.::

    python bench/scale_tables.py --limit 3              # kodim01-03, q1/q3/q6: about a minute
    python bench/scale_tables.py --levels 64 128 256 --qualities 1 6

For each image and quality the real coding loop (:meth:`model.context.ContextModel.code`, the
shipped weights or ``--weights``) is run once and the continuous scale it predicts for every
symbol of y is recorded. The exact cost of a symbol is ``-log2 P`` under the discretised Gaussian
of that scale (:func:`model.entropy.gaussian_likelihood`, the training rate); a layout's cost is
``-log2 (freq / 2**16)`` from the 16-bit table the layout picks for the scale: ``levels``
log-spaced scales from 0.11 to 256 (:func:`model.entropy.scale_table`) and the rule ``ceil``
(the next larger table scale: CompressAI's, ours before 2026-12-03) or ``nearest`` (the nearest in
log scale: :meth:`model.entropy.GaussianConditional.indexes`). Symbols outside a table are
charged the overflow symbol plus 16 bits. Nothing here times anything.

Results go to ``--out`` (default ``bench/results``): ``scale-tables.json`` and ``scale-tables.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from codec import machine  # noqa: E402

from model.codec import Codec  # noqa: E402
from model.entropy import GaussianConditional, gaussian_likelihood  # noqa: E402
from model.evaluate import DEFAULT_IMAGES, list_images  # noqa: E402
from model.image import load_image  # noqa: E402

RULES = ("ceil", "nearest")


class Layout:
    """One table layout: ``levels`` tables and the rule that picks one for a scale."""

    def __init__(self, levels: int, rule: str) -> None:
        self.name = f"{levels} tables, {rule}"
        self.rule = rule
        self.gaussian = GaussianConditional(levels)
        self.tables = self.gaussian.tables()

    def indexes(self, scales: torch.Tensor) -> np.ndarray:
        if self.rule == "nearest":
            return self.gaussian.indexes(scales).numpy().astype(np.int64)
        table = self.gaussian.scale_table
        return torch.bucketize(scales.contiguous(), table).clamp_max(len(table) - 1).numpy().astype(np.int64)

    def bits(self, symbols: np.ndarray, scales: torch.Tensor) -> float:
        """Bits of ``symbols`` coded with the tables this layout picks for ``scales``."""
        return self.tables.information_bits(symbols, self.indexes(scales), escape_bits=16)


def coding_loop_scales(
    codec: Codec, image: np.ndarray, quality: float
) -> list[tuple[np.ndarray, torch.Tensor]]:
    """(symbols, continuous scales) of every pass of y, from the codec's own coding loop."""
    latents = codec.encoder_latents(image, quality)
    return [(sym[0].numpy(), s[0]) for (sym, _), s in zip(latents["passes"], latents["scales"], strict=True)]


def measure(
    codec: Codec, images: list[Path], qualities: list[float], layouts: list[Layout], progress: bool
) -> dict:
    rows = {}
    for q in qualities:
        exact, pixels = 0.0, 0
        bits = {layout.name: 0.0 for layout in layouts}
        for path in tqdm(images, desc=f"q{q:g}", disable=not progress):
            image = load_image(path)
            pixels += image.shape[0] * image.shape[1]
            for symbols, scales in coding_loop_scales(codec, image, q):
                s = scales.double()
                exact += float(
                    -torch.log2(gaussian_likelihood(torch.from_numpy(symbols).double(), s, 0 * s)).sum()
                )
                for layout in layouts:
                    bits[layout.name] += layout.bits(symbols, scales)
        rows[f"{q:g}"] = {
            "exact_bpp": exact / pixels,
            "overhead_percent": {name: 100 * (b / exact - 1) for name, b in bits.items()},
        }
    return rows


def markdown(report: dict) -> str:
    names = list(next(iter(report["qualities"].values()))["overhead_percent"])
    lines = [
        "# Cost of y's integer tables over the exact Gaussian",
        "",
        f"- Command: `{report['command']}`",
        f"- {report['date']}; {report['machine']['cpu']}, {report['machine']['cores']} cores, torch "
        f"{report['machine']['versions']['torch']}",
        f"- Weights: {report['weights']}; images: {report['images']}",
        "",
        "| quality | exact y bpp | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for q, row in report["qualities"].items():
        cells = " | ".join(f"{row['overhead_percent'][n]:+.3f} %" for n in names)
        lines.append(f"| q{q} | {row['exact_bpp']:.4f} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--images", type=Path, default=ROOT / DEFAULT_IMAGES, help="folder of images (default: Kodak)"
    )
    p.add_argument("--limit", type=int, default=3, help="use only the first N images (default 3)")
    p.add_argument("--qualities", type=float, nargs="+", default=[1.0, 3.0, 6.0])
    p.add_argument(
        "--levels", type=int, nargs="+", default=[64, 96, 128, 256], help="table counts to compare"
    )
    p.add_argument("--weights", help="weights (default: the shipped ones)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    images = list_images(args.images)[: args.limit]
    codec = Codec.from_pretrained(args.weights)
    layouts = [Layout(n, rule) for n in args.levels for rule in RULES]
    report = {
        "command": "python bench/scale_tables.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "weights": f"{codec.model_id}@{codec.weights_digest}",
        "images": ", ".join(path.stem for path in images),
        "qualities": measure(codec, images, args.qualities, layouts, not args.no_progress),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale-tables.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / "scale-tables.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
