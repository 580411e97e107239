"""Shipped weights: ``model/weights/manifest.json`` names the weight files and their sha256.

A weight file is a ``torch.save`` of ``{"config": LalicConfig dict, "state_dict": ...}``;
floating-point tensors may be stored in float16 and are upcast to float32 on load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from model.configs import LalicConfig
from model.lalic import LALIC

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = WEIGHTS_DIR / "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest() -> dict:
    if not MANIFEST.exists():
        raise FileNotFoundError(f"no shipped weights: {MANIFEST} is missing")
    return json.loads(MANIFEST.read_text())


def default_weights() -> Path:
    """Path of the default shipped weight file, after checking its sha256 against the manifest."""
    entry = read_manifest()["models"][0]
    path = WEIGHTS_DIR / entry["file"]
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ValueError(f"{path} has sha256 {digest}, manifest says {entry['sha256']}")
    return path


def read_weights(path: str | Path) -> tuple[LalicConfig, dict[str, torch.Tensor]]:
    """Configuration and float32 state dict of a weight file (float16 storage allowed) or a checkpoint
    (of a ``lalic train --ema`` run: its moving average, not the last step's weights)."""
    blob = torch.load(path, map_location="cpu", weights_only=False)
    state = blob.get("ema") or blob.get("state_dict", blob.get("model"))
    if state is None or "config" not in blob:
        raise ValueError(f"{path} is not a LALIC weight file or checkpoint")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    return LalicConfig.from_dict(blob["config"]), state


def load_network(weights: str | Path | None = None) -> LALIC:
    """Build a LALIC network from a weight file (default: the shipped one) or a training checkpoint."""
    config, state = read_weights(Path(weights) if weights is not None else default_weights())
    net = LALIC(config)
    net.load_state_dict(state)
    return net


def save_weights(net: LALIC, path: Path, half: bool = True) -> None:
    """Write an inference weight file (entropy tables built; float16 storage when ``half``)."""
    keep32 = ("decay", "boost", "quantiles", "log_gain", "log_inverse_gain", "scale_table", "target")
    state = {}
    for k, v in net.state_dict().items():
        if half and v.is_floating_point() and not k.endswith(keep32):
            v = v.half()
        state[k] = v.cpu()
    torch.save({"config": net.config.to_dict(), "state_dict": state}, path)


def publish(
    checkpoint: Path,
    eval_json: Path | None = None,
    name: str = "lalic-s",
    training: dict | None = None,
    half: bool = True,
) -> dict:
    """Write inference weights from a training checkpoint into ``model/weights`` and the manifest.

    The file name carries the first 8 hex digits of its sha256 (as CompressAI's zoo does). Kodak
    rate-distortion points come from a ``lalic eval`` result file (``<dataset>-ours.json``).
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
    entry["check"] = reference_point(path)
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


def reference_point(weights: Path, image: str = "kodim23.png", quality: float = 3.0) -> dict:
    """bpp and PSNR of one Kodak image through the real codec: the shipped weights' self-check."""
    import numpy as np

    from model.codec import Codec
    from model.image import load_image
    from model.metrics import psnr

    kodak = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "kodak"
    img = load_image(kodak / image)
    codec = Codec.from_pretrained(str(weights))
    data = codec.compress(img, quality)
    out = codec.decompress(data)
    return {
        "image": image,
        "quality": quality,
        "bytes": len(data),
        "bpp": 8 * len(data) / (img.shape[0] * img.shape[1]),
        "psnr_rgb": float(psnr(np.asarray(img), np.asarray(out))),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m model.zoo", description="Publish shipped weights.")
    p.add_argument("checkpoint", type=Path, nargs="?", help="training checkpoint or weight file")
    p.add_argument("--attach-eval", type=Path, help="only add this lalic eval result to the manifest")
    p.add_argument("--bd-rates", type=Path, help="with --attach-eval: the eval's bd-rate.json")
    p.add_argument("--eval-json", type=Path, help="lalic eval result of these weights (kodak-ours.json)")
    p.add_argument("--name", default="lalic-s")
    p.add_argument("--training", type=Path, help="JSON file describing the training run")
    p.add_argument("--float32", action="store_true", help="store float32 instead of float16")
    args = p.parse_args(argv)
    if args.attach_eval:
        entry = attach_eval(args.attach_eval, args.bd_rates)
        print(json.dumps(entry["kodak"], indent=2))
        return 0
    if args.checkpoint is None:
        p.error("a checkpoint is required unless --attach-eval is given")
    training = json.loads(args.training.read_text()) if args.training else None
    entry = publish(args.checkpoint, args.eval_json, args.name, training, half=not args.float32)
    print(json.dumps({k: v for k, v in entry.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
