"""Loading weights: the shipped ones (``model/weights/manifest.json`` names the files and their
sha256), any weight file written by ``lalic`` tools, and training checkpoints.

A weight file is a ``torch.save`` of ``{"config": LalicConfig dict, "state_dict": ...}``;
floating-point tensors may be stored in float16 and are upcast to float32 on load. Writing the
shipped weights and their manifest entry is :mod:`model.publish`'s job.
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
