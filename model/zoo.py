"""Loading weights: the shipped ones (``model/weights/manifest.json`` names the files and their
sha256), any weight file written by ``lalic`` tools, and training checkpoints.

A weight file is a ``torch.save`` of ``{"config": LalicConfig dict, "state_dict": ...}``;
floating-point tensors may be stored in float16 and are upcast to float32 on load. Writing the
shipped weights and their manifest entry is :mod:`model.publish`'s job.

A weight *set* holds one fixed-rate network per quality (the official LALIC release is six
networks; ``lalic import``, :mod:`model.official`): a ``torch.save`` of ``{"format":
"lalic-weight-set", "version": 1, "config": LalicConfig dict, "members": [{"quality", "label",
"lambda", "state_dict"}, ...], "manifest": {...}}``, tensors in the dtype they were given in (float32
stays float32). :func:`read_weight_set` maps it lazily; :func:`load_network` returns it as a
:class:`WeightSet`, whose :meth:`WeightSet.network` builds one quality's network.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from model.bitstream import MAX_MODEL_ID
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


WEIGHT_SET_FORMAT = "lalic-weight-set"
WEIGHT_SET_VERSION = 1
LABEL = re.compile(r"[A-Za-z0-9._-]+")
"""What a weight-set member's label may hold (it becomes part of a model id in stream headers)."""


def _float32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


@dataclass(frozen=True)
class WeightSetMember:
    """One quality of a weight set: a fixed-rate network's state dict and what it was trained for."""

    quality: float
    """Position on the 1..6 quality scale (what requests and stream headers say)."""
    label: str
    """Short name, part of the network's model id (``lalic-q3``)."""
    lmbda: float
    """Rate-distortion lambda it was trained with."""
    state: dict[str, torch.Tensor]

    def model_id(self, config: LalicConfig) -> str:
        """The model id its streams carry: ``<config name>-<label>``."""
        return f"{config.name}-{self.label}"


@dataclass(frozen=True)
class WeightSet:
    """Per-quality networks of one configuration (fixed rate), with their provenance."""

    config: LalicConfig
    members: tuple[WeightSetMember, ...]
    manifest: dict

    def __post_init__(self) -> None:
        qualities = [m.quality for m in self.members]
        if not qualities or len(set(qualities)) != len(qualities):
            raise ValueError(f"a weight set needs distinct qualities, got {qualities}")
        for m in self.members:
            if not LABEL.fullmatch(m.label) or len(m.model_id(self.config)) > MAX_MODEL_ID:
                raise ValueError(
                    f"label {m.label!r} must be letters, digits, '.', '_' or '-' and keep the model id "
                    f"{m.model_id(self.config)!r} within {MAX_MODEL_ID} characters"
                )

    @property
    def qualities(self) -> tuple[float, ...]:
        return tuple(sorted(m.quality for m in self.members))

    def member(self, quality: float) -> WeightSetMember:
        """The member serving exactly ``quality`` (ValueError naming the qualities otherwise)."""
        for m in self.members:
            if m.quality == quality:
                return m
        served = ", ".join(f"{q:g}" for q in self.qualities)
        raise ValueError(f"quality {quality:g} is not in this weight set (qualities {served})")

    def network(self, quality: float) -> LALIC:
        """A new network for ``quality`` (float32), named with the member's model id."""
        m = self.member(quality)
        net = LALIC(replace(self.config, name=m.model_id(self.config)))
        net.load_state_dict(_float32(m.state))
        return net


def save_weight_set(weight_set: WeightSet, path: Path) -> None:
    """Write a weight set (tensors in their own dtypes)."""
    members = [
        {"quality": m.quality, "label": m.label, "lambda": m.lmbda, "state_dict": m.state}
        for m in weight_set.members
    ]
    blob = {
        "format": WEIGHT_SET_FORMAT,
        "version": WEIGHT_SET_VERSION,
        "config": weight_set.config.to_dict(),
        "members": members,
        "manifest": weight_set.manifest,
    }
    torch.save(blob, path)


def _weight_set(blob: object, path: str | Path) -> WeightSet | None:
    """The weight set in a loaded file, or None when it is not one."""
    if not isinstance(blob, dict) or blob.get("format") != WEIGHT_SET_FORMAT:
        return None
    if blob.get("version") != WEIGHT_SET_VERSION:
        raise ValueError(
            f"{path}: weight set version {blob.get('version')!r}, this code reads {WEIGHT_SET_VERSION}"
        )
    members = tuple(
        WeightSetMember(float(m["quality"]), str(m["label"]), float(m["lambda"]), m["state_dict"])
        for m in blob["members"]
    )
    return WeightSet(LalicConfig.from_dict(blob["config"]), members, dict(blob.get("manifest", {})))


def _load(path: str | Path, weights_only: bool = False) -> object:
    """``torch.load`` to the CPU, memory-mapped when the file is in torch's zip format (tensors are
    then read when used: a weight set of six networks is 1.6 GB in float32)."""
    return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=zipfile.is_zipfile(path))


def read_weight_set(path: str | Path) -> WeightSet:
    """The weight set in ``path`` (memory-mapped)."""
    weight_set = _weight_set(_load(path, weights_only=True), path)
    if weight_set is None:
        raise ValueError(f"{path} is not a LALIC weight set")
    return weight_set


def _single(blob: object, path: str | Path) -> tuple[LalicConfig, dict[str, torch.Tensor]]:
    """Configuration and float32 state dict of a loaded weight file or checkpoint."""
    weight_set = _weight_set(blob, path)
    if weight_set is not None:
        served = ", ".join(f"{q:g}" for q in weight_set.qualities)
        raise ValueError(
            f"{path} is a weight set of one network per quality ({served}): "
            "load it with model.zoo.load_network or Codec.from_pretrained"
        )
    if not isinstance(blob, dict):
        raise ValueError(f"{path} is not a LALIC weight file or checkpoint")
    state = blob.get("ema") or blob.get("state_dict", blob.get("model"))
    if state is None or "config" not in blob:
        raise ValueError(f"{path} is not a LALIC weight file or checkpoint")
    return LalicConfig.from_dict(blob["config"]), _float32(state)


def read_weights(path: str | Path) -> tuple[LalicConfig, dict[str, torch.Tensor]]:
    """Configuration and float32 state dict of a weight file (float16 storage allowed) or a checkpoint
    (of a ``lalic train --ema`` run: its moving average, not the last step's weights). A weight set
    is refused with a message saying how to load it."""
    return _single(_load(path), path)


def load_network(weights: str | Path | None = None) -> LALIC | WeightSet:
    """Build a LALIC network from a weight file (default: the shipped one) or a training checkpoint;
    a weight set (``lalic import``) is returned as a :class:`WeightSet`, whose networks are built per
    quality (:meth:`WeightSet.network`)."""
    path = Path(weights) if weights is not None else default_weights()
    blob = _load(path)
    weight_set = _weight_set(blob, path)
    if weight_set is not None:
        return weight_set
    config, state = _single(blob, path)
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
