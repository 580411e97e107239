"""Encoder-side latent refinement (model.refine) on the shipped weights and a Kodak crop."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import evaluate
from model.codec import Codec
from model.configs import LAMBDAS
from model.paths import KODAK_DIR
from model.refine import lambda_for_quality, rate_distortion, refine_latents

KODAK = KODAK_DIR
QUALITY = 3


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec.from_pretrained()


@pytest.fixture(scope="module")
def crop() -> np.ndarray:
    """A 64 x 96 crop of kodim23 (parrots: feathers and smooth background)."""
    if not (KODAK / "kodim23.png").is_file():
        pytest.skip(f"Kodak not found at {KODAK}")
    with Image.open(KODAK / "kodim23.png") as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB"))[200:264, 300:396])


def measured_loss(image: np.ndarray, data: bytes, decoded: np.ndarray, quality: int) -> float:
    """lambda * 255^2 * MSE + bpp from the real stream and the decoded pixels."""
    mse = np.mean((decoded.astype(np.float64) - image) ** 2) / 255.0**2
    bpp = 8 * len(data) / (image.shape[0] * image.shape[1])
    return LAMBDAS[quality - 1] * 255.0**2 * mse + bpp


def test_lambda_for_quality() -> None:
    for q, lam in enumerate(LAMBDAS, start=1):
        assert lambda_for_quality(LAMBDAS, q) == pytest.approx(lam, rel=1e-12)
    assert lambda_for_quality(LAMBDAS, 2.5) == pytest.approx(math.sqrt(LAMBDAS[1] * LAMBDAS[2]), rel=1e-12)
    assert lambda_for_quality(LAMBDAS, 0.2) == pytest.approx(LAMBDAS[0])
    assert lambda_for_quality(LAMBDAS, 9) == pytest.approx(LAMBDAS[-1])


def test_zero_steps_is_the_plain_encoder(codec: Codec, crop: np.ndarray) -> None:
    assert codec.compress(crop, QUALITY, refine_steps=0) == codec.compress(crop, QUALITY)


def test_refined_stream_decodes_with_a_plain_decoder_and_costs_less(codec: Codec, crop: np.ndarray) -> None:
    plain = codec.compress(crop, QUALITY)
    timings: dict[str, float] = {}
    refined = codec.compress_batch([crop], QUALITY, timings, refine_steps=8)[0]
    assert refined != plain and timings["refinement"] > 0
    decoder = Codec.from_pretrained()  # a separate decoder: the stream carries everything
    decoded = decoder.decompress(refined)
    assert decoded.shape == crop.shape
    before = measured_loss(crop, plain, codec.decompress(plain), QUALITY)
    after = measured_loss(crop, refined, decoded, QUALITY)
    assert after < 0.99 * before, (before, after)
    # deterministic: the same encoder makes the same refined stream again
    assert codec.compress(crop, QUALITY, refine_steps=8) == refined


def test_refinement_never_returns_worse_latents_and_leaves_the_network_alone(
    codec: Codec, crop: np.ndarray
) -> None:
    net = codec.net
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = codec._to_tensor([crop])
    qt = torch.tensor([float(QUALITY)])
    with torch.no_grad():
        y = net.analysis(x, qt)
        z = net.h_a(y)
    # a step size far too large makes every step worse: the starting latents come back unchanged
    y_out, z_out = refine_latents(net, x, y, z, QUALITY, steps=3, size=crop.shape[:2], lr=5.0)
    assert torch.equal(y_out, y) and torch.equal(z_out, z)
    # a good step size lowers the true (rounded) loss
    y_out, z_out = refine_latents(net, x, y, z, QUALITY, steps=4, size=crop.shape[:2])
    lam = LAMBDAS[QUALITY - 1]
    with torch.no_grad():
        start = rate_distortion(net, x, y, z, qt, lam, crop.shape[:2])
        end = rate_distortion(net, x, y_out, z_out, qt, lam, crop.shape[:2])
    assert float(end.loss) < float(start.loss)
    assert all(p.grad is None for p in net.parameters())
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("steps", [-1, 1.5, True, "3"])
def test_invalid_refine_steps_are_rejected(codec: Codec, crop: np.ndarray, steps: object) -> None:
    with pytest.raises(ValueError, match="refine_steps"):
        codec.compress(crop, QUALITY, refine_steps=steps)  # type: ignore[arg-type]


def test_cli_compress_with_refinement(codec: Codec, crop: np.ndarray, tmp_path: Path) -> None:
    Image.fromarray(crop).save(tmp_path / "in.png")
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "lalic", *a], capture_output=True, text=True, timeout=300
    )
    done = run("compress", str(tmp_path / "in.png"), str(tmp_path / "x.lalic"), "--refine-steps", "2")
    assert done.returncode == 0, done.stderr
    data = (tmp_path / "x.lalic").read_bytes()
    assert codec.decompress(data).shape == crop.shape
    done = run("compress", str(tmp_path / "in.png"), str(tmp_path / "y.lalic"), "--refine-steps", "-1")
    assert done.returncode == 2 and "expected an integer >= 0" in done.stderr
    assert not (tmp_path / "y.lalic").exists()


def test_evaluate_codec_with_refinement(codec: Codec, crop: np.ndarray, tmp_path: Path) -> None:
    Image.fromarray(crop).save(tmp_path / "crop.png")
    images = [tmp_path / "crop.png"]
    result = evaluate.evaluate_codec(codec, images, [QUALITY], progress=False, refine_steps=2)
    assert result["meta"]["refine_steps"] == 2
    assert "2 refinement steps" in result["name"]
    bpp = 8 * len(codec.compress(crop, QUALITY, refine_steps=2)) / crop.shape[0] / crop.shape[1]
    assert result["results"]["bpp"] == [pytest.approx(bpp, rel=1e-12)]


def test_evaluate_codec_with_an_orientation_search(codec: Codec, crop: np.ndarray, tmp_path: Path) -> None:
    Image.fromarray(crop).save(tmp_path / "crop.png")
    result = evaluate.evaluate_codec(
        codec, [tmp_path / "crop.png"], [QUALITY], progress=False, orientations=(0, 2)
    )
    assert result["meta"]["orientations"] == [0, 2] and "best of orientations 0,2" in result["name"]
    bpp = 8 * len(codec.compress(crop, QUALITY, orientations=(0, 2))) / crop.shape[0] / crop.shape[1]
    assert result["results"]["bpp"] == [pytest.approx(bpp, rel=1e-12)]
