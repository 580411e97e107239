"""The network: configurations, the paper model on CPU, training forward, variable-rate gains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.codec import Codec
from model.configs import CONFIGS, LalicConfig, get_config
from model.context import ramp_widths
from model.lalic import LALIC


def test_paper_configuration_parameter_count() -> None:
    net = LALIC(get_config("lalic"))
    count = sum(p.numel() for p in net.parameters())
    assert abs(count - 65.6e6) / 65.6e6 < 0.02, count
    assert not net.config.variable_rate


def test_paper_model_runs_on_cpu() -> None:
    torch.manual_seed(0)
    net = LALIC(get_config("lalic"))
    x = torch.rand(1, 3, 64, 64)
    out = net(x)
    assert out["x_hat"].shape == x.shape
    assert out["likelihoods"]["y"].shape == (1, 320, 4, 4)
    assert out["likelihoods"]["z"].shape == (1, 192, 1, 1)
    codec = Codec(net)
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    data = codec.compress(image, 6)
    assert codec.read_header(data).model_id == "lalic"
    assert codec.decompress(data).shape == (64, 64, 3)


def test_training_forward_gives_gradients_everywhere() -> None:
    torch.manual_seed(0)
    net = LALIC(get_config("lalic-s")).train()
    x = torch.rand(2, 3, 128, 128)
    out = net(x, torch.tensor([1.0, 6.0]))
    lik = out["likelihoods"]
    assert set(lik) == {"y", "z"}
    for v in lik.values():
        assert ((v > 0) & (v <= 1)).all()
    bpp = sum(-torch.log2(v).sum() for v in lik.values()) / (2 * 128 * 128)
    loss = bpp + 0.01 * (out["x_hat"] - x).square().mean()
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None and not n.endswith("quantiles")]
    assert not missing, missing
    assert net.aux_loss().item() > 0


def test_rounded_rate_in_training_is_the_coded_rate_and_keeps_gradients() -> None:
    """``noise=False``: in training mode the likelihoods are those of the rounded latents, the
    same as in eval mode (what the coder pays), and the entropy model still gets gradients."""
    torch.manual_seed(0)
    net = LALIC(get_config("lalic-s"))
    x = torch.rand(1, 3, 64, 64)
    q = torch.tensor([2.0])
    coded = net.eval()(x, q)["likelihoods"]  # grad on in both: the same (float64-decay) BiWKV path
    net.train()
    rounded = net(x, q, noise=False)
    for name in ("y", "z"):
        assert torch.equal(rounded["likelihoods"][name], coded[name])
    torch.manual_seed(1)
    noisy = net(x, q)["likelihoods"]
    assert not torch.equal(noisy["y"], coded["y"])
    bits = sum(-torch.log2(v).sum() for v in rounded["likelihoods"].values())
    bits.backward()
    for prefix in ("context.", "h_s.", "h_a.", "entropy_bottleneck.matrices"):
        grads = [p.grad for n, p in net.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None for g in grads), prefix
        assert sum(float(g.abs().sum()) for g in grads) > 0, prefix


def test_gains_interpolate_geometrically() -> None:
    net = LALIC(get_config("lalic-s"))
    g2, g25, g3 = (net.gain(torch.tensor([q])) for q in (2.0, 2.5, 3.0))
    assert torch.allclose(g25, (g2 * g3).sqrt(), rtol=1e-5)
    assert torch.allclose(net.gain(torch.tensor([6.0])), torch.exp(net.log_gain[5])[None, :, None, None])


def test_configs_are_consistent() -> None:
    for name, cfg in CONFIGS.items():
        assert cfg.name == name
        assert sum(cfg.slices) == cfg.latent
        assert len(cfg.lambdas) == 6


def test_parameter_network_widths_round_as_configured() -> None:
    """``lalic`` rounds the ramp down like the official code (CompressAI's sequential_channel_ramp);
    every other configuration, and every stored config without the field, rounds to nearest."""
    assert ramp_widths(384, 32, 256, "floor") == (266, 256)  # 266.67, 149.33
    assert ramp_widths(384, 32, 256, "nearest") == (267, 256)
    assert ramp_widths(576, 128, 256, "floor") == (426, 277)  # 426.67, 277.33
    assert ramp_widths(576, 128, 256, "nearest") == (427, 277)
    assert ramp_widths(1088, 384, 256, "floor") == (853, 618)  # 853.33, 618.67
    assert ramp_widths(1088, 384, 256, "nearest") == (853, 619)
    assert ramp_widths(448, 64, 256, "floor") == ramp_widths(448, 64, 256, "nearest") == (320, 256)
    assert get_config("lalic").param_width_rounding == "floor"
    assert get_config("lalic-s").param_width_rounding == "nearest"
    stored = get_config("lalic").to_dict()
    del stored["param_width_rounding"]  # a config written before the field existed
    assert LalicConfig.from_dict(stored).param_width_rounding == "nearest"
    message = r"param_width_rounding must be one of \('nearest', 'floor'\), got 'up'"
    with pytest.raises(ValueError, match=message):
        get_config("lalic", param_width_rounding="up")


def test_paper_configuration_has_the_official_parameter_count() -> None:
    """66 133 045 parameters upstream, of which 512 000 are the folded Omni-Shift kernels that the
    official code keeps as parameters (../shared/reference/lalic-official/CHECKPOINTS.md)."""
    with torch.device("meta"):
        net = LALIC(get_config("lalic"))
    assert sum(p.numel() for p in net.parameters()) == 66_133_045 - 512_000
    widths = [tuple(b.proj.out_features for b in p.blocks) for p in net.context.params]
    assert widths == [(256, 256, 32), (266, 256, 32), (320, 256, 64), (426, 277, 128), (853, 618, 384)]
