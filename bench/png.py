"""PNG encoders for /decompress output: time per image and bytes on the 24 Kodak images.

Run from the repository root with the venv active::

    python bench/png.py --out bench/results/png

Encoders: Pillow, level 1; libpng through imagecodecs with the SUB filter, level 1 and zlib's RLE
strategy (the service's writer until 2026-12-07); the SUB filter deflated by libdeflate's level 1 on
one thread (the writer until issue 39's subpixel commit); ISA-L at levels 1 and 3 on one thread; and
``service.formats.encode_png`` (SUB filter, ISA-L at its ``PNG_COMPRESS_LEVEL``, two parts on two
threads). Each image is encoded ``--runs`` times by every encoder, alternating; reported: the median
over images of each image's median time, the total bytes, and whether every PNG reads back (Pillow)
to the very pixels. Results: ``--out``/``png.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(1, str(ROOT))
from codec import machine  # noqa: E402
from isal import isal_zlib  # noqa: E402

from model.paths import KODAK_DIR  # noqa: E402
from service.formats import encode_png, png_file, png_filtered_rows  # noqa: E402

LEVEL = 1
"""The zlib-family level of the reference encoders (the service's before ISA-L)."""


def pillow(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=LEVEL)
    return buffer.getvalue()


def libpng_sub_rle(image: np.ndarray) -> bytes:
    return imagecodecs.png_encode(
        image,
        level=LEVEL,
        strategy=imagecodecs.PNG.STRATEGY.RLE,
        filter=imagecodecs.PNG.FILTER.SUB,
    )


def libdeflate_sub(image: np.ndarray) -> bytes:
    stream = imagecodecs.deflate_encode(png_filtered_rows(image), level=LEVEL)
    return png_file(image.shape[1], image.shape[0], stream)


def isal_sub(level: int) -> Callable[[np.ndarray], bytes]:
    def encode(image: np.ndarray) -> bytes:
        stream = isal_zlib.compress(png_filtered_rows(image), level)
        return png_file(image.shape[1], image.shape[0], stream)

    return encode


ENCODERS: dict[str, Callable[[np.ndarray], bytes]] = {
    "Pillow, level 1": pillow,
    "libpng, level 1, SUB filter, RLE strategy": libpng_sub_rle,
    "SUB filter, libdeflate level 1, one thread": libdeflate_sub,
    "SUB filter, ISA-L level 1, one thread": isal_sub(1),
    "SUB filter, ISA-L level 3, one thread": isal_sub(3),
    "service.formats.encode_png: SUB filter, ISA-L level 3, two parts on two threads": encode_png,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="encodes per image and encoder (default 5)")
    parser.add_argument("--limit", type=int, default=24, help="Kodak images (default all 24)")
    parser.add_argument("--out", type=Path, default=None, help="write png.{json,md} here")
    args = parser.parse_args(argv)

    files = sorted(KODAK_DIR.glob("kodim*.png"))[: args.limit]
    times: dict[str, list[float]] = {name: [] for name in ENCODERS}
    sizes = dict.fromkeys(ENCODERS, 0)
    exact = dict.fromkeys(ENCODERS, True)
    for file in tqdm(files, desc="images", leave=False):
        image = np.ascontiguousarray(np.asarray(Image.open(file).convert("RGB")))
        per_image: dict[str, list[float]] = {name: [] for name in ENCODERS}
        for _ in range(args.runs):
            for name, encoder in ENCODERS.items():
                start = time.perf_counter()
                data = encoder(image)
                per_image[name].append(time.perf_counter() - start)
        for name, encoder in ENCODERS.items():
            data = encoder(image)
            sizes[name] += len(data)
            exact[name] &= bool(np.array_equal(np.asarray(Image.open(io.BytesIO(data))), image))
            times[name].append(statistics.median(per_image[name]))
    meta = {
        "command": "python bench/png.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
    }
    rows = [
        {"encoder": n, "ms": statistics.median(times[n]) * 1e3, "mb": sizes[n] / 1e6, "exact": exact[n]}
        for n in ENCODERS
    ]
    lines = [
        "# PNG encoders on Kodak (issue 39)",
        "",
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}; machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores; "
        f"{len(files)} images, {args.runs} runs each",
        "",
        "| PNG encoder | ms per image (median) | total MB | reads back exactly |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r['encoder']} | {r['ms']:.1f} | {r['mb']:.2f} | {r['exact']} |" for r in rows]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "png.md").write_text(report)
        (args.out / "png.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0 if all(exact.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
