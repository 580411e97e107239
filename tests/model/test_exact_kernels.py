"""The fused C kernels (model/_exact_kernels.c) give the bits of model.fixedpoint's PyTorch reference.

Each kernel is compared bit for bit (float32 outputs as int32 patterns) with its reference on
inputs of many magnitudes, shapes and memory layouts, with 1 and 2 threads; a baseline x86-64 build
of the same file (no AVX, no multiversioning) is compared with the installed one; and a stream
coded with the kernels equals the stream coded with the reference.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
import subprocess
import sysconfig
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import model.fixedpoint as fx
from model.codec import Codec
from model.paths import KODAK_DIR

SOURCE = Path(fx.__file__).with_name("_exact_kernels.c")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def same_bits(run: Callable[[], torch.Tensor]) -> None:
    """``run`` gives the same bits with the C kernels (1 and 2 threads) as with the reference."""
    with fx.reference_kernels():
        want = bits(run())
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = bits(run())
            assert got.shape == want.shape
            assert torch.equal(got, want), f"{int((got != want).sum())} of {want.numel()} differ"
    finally:
        torch.set_num_threads(before)


def scaled(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Normal values, rows scaled from 2**-110 to 2**40, one row of zeros."""
    x = torch.randn(*shape, generator=gen)
    scales = 2.0 ** torch.linspace(-110, 40, shape[-2])
    x = x * scales[:, None]
    x[..., 0, :] = 0.0
    return x


def test_the_extension_is_built() -> None:
    """`pip install` (make install, the Dockerfile) compiles it; without it the path is 1.4x slower."""
    assert fx.native_kernels_available()


@pytest.mark.parametrize("bias", [True, False])
def test_linear(bias: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    bias_values = torch.randn(40, generator=gen) if bias else None
    layer = fx.ExactLinear(torch.randn(40, 70, generator=gen), bias_values)
    x = scaled(gen, 3, 50, 70)
    same_bits(lambda: layer(x))
    wide = torch.randn(3, 50, 110, generator=gen)
    same_bits(lambda: layer(wide[..., 20:90]))  # a strided view, as split() gives
    same_bits(lambda: layer(wide[..., 20:90], square_relu=True))
    same_bits(lambda: layer(x, square_relu=True))
    same_bits(lambda: layer(-x.abs(), square_relu=True))  # all zero after the ReLU


@pytest.mark.parametrize(
    "kernel,pad,stride,taps",
    [(3, 1, 1, None), (5, 2, 1, "checkerboard"), (4, 2, 1, None), (5, 2, 2, None), (3, 1, 2, None)],
)
def test_dense_convolution(kernel: int, pad: int, stride: int, taps: str | None) -> None:
    gen = torch.Generator().manual_seed(kernel)
    weight = torch.randn(24, 10, kernel, kernel, generator=gen)
    if taps:
        weight[:, :, ::2, ::2] = 0  # the checkerboard context's 12 live taps of 25
    conv = fx.ExactConv2d(weight, torch.randn(24, generator=gen), pad, stride=stride)
    image = torch.randn(3, 10, 7, 9, generator=gen) * torch.tensor([1e-30, 1.0, 1e20])[:, None, None, None]
    same_bits(lambda: conv(image))
    channels_last = image.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    same_bits(lambda: conv(channels_last))
    same_bits(lambda: conv(torch.zeros(1, 10, 3, 4)))


@pytest.mark.parametrize("bias", [True, False])
def test_depthwise_convolution(bias: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    bias_values = torch.randn(96, generator=gen) if bias else None
    conv = fx.ExactConv2d(torch.randn(96, 1, 5, 5, generator=gen), bias_values, 2, groups=96)
    tokens = torch.randn(2, 13 * 17, 96, generator=gen) * torch.tensor([3e-3, 7e4])[:, None, None]
    as_map = tokens.view(2, 13, 17, 96).permute(0, 3, 1, 2)  # how a Bi-RWKV block passes it
    same_bits(lambda: conv(as_map))
    same_bits(lambda: conv(as_map.contiguous()))
    same_bits(lambda: conv(as_map[:, :, :1, :2]))


def test_layer_norm() -> None:
    gen = torch.Generator().manual_seed(6)
    w, b = torch.randn(160, generator=gen), torch.randn(160, generator=gen)
    x = scaled(gen, 2, 40, 160)
    same_bits(lambda: fx.layer_norm(x, w, b, 1e-5))
    same_bits(lambda: fx.layer_norm(x * 1e-30, w, b, 1e-6))


@pytest.mark.parametrize("gamma", [True, False])
def test_gated_residual(gamma: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 300, 48, generator=gen)
    both = torch.randn(2, 300, 144, generator=gen) * 8
    g = torch.randn(48, generator=gen) if gamma else None
    value = torch.randn(2, 300, 48, generator=gen)
    same_bits(lambda: fx.gated_residual(x, both[..., 96:], value, g))  # the receptance of a split
    edges = torch.tensor([float("inf"), -float("inf"), 16.0, -16.0, 1e30, 0.5 / 1024, 1.5 / 1024])
    same_bits(lambda: fx.gated_residual(torch.zeros(7), edges, torch.ones(7)))


@pytest.mark.parametrize("t", [1, 2, 31, 1536])
def test_biwkv_gated(t: int) -> None:
    gen = torch.Generator().manual_seed(t)
    c = 40  # not a multiple of the 16-channel blocks
    wkv = fx.BiWKV(torch.linspace(-6, 6, c), torch.randn(c, generator=gen) * 3)
    kvr = torch.randn(2, t, 3 * c, generator=gen) * torch.tensor([0.5, 40.0])[:, None, None]
    kvr[1, :, :c] *= 20  # keys beyond the clamp at 255
    same_bits(lambda: wkv.gated(kvr))


def test_nan_inputs_do_not_crash() -> None:
    """NaN cannot come out of the path (inputs are range-checked latents), but the kernels index
    their tables with clamped values whatever they get."""
    wkv = fx.BiWKV(torch.zeros(8), torch.zeros(8))
    kvr = torch.full((1, 5, 24), float("nan"))
    assert wkv.gated(kvr).shape == (1, 5, 8)
    assert fx.gated_residual(torch.zeros(3), torch.full((3,), float("nan")), torch.ones(3)).shape == (3,)


def bucketize_cases(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales like the parameter networks' (log-normal), every threshold of the Gaussian's table and
    the floats just beside each, signed zeros, infinities and NaN; the table's thresholds."""
    from model.entropy import scale_table

    t = scale_table()
    thresholds = torch.sqrt(t[:-1] * t[1:])
    below, above = (torch.nextafter(thresholds, torch.tensor(v)) for v in (0.0, 1e9))
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -1.0, 1e-30, 1e30])
    values = torch.cat([(torch.randn(50_000, generator=gen) * 2).exp(), thresholds, below, above, special])
    return values[torch.randperm(values.numel(), generator=gen)], thresholds


def test_bucketize_gives_pytorchs_indexes() -> None:
    """The decoder's table indexes (GaussianConditional.indexes): the C search equals
    torch.bucketize on every value, including exact thresholds, their neighbours and NaN, for
    boundary lists of every length from 0, with 1 and 2 threads."""
    values, thresholds = bucketize_cases(torch.Generator().manual_seed(11))
    for n in (0, 1, 2, 3, 7, 64, thresholds.numel()):
        bounds = thresholds[:n]
        want = torch.bucketize(values, bounds).to(torch.int32)
        same_bits(lambda b=bounds: fx.bucketize(values, b))
        assert torch.equal(fx.bucketize(values, bounds), want)
    strided = values[:40_000].view(200, 200)[:, ::2]  # a view, as the parameter networks' halves are
    want = torch.bucketize(strided.contiguous(), thresholds).to(torch.int32)
    assert torch.equal(fx.bucketize(strided, thresholds), want)


def _build(tmp: Path, march: str) -> object:
    """The same C file built for one instruction set (no clones, no OpenMP), beside the installed one."""
    include = sysconfig.get_paths()["include"]
    target = tmp / ("_exact_kernels" + importlib.machinery.EXTENSION_SUFFIXES[0])
    flags = ["-O3", f"-march={march}", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
    defines = ["-DLALIC_NO_CLONES", "-Wno-unknown-pragmas", f"-I{include}"]
    subprocess.run(["gcc", *flags, *defines, str(SOURCE), "-o", str(target)], check=True)
    spec = importlib.util.spec_from_file_location("_exact_kernels", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3"])
def test_builds_for_older_cpus_give_the_same_bits(tmp_path: Path, monkeypatch, march: str) -> None:
    """What a CPU without AVX2 (x86-64: SSE2) or without AVX-512 (x86-64-v3: AVX2) runs equals
    this CPU's (the installed clones are picked by the CPU, so no environment variable reaches them)."""
    gen = torch.Generator().manual_seed(8)
    linear = fx.ExactLinear(torch.randn(64, 96, generator=gen), torch.randn(64, generator=gen))
    depthwise = fx.ExactConv2d(torch.randn(96, 1, 5, 5, generator=gen), None, 2, groups=96)
    dense = fx.ExactConv2d(torch.randn(32, 96, 3, 3, generator=gen), torch.randn(32, generator=gen), 1)
    wkv = fx.BiWKV(torch.linspace(-6, 6, 96), torch.randn(96, generator=gen))
    x = torch.randn(1, 12 * 16, 96, generator=gen) * 5
    w, b = torch.randn(96, generator=gen), torch.randn(96, generator=gen)
    scales, thresholds = bucketize_cases(gen)

    def outputs() -> list[torch.Tensor]:
        as_map = x.view(1, 12, 16, 96).permute(0, 3, 1, 2)
        kvr = torch.cat([x, x * 0.5, -x], dim=-1)
        return [
            linear(x),
            linear(x, square_relu=True),
            depthwise(as_map),
            dense(as_map),
            wkv.gated(kvr),
            fx.layer_norm(x, w, b, 1e-5),
            fx.gated_residual(x, x * 3, x, w),
            fx.bucketize(scales, thresholds),
        ]

    installed = outputs()
    monkeypatch.setattr(fx, "_native", _build(tmp_path, march))
    fx._native_tables.cache_clear()
    try:
        baseline = outputs()
    finally:
        fx._native_tables.cache_clear()
    for a, b2 in zip(installed, baseline, strict=True):
        assert torch.equal(bits(a), bits(b2))


def test_a_stream_is_the_same_with_the_kernels_and_with_the_reference() -> None:
    """Whole images: the version-2 stream and its decoded latents do not depend on the kernels."""
    from PIL import Image

    codec = Codec.from_pretrained(stream_version=2)
    image = np.asarray(Image.open(KODAK_DIR / "kodim07.png").convert("RGB"))[:192, :256]
    data = codec.compress(image, 2.5)
    y_hat, _ = codec.decode_latents(data)
    with fx.reference_kernels():
        assert codec.compress(image, 2.5) == data
        reference_y, _ = codec.decode_latents(data)
    assert torch.equal(y_hat, reference_y)


def test_strided_convolutions_match_torch() -> None:
    """The stride of g_a's and h_a's convolutions: within rounding of F.conv2d (and of the same shape)."""
    gen = torch.Generator().manual_seed(9)
    image = torch.randn(2, 6, 11, 14, generator=gen)
    for kernel, stride in ((5, 2), (3, 2), (3, 3)):
        weight, bias = torch.randn(8, 6, kernel, kernel, generator=gen), torch.randn(8, generator=gen)
        got = fx.ExactConv2d(weight, bias, kernel // 2, stride=stride)(image)
        want = torch.nn.functional.conv2d(image, weight, bias, stride=stride, padding=kernel // 2)
        assert got.shape == want.permute(0, 2, 3, 1).shape
        assert float((got - want.permute(0, 2, 3, 1)).abs().max()) < 2e-3 * float(want.abs().max())


def test_exact_analysis_is_within_rounding_of_the_float_transforms() -> None:
    """analysis precision ``exact``: g_a (with its gain) and h_a close to the float32 networks,
    and the same bits with the C kernels and with the reference."""
    from model.exact import exact_analysis, exact_gain
    from model.lalic import interpolated_gain

    codec = Codec.from_pretrained()
    net = codec.net
    exact = exact_analysis(net)
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(10))
    for quality in (1.0, 3.5, 6.0):
        q = torch.tensor([quality])
        want = torch.exp(torch.log(interpolated_gain(net.log_gain, q)))[0, :, 0, 0]
        assert torch.allclose(exact_gain(net.log_gain.tolist(), quality), want, rtol=1e-6)
        with torch.no_grad():
            y_float = net.analysis(x, q)
        y = exact.analysis(x, q)
        assert float((y - y_float).abs().max()) < 2e-3 * float(y_float.abs().max())
        with fx.reference_kernels():
            assert torch.equal(bits(exact.analysis(x, q)), bits(y))
        with torch.no_grad():
            z_float = net.h_a(y)
        z = exact.hyper_analysis(y)
        assert float((z - z_float).abs().max()) < 2e-3 * float(z_float.abs().max())
    with pytest.raises(ValueError, match="fan-in"):  # the paper's lalic: h_a reads 320 x 5 x 5
        exact_analysis(Codec.random("lalic").net)


def test_large_decay_profiles_are_not_kept(monkeypatch) -> None:
    """Profiles beyond PROFILE_CACHE_LIMIT values are recomputed per call (no large cache stays
    behind after a large image), with the same bits; small ones are kept."""
    gen = torch.Generator().manual_seed(11)
    wkv = fx.BiWKV(torch.linspace(-6, 6, 16), torch.randn(16, generator=gen))
    kvr = torch.randn(1, 50, 48, generator=gen)
    first = wkv.gated(kvr)
    assert wkv._by_token is not None and wkv._by_token[0] == 50
    monkeypatch.setattr(fx, "PROFILE_CACHE_LIMIT", 16 * 52 - 1)
    wkv = fx.BiWKV(torch.linspace(-6, 6, 16), wkv.boost.double() / 65536)
    assert torch.equal(bits(wkv.gated(kvr)), bits(first))
    assert wkv._by_token is None
    same_bits(lambda: wkv.gated(kvr))


def test_products_in_row_chunks_give_the_same_bits(monkeypatch) -> None:
    """Large layers multiply PRODUCT_ROWS rows at a time (bounded int32 temporaries): the same bits."""
    monkeypatch.setattr(fx, "PRODUCT_ROWS", 7)
    gen = torch.Generator().manual_seed(12)
    linear = fx.ExactLinear(torch.randn(20, 30, generator=gen), torch.randn(20, generator=gen))
    x = torch.randn(2, 25, 30, generator=gen)
    same_bits(lambda: linear(x))
    conv = fx.ExactConv2d(torch.randn(12, 5, 3, 3, generator=gen), None, 1, stride=2)
    image = torch.randn(2, 5, 9, 7, generator=gen) * torch.tensor([1e3, 1e-3])[:, None, None, None]
    same_bits(lambda: conv(image))


def test_integer_sums_convert_to_float32_correctly_rounded() -> None:
    """BiWKV's prefix sums (up to 2**61) become float32 in one rounding in C; the reference relies on
    torch's int64 -> float32 conversion doing the same (through double it would round twice)."""
    # one above a float32 halfway point: through double the 1 is lost, and ties-to-even rounds down
    halfway = [2**60 + 2**36 + 1, -(2**60 + 2**36 + 1), 2**55 + 2**31 + 1, 3 * 2**58 + 2**35 + 1]
    got = torch.tensor(halfway * 16, dtype=torch.int64).to(torch.float32)[:4].tolist()
    want = [2.0**60 + 2**37, -(2.0**60 + 2**37), 2.0**55 + 2**32, 3 * 2.0**58 + 2**36]
    assert got == want
    assert float(np.float32(halfway[0])) == 2.0**60  # numpy converts through double: the trap


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_the_reference_decodes_the_corpus_under_other_cpu_capabilities(capability: str) -> None:
    """The PyTorch reference (what runs where the extension is missing) under PyTorch's other
    kernel sets, in a fresh process: the corpus's recorded latents."""
    import json
    import os
    import sys

    from model.paths import REPO_ROOT
    from model.portability import CORPUS_DIR

    names = ["kodim04-q1.lalic", "kodim23-q6.lalic"]
    script = (
        "import json, sys, model.fixedpoint as fx\n"
        "from model.codec import Codec\n"
        "from model.portability import CORPUS_DIR, latent_digest\n"
        "codec = Codec.from_pretrained()\n"
        "decode = lambda n: latent_digest(codec.decode_latents((CORPUS_DIR / n).read_bytes())[0])\n"
        "with fx.reference_kernels():\n"
        f"    print(json.dumps({{n: decode(n) for n in {names}}}))\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=REPO_ROOT, check=True
    )
    expected = json.loads((CORPUS_DIR / "expected.json").read_text())["y_hat"]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {n: expected[n] for n in names}


def test_unsupported_uses_are_refused_or_fall_back() -> None:
    """Depthwise convolutions the exact sums cannot hold are refused; a broadcast gated residual
    runs the reference (the C kernel assumes equal shapes); exact analysis refuses refinement."""
    with pytest.raises(ValueError, match="at most 5x5"):
        fx.ExactConv2d(torch.randn(4, 1, 7, 7), None, 3, groups=4)
    with pytest.raises(ValueError, match="at most 5x5"):
        fx.ExactConv2d(torch.randn(4, 1, 5, 5), None, 1, groups=4)
    gen = torch.Generator().manual_seed(13)
    x, gate, value = (
        torch.randn(1, 1, 8, generator=gen),
        torch.randn(1, 5, 8, generator=gen),
        torch.randn(1, 5, 8, generator=gen),
    )
    same_bits(lambda: fx.gated_residual(x, gate, value))
    assert fx.gated_residual(x, gate, value).shape == (1, 5, 8)
    codec = Codec.from_pretrained(analysis_precision="exact")
    with pytest.raises(ValueError, match="refine_steps"):
        codec.compress(np.zeros((64, 64, 3), np.uint8), 3, refine_steps=2)


def test_the_gain_cache_stays_small() -> None:
    """A client may send any fractional quality: exact analysis keeps at most GAIN_CACHE_SIZE gains."""
    from model.exact import GAIN_CACHE_SIZE, exact_analysis

    analysis = exact_analysis(Codec.from_pretrained().net)
    for i in range(3 * GAIN_CACHE_SIZE):
        assert analysis._gain(1 + i / 1000, torch.device("cpu")) is not None
    assert 0 < len(analysis._gains) <= GAIN_CACHE_SIZE
