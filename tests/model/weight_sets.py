"""Small weight sets for tests: random fixed-rate ``lalic-s`` networks, one per quality."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from model.configs import get_config
from model.lalic import LALIC
from model.zoo import WeightSet, WeightSetMember, save_weight_set


def write_weight_set(path: Path, qualities: Sequence[int], seed: int = 0) -> Path:
    """A weight set at ``path``: for each quality a fixed-rate ``lalic-s`` network drawn with seed
    ``seed + quality``, labelled ``q<quality>`` with the quality's lambda."""
    config = get_config("lalic-s", variable_rate=False)
    members = []
    for quality in qualities:
        torch.manual_seed(seed + quality)
        net = LALIC(config)
        net.update()
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        members.append(WeightSetMember(float(quality), f"q{quality}", config.lambdas[quality - 1], state))
    save_weight_set(WeightSet(config, tuple(members), {"members": [{"sha256": "test"}]}), path)
    return path
