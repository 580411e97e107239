"""g_s and g_a in bfloat16 (``synthesis_precision``, ``analysis_precision``, issue 39) on Kodak crops
with the shipped weights: g_s keeps the streams and latents and moves pixels within the PSNR bound of
the float32 path; g_a's streams decode everywhere and keep rate and PSNR."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch
from PIL import Image

from model.codec import Codec
from model.paths import KODAK_DIR
from model.stages import (
    ANALYSIS_PRECISIONS,
    AUTO_PRECISION,
    PRECISIONS,
    BFloat16Gained,
    native_bfloat16,
    resolve_precision,
    stage_modules,
)

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
        "bfloat16-encoder": Codec.from_pretrained(backend="torch", analysis_precision="bfloat16"),
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


@pytest.mark.parametrize("quality", [1.0, 6.0])
def test_bfloat16_analysis_keeps_rate_and_psnr_and_its_streams_decode_in_float32(
    codecs: dict[str, Codec], crops: list[np.ndarray], quality: float
) -> None:
    reference, fast = codecs["float32"], codecs["bfloat16-encoder"]
    sizes, changes = [], []
    for image in crops:
        exact, stream = reference.compress(image, quality), fast.compress(image, quality)
        assert stream != exact  # other latents: it does run in another precision
        assert np.array_equal(fast.decompress(stream), reference.decompress(stream))  # g_s is float32 in both
        sizes.append(len(stream) / len(exact))
        changes.append(psnr(image, reference.decompress(stream)) - psnr(image, reference.decompress(exact)))
    assert abs(np.mean(sizes) - 1) < 0.02 and abs(np.mean(changes)) < 0.05


@pytest.mark.parametrize(("name", "image_side"), [("synthesis", "image_side"), ("analysis", "image_side")])
def test_the_reduced_precision_stage_holds_bfloat16_weights_and_a_float32_image_side(
    name: str, image_side: str
) -> None:
    codec = Codec.random("lalic-s", seed=0)
    stage = stage_modules(codec.net, "bfloat16", "bfloat16")[name]
    assert isinstance(stage, BFloat16Gained) and stage.at_input == (name == "synthesis")
    dtypes = {name: p.dtype for name, p in stage.named_parameters()}
    assert dtypes.pop(f"{image_side}.weight") == dtypes.pop(f"{image_side}.bias") == torch.float32
    floats = {name for name, dtype in dtypes.items() if dtype == torch.float32}
    assert floats and all(name.endswith((".decay", ".boost")) for name in floats)
    assert {dtypes[n] for n in dtypes if n not in floats} == {torch.bfloat16}
    assert stage.log_gain.dtype == torch.float32
    with pytest.raises(ValueError, match="precision 'float16' is not one of"):
        stage_modules(codec.net, "float16")
    with pytest.raises(ValueError, match="analysis precision bfloat16 needs backend torch or torchscript"):
        Codec(codec.net, backend="onnxruntime", analysis_precision="bfloat16")


CPUINFO_TEXT = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f {extra}\n\n"


@pytest.mark.parametrize(
    ("extra", "device", "backend", "expected"),
    [
        ("avx512_bf16 avx512_vnni", "cpu", "torch", "bfloat16"),
        ("amx_bf16 amx_tile", "cpu", "torchscript", "bfloat16"),
        ("avx512_bf16", "cpu", "onnxruntime", "float32"),  # ONNX Runtime runs the float32 graph
        ("avx512_bf16", "cuda", "torch", "float32"),
        ("avx512_vnni", "cpu", "torch", "float32"),  # bfloat16 would be emulated: slower
    ],
)
def test_auto_precision_is_bfloat16_only_where_the_cpu_computes_it(
    tmp_path: Path, extra: str, device: str, backend: str, expected: str
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO_TEXT.format(extra=extra))
    assert resolve_precision(AUTO_PRECISION, device, backend, cpuinfo) == expected
    for fixed in PRECISIONS:  # a precision that is set is kept
        assert resolve_precision(fixed, device, backend, cpuinfo) == fixed
    assert not native_bfloat16(tmp_path / "missing")


def test_the_service_default_resolves_by_this_cpu() -> None:
    from service.settings import Settings

    settings = Settings(backend="torch")
    assert settings.synthesis_precision == settings.analysis_precision == AUTO_PRECISION
    literals = {"synthesis_precision": PRECISIONS, "analysis_precision": ANALYSIS_PRECISIONS}
    for name, precisions in literals.items():  # Settings repeats them without torch
        assert get_args(Settings.model_fields[name].annotation) == (AUTO_PRECISION, *precisions)
    expected = "bfloat16" if native_bfloat16() else "float32"
    assert resolve_precision(settings.synthesis_precision, "cpu", settings.backend) == expected
    assert Settings(backend="onnxruntime").analysis_precision == AUTO_PRECISION  # allowed: float32 there
