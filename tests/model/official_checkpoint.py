"""A synthetic official LALIC checkpoint: the official names and shapes, random values.

The names and shapes come from ``../shared/reference/lalic-official/official-state-dict-layout.json``
(the official model's ``state_dict()``, 1 623 entries); no official weights exist here. Every tensor
is drawn from its own seed, so no two are alike and a tensor landing in the wrong place is seen, at
magnitudes that keep the network's activations finite. What the official code derives is filled
the way it holds it: CompressAI's bounds and the prior's target, checkerboard masks, ``h_a``/``h_s``
copies under ``latent_codec.hyper`` (the same modules upstream), empty CDF tables (before
``update()``), and arbitrary folded Omni-Shift kernels (the official code refolds them on its
first eval call).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "lalic-official"
LAYOUT = REFERENCE / "official-state-dict-layout.json"
HYPER = "latent_codec.hyper."
SHARED = (HYPER + "h_a.", HYPER + "h_s.")
TABLES = ("_quantized_cdf", "_offset", "_cdf_length")


def official_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the official state dict and its shape, in the official order."""
    return {k: tuple(v) for k, v in json.loads(LAYOUT.read_text())["keys"].items()}


def _value(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A random tensor for ``key`` at a magnitude suited to what it is."""
    last = key.rsplit(".", 1)[-1]
    randn = torch.randn(shape, generator=generator)
    if key.endswith(("bound", "scale_bound")):
        value = 0.11 if "scale" in key else 1e-9  # CompressAI: scale bound 0.11, likelihood bound 1e-9
        return torch.full(shape, value)
    if key.endswith("entropy_bottleneck.target"):
        target = math.log(2 / 1e-9 - 1)  # CompressAI: tail mass 1e-9
        return torch.tensor([-target, 0.0, target])
    if key.endswith(".mask"):
        taps = torch.arange(shape[-1])
        return ((taps[:, None] + taps[None, :]) % 2 == 1).float().expand(shape).clone()
    if last in TABLES:
        return torch.zeros(shape, dtype=torch.int32)
    if last == "scale_table":
        return torch.zeros(shape)
    if last == "quantiles":
        return torch.tensor([-10.0, 0.0, 10.0]) + 0.3 * randn
    if ".entropy_bottleneck." in key:  # matrices, biases, factors of the factorised prior
        return 0.5 * randn
    if last in ("decay", "boost", "alpha"):
        return randn
    if last in ("gamma1", "gamma2"):
        return 0.3 + 0.05 * randn
    if ("ln" in key.rsplit(".", 2)[-2] or ".norm." in key) and last == "weight":
        return 1 + 0.1 * randn
    if last == "bias" or len(shape) == 1:
        return 0.05 * randn
    fan_in = math.prod(shape[1:])
    return randn / math.sqrt(fan_in)


def synthetic_checkpoint(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A state dict with the official keys, shapes and order (floating tensors in ``dtype``)."""
    shapes = official_shapes()
    values: dict[str, torch.Tensor] = {}
    for index, (key, shape) in enumerate(shapes.items()):
        if not key.startswith(SHARED):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
            value = _value(key, shape, generator)
            values[key] = value.to(dtype) if value.is_floating_point() else value
    copies = {k: values[k.removeprefix(HYPER)].clone() for k in shapes if k.startswith(SHARED)}
    return {k: values[k] if k in values else copies[k] for k in shapes}
