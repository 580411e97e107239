"""The service without the fused kernels of g_a and g_s (model._transform_kernels not built)."""

from __future__ import annotations

import numpy as np

from model import transform_kernels
from model.layers import SpatialMix
from service.engine import Engine
from service.metrics import Metrics
from service.settings import Settings


def test_service_warns_and_runs_without_the_extension(monkeypatch, caplog) -> None:
    """A checkout whose extension was not built still serves (PyTorch's BiWKV), and says so."""
    monkeypatch.setattr(transform_kernels, "_native", None)
    engine = Engine(Settings(random_weights=True, device="cpu", backend="torch"), Metrics())
    with caplog.at_level("WARNING", logger="service.engine"):
        codec = engine._create_codec()
    assert "model._transform_kernels is not built" in caplog.text
    modules = codec._stages.runners["synthesis"].module.modules()
    assert not any(m.fused for m in modules if isinstance(m, SpatialMix))
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    assert codec.decompress(codec.compress(image, 3.0)).shape == (64, 64, 3)
