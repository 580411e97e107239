"""g_s in bfloat16 (``synthesis_precision``, issue 39): the same streams and latents, pixels within
the PSNR bound of the float32 path, on Kodak crops with the shipped weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.codec import Codec
from model.paths import KODAK_DIR
from model.stages import BFloat16Synthesis, stage_modules

CROPS = [("kodim01.png", 0, 0), ("kodim15.png", 128, 256), ("kodim23.png", 192, 320)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


@pytest.fixture(scope="module")
def crops() -> list[np.ndarray]:
    images = []
    for name, top, left in CROPS:
        image = np.asarray(Image.open(KODAK_DIR / name).convert("RGB"))
        images.append(np.ascontiguousarray(image[top : top + 192, left : left + 256]))
    return images


@pytest.fixture(scope="module")
def codecs() -> dict[str, Codec]:
    torch.set_num_threads(2)
    return {
        "float32": Codec.from_pretrained(backend="torch"),
        "bfloat16": Codec.from_pretrained(backend="torch", synthesis_precision="bfloat16"),
        "bfloat16-scripted": Codec.from_pretrained(backend="torchscript", synthesis_precision="bfloat16"),
    }


@pytest.mark.parametrize("quality", [1.0, 3.5, 6.0])
def test_bfloat16_synthesis_keeps_psnr_and_never_moves_the_latents(
    codecs: dict[str, Codec], crops: list[np.ndarray], quality: float
) -> None:
    reference = codecs["float32"]
    for image in crops:
        stream = reference.compress(image, quality)
        assert codecs["bfloat16"].compress(image, quality) == stream  # g_a and the entropy path as before
        exact = reference.decompress(stream)
        y_hat, _ = reference.decode_latents(stream)
        fast_y_hat, _ = codecs["bfloat16"].decode_latents(stream)
        assert torch.equal(fast_y_hat, y_hat)
        for name in ("bfloat16", "bfloat16-scripted"):
            fast = codecs[name].decompress(stream)
            assert not np.array_equal(fast, exact)  # it does run in another precision
            assert np.abs(fast.astype(int) - exact.astype(int)).max() <= 8
            assert psnr(image, fast) - psnr(image, exact) > -0.05  # crops: looser than Kodak's 0.02 dB


def test_the_reduced_precision_stage_holds_bfloat16_weights_and_a_float32_last_layer() -> None:
    codec = Codec.random("lalic-s", seed=0)
    stage = stage_modules(codec.net, "bfloat16")["synthesis"]
    assert isinstance(stage, BFloat16Synthesis)
    dtypes = {name: p.dtype for name, p in stage.named_parameters()}
    assert dtypes.pop("last.weight") == dtypes.pop("last.bias") == torch.float32
    floats = {name for name, dtype in dtypes.items() if dtype == torch.float32}
    assert floats and all(name.endswith((".decay", ".boost")) for name in floats)
    assert {dtypes[n] for n in dtypes if n not in floats} == {torch.bfloat16}
    assert stage.log_gain.dtype == torch.float32
    with pytest.raises(ValueError, match="synthesis precision 'float16' is not one of"):
        stage_modules(codec.net, "float16")
    with pytest.raises(ValueError, match="needs backend torch or torchscript"):
        Codec(codec.net, backend="onnxruntime", synthesis_precision="bfloat16")
