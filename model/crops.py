"""``python -m model.crops``: a compact, pre-cut training set for a machine that cannot read the
photos themselves (a lent GPU that receives only the checkout plus a few tens of MB).

Tiles are cut from the photos that hold one without upscaling, round-robin (one tile from every
photo before a second from any), at random grid cells (seeded), until a byte budget is spent. They
are written as JPEG quality 95 with 4:4:4 chroma (about 2.2x smaller than lossless WebP on
Urban100 and Sun-Hays80: 45.6 and 49.7 dB PSNR, far above the 28-35 dB the codec is trained for)
or as lossless WebP. ``lalic train --data OUT`` reads the folder like any other; ``index.json``
records where each tile came from. ``--eval-out`` also writes the top-left 512x512 crops of the
first Kodak images that ``lalic train``'s quick evaluation uses (for ``--kodak``; kept apart from
the training tiles, since Kodak is never trained on).
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from model.paths import KODAK_DIR, TRAIN_DATA_DIR
from model.train import crop_shape, find_images, parse_crop

FORMATS = {
    "jpeg": (".jpg", {"format": "JPEG", "quality": 95, "subsampling": 0}),
    "webp": (".webp", {"format": "WEBP", "lossless": True, "method": 4, "quality": 80}),
}


def encode_tile(tile: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    tile.save(buf, **FORMATS[fmt][1])
    return buf.getvalue()


def pack_crops(
    folders: list[Path],
    out: Path,
    tile: tuple[int, int] = (512, 512),
    budget_bytes: int = 40_000_000,
    fmt: str = "jpeg",
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Cut (height, width) tiles round-robin over the photos into ``out`` until ``budget_bytes``.

    Photos smaller than a tile are left out (``lalic train`` would have to upscale them). Each
    photo's tiles are distinct cells of its tile grid, in a seeded random order. Returns the
    index written to ``out/index.json``: one record per tile (file, source folder/name, box as
    left, top, width, height, bytes).
    """
    th, tw = tile
    rng = np.random.default_rng(seed)
    photos = []
    for path in find_images(folders):
        with Image.open(path) as im:
            w, h = im.size
        if h >= th and w >= tw:
            cells = [(r, c) for r in range(h // th) for c in range(w // tw)]
            photos.append((path, [cells[i] for i in rng.permutation(len(cells))], (h, w)))
    if not photos:
        raise SystemExit(f"no photo under {[str(f) for f in folders]} holds a {tw}x{th} tile")
    photos = [photos[i] for i in rng.permutation(len(photos))]
    out.mkdir(parents=True, exist_ok=True)
    suffix = FORMATS[fmt][0]
    index: list[dict] = []
    spent = 0
    bar = tqdm(total=budget_bytes, unit="B", unit_scale=True, desc="packing tiles", disable=not progress)
    for round_ in range(max(len(cells) for _, cells, _ in photos)):
        for path, cells, (h, w) in photos:
            if round_ >= len(cells):
                continue
            r, c = cells[round_]
            # centre the grid in the photo so that every cell is a full tile
            top, left = (h % th) // 2 + r * th, (w % tw) // 2 + c * tw
            with Image.open(path) as im:
                data = encode_tile(im.convert("RGB").crop((left, top, left + tw, top + th)), fmt)
            if spent + len(data) > budget_bytes:
                bar.close()
                return _write_index(out, index)
            name = f"{len(index):05d}{suffix}"
            (out / name).write_bytes(data)
            spent += len(data)
            bar.update(len(data))
            source = f"{path.parent.name}/{path.name}"  # Urban100 and Sun-Hays80 share file names
            index.append({"file": name, "source": source, "box": [left, top, tw, th], "bytes": len(data)})
    bar.close()
    return _write_index(out, index)


def _write_index(out: Path, index: list[dict]) -> list[dict]:
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def write_eval_crops(kodak: Path, out: Path, images: int = 2, size: int = 512) -> list[Path]:
    """The top-left ``size`` x ``size`` crops of the first Kodak images, as ``lalic train`` evaluates
    them, losslessly as PNG."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(kodak.glob("*.png"))[:images]:
        with Image.open(path) as im:
            crop = Image.fromarray(np.asarray(im.convert("RGB"))[:size, :size])
        crop.save(out / path.name)
        written.append(out / path.name)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.crops", description=__doc__)
    p.add_argument("--data", type=Path, nargs="+", default=[TRAIN_DATA_DIR], help="photo folder(s)")
    p.add_argument("--out", type=Path, required=True, help="folder for the tiles and index.json")
    p.add_argument("--tile", type=parse_crop, default=(512, 512), metavar="N|WxH", help="tile size (512)")
    p.add_argument("--budget-mb", type=float, default=40.0, help="total bytes of tiles, in MB (40)")
    p.add_argument(
        "--format", choices=sorted(FORMATS), default="jpeg", help="jpeg (q95, 4:4:4) or webp (lossless)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-out", type=Path, help="also write the quick-eval Kodak crops here")
    p.add_argument("--kodak", type=Path, default=KODAK_DIR)
    p.add_argument("--eval-images", type=int, default=2)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    index = pack_crops(
        args.data, args.out, crop_shape(args.tile), int(args.budget_mb * 1e6), args.format, args.seed,
        progress=not args.no_progress,
    )  # fmt: skip
    sources = len({r["source"] for r in index})
    total = sum(r["bytes"] for r in index)
    print(f"{len(index)} tiles from {sources} photos, {total / 1e6:.1f} MB in {args.out}")
    if args.eval_out is not None:
        crops = write_eval_crops(args.kodak, args.eval_out, args.eval_images)
        print(f"{len(crops)} Kodak evaluation crops in {args.eval_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
