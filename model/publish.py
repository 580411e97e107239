"""Publishing weights: a training checkpoint becomes a shipped weight file and a manifest entry.

The weight file goes into ``model/weights`` under a name that carries the first 8 hex digits of
its sha256 (as CompressAI's zoo does); the manifest records its configuration, storage, training
run, Kodak rate-distortion points (from a ``lalic eval`` result) and a self-check: bytes and PSNR
of one Kodak image through the real codec, which ``tests/model/test_zoo.py`` re-runs. Loading
weights is :mod:`model.zoo`'s job; this module is for the people who train them.

    python -m model.publish CHECKPOINT --eval-json bench/results/eval-kodak/kodak-ours.json
    python -m model.publish --attach-eval bench/results/eval-kodak/kodak-ours.json --bd-rates ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from model.codec import Codec
from model.image import load_image
from model.metrics import bits_per_pixel, psnr
from model.paths import KODAK_DIR
from model.zoo import MANIFEST, WEIGHTS_DIR, load_network, read_manifest, save_weights, sha256_file


def publish(
    checkpoint: Path,
    eval_json: Path | None = None,
    name: str = "lalic-s",
    training: dict | None = None,
    half: bool = True,
    kodak_dir: Path = KODAK_DIR,
) -> dict:
    """Write inference weights from a training checkpoint into ``model/weights`` and the manifest.

    The file name carries the first 8 hex digits of its sha256 (as CompressAI's zoo does). Kodak
    rate-distortion points come from a ``lalic eval`` result file (``<dataset>-ours.json``); the
    self-check codes ``kodim23.png`` from ``kodak_dir``.
    """
    net = load_network(checkpoint)
    net.update()
    WEIGHTS_DIR.mkdir(parents=True, exist_ok=True)
    tmp = WEIGHTS_DIR / f"{name}.tmp"
    save_weights(net, tmp, half=half)
    digest = sha256_file(tmp)
    path = WEIGHTS_DIR / f"{name}-{digest[:8]}.pt"
    for old in WEIGHTS_DIR.glob(f"{name}-*.pt"):
        old.unlink()
    tmp.replace(path)
    entry: dict = {
        "name": name,
        "file": path.name,
        "sha256": digest,
        "bytes": path.stat().st_size,
        "storage": "float16 (entropy parameters, gains, decays in float32)" if half else "float32",
        "config": net.config.to_dict(),
        "qualities": list(net.qualities),
        "lambdas": list(net.config.lambdas),
        "training": training or {},
    }
    if eval_json is not None:
        entry["kodak"] = kodak_points(eval_json)
    entry["check"] = reference_point(path, kodak_dir)
    MANIFEST.write_text(json.dumps({"models": [entry]}, indent=2) + "\n")
    return entry


def kodak_points(eval_json: Path) -> dict:
    """Mean Kodak rate-distortion points from a ``lalic eval`` result file."""
    results = json.loads(Path(eval_json).read_text())
    r = results["results"]
    return {
        "images": 24,
        "qualities": results.get("settings", {}).get("values"),
        "bpp": r["bpp"],
        "psnr_rgb": r["psnr-rgb"],
        "ms_ssim_rgb": r.get("ms-ssim-rgb"),
        "source": "real bitstreams, lalic eval",
    }


def attach_eval(eval_json: Path, bd_rates: Path | None = None) -> dict:
    """Add Kodak points (and BD-rates) of the shipped weights to the manifest."""
    manifest = read_manifest()
    entry = manifest["models"][0]
    entry["kodak"] = kodak_points(eval_json)
    if bd_rates is not None:
        entry["kodak"]["bd_rate"] = json.loads(Path(bd_rates).read_text())
    MANIFEST.write_text(json.dumps(manifest, indent=2) + "\n")
    return entry


def reference_point(
    weights: Path, kodak_dir: Path = KODAK_DIR, image: str = "kodim23.png", quality: float = 3.0
) -> dict:
    """bpp and PSNR of one Kodak image through the real codec: the shipped weights' self-check."""
    img = load_image(Path(kodak_dir) / image)
    codec = Codec.from_pretrained(str(weights))
    data = codec.compress(img, quality)
    out = codec.decompress(data)
    return {
        "image": image,
        "quality": quality,
        "bytes": len(data),
        "bpp": bits_per_pixel(len(data), *img.shape[:2]),
        "psnr_rgb": float(psnr(np.asarray(img), np.asarray(out))),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m model.publish``: publish a checkpoint, or attach an evaluation to the manifest."""
    p = argparse.ArgumentParser(prog="python -m model.publish", description="Publish shipped weights.")
    p.add_argument("checkpoint", type=Path, nargs="?", help="training checkpoint or weight file")
    p.add_argument("--attach-eval", type=Path, help="only add this lalic eval result to the manifest")
    p.add_argument("--bd-rates", type=Path, help="with --attach-eval: the eval's bd-rate.json")
    p.add_argument("--eval-json", type=Path, help="lalic eval result of these weights (kodak-ours.json)")
    p.add_argument("--name", default="lalic-s")
    p.add_argument("--training", type=Path, help="JSON file describing the training run")
    p.add_argument("--float32", action="store_true", help="store float32 instead of float16")
    p.add_argument("--kodak", type=Path, default=KODAK_DIR, help=f"Kodak folder (default: {KODAK_DIR})")
    args = p.parse_args(argv)
    if args.attach_eval:
        entry = attach_eval(args.attach_eval, args.bd_rates)
        print(json.dumps(entry["kodak"], indent=2))
        return 0
    if args.checkpoint is None:
        p.error("a checkpoint is required unless --attach-eval is given")
    training = json.loads(args.training.read_text()) if args.training else None
    entry = publish(
        args.checkpoint, args.eval_json, args.name, training, half=not args.float32, kodak_dir=args.kodak
    )
    print(json.dumps({k: v for k, v in entry.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
