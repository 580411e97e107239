"""The fused CPU kernel of g_a's and g_s's BiWKV (model/_transform_kernels.c, model.transform_kernels).

``torch.ops.lalic.biwkv_gated`` is compared with the O(T^2) definition of Eq. 3 in float64 on
sequences shorter and longer than a chunk, channel counts that are not multiples of a vector,
batches, growing and shrinking decays, wide key ranges and both dtypes, with 1 and 2 threads; with
builds of the same file for older CPUs; inside scripted modules; and through the codec, whose g_s
and g_a take it by default.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model import transform_kernels
from model.codec import Codec
from model.layers import BlockStage, SpatialMix, biwkv_reference, reparameterize, use_fused_kernels
from model.metrics import psnr
from model.paths import KODAK_DIR
from model.stages import stage_modules
from model.transforms import ConvTranspose2d, deconv

SOURCE = Path(transform_kernels.__file__).with_name("_transform_kernels.c")


def reference(kvr: torch.Tensor, decay: torch.Tensor, boost: torch.Tensor) -> torch.Tensor:
    """``sigmoid(r) * wkv`` in float64 from Eq. 3's definition, (B, T, C)."""
    b, t, c3 = kvr.shape
    k, v, r = kvr.double().transpose(1, 2).split(c3 // 3, dim=1)
    wkv = biwkv_reference(decay.double() / t, boost.double() / t, k, v)
    return (torch.sigmoid(r) * wkv).transpose(1, 2)


def inputs(gen: torch.Generator, b: int, t: int, c: int, key_scale: float, decay_scale: float):
    kvr = torch.randn(b, t, 3 * c, generator=gen)
    kvr[..., :c] *= key_scale
    return kvr, torch.randn(c, generator=gen) * decay_scale, torch.randn(c, generator=gen) * 2


def test_the_extension_is_built() -> None:
    """`pip install` (make install, the Dockerfile) compiles it; without it g_s and g_a fall back to
    PyTorch's chunked BiWKV (BENCHMARKS.md: several times slower)."""
    assert transform_kernels.available()


CASES = [
    (1, 1, 5, 1.0, 1.0),  # one token
    (1, 50, 7, 1.0, 3.0),  # shorter than a chunk
    (2, 64, 16, 3.0, 3.0),  # exactly one chunk, a batch
    (1, 200, 72, 1.0, 3.0),  # a partial last chunk, channels not a multiple of 16
    (1, 1000, 9, 30.0, 20.0),  # keys spread over ±100, strong decays both ways
    (3, 300, 24, 1.0, -8.0),  # decays negative for some channels: growth across the map
]


@pytest.mark.parametrize(("b", "t", "c", "key_scale", "decay_scale"), CASES)
def test_float32_matches_the_definition(b: int, t: int, c: int, key_scale: float, decay_scale: float) -> None:
    gen = torch.Generator().manual_seed(t + c)
    kvr, decay, boost = inputs(gen, b, t, c, key_scale, decay_scale)
    want = reference(kvr, decay, boost)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got = torch.ops.lalic.biwkv_gated(kvr, decay, boost)
            assert got.dtype == torch.float32 and got.shape == (b, t, c)
            err = (got.double() - want).abs().max().item()
            assert err <= 2e-5 * max(1.0, want.abs().max().item()), err
    finally:
        torch.set_num_threads(before)


def test_bfloat16_in_and_out() -> None:
    """bfloat16 maps (g_s's body under precision bfloat16) are read and written as bfloat16: the
    result is the float32 one rounded once (at most half a bfloat16 step, 2**-9 relative)."""
    gen = torch.Generator().manual_seed(3)
    kvr, decay, boost = inputs(gen, 1, 700, 40, 2.0, 3.0)
    kvr = kvr.bfloat16()
    got = torch.ops.lalic.biwkv_gated(kvr, decay, boost)
    assert got.dtype == torch.bfloat16
    want = torch.ops.lalic.biwkv_gated(kvr.float(), decay, boost)
    assert torch.equal(got, want.bfloat16())


def test_refuses_what_it_does_not_compute() -> None:
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        torch.ops.lalic.biwkv_gated(torch.zeros(1, 4, 6, dtype=torch.float64), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="shape"):
        torch.ops.lalic.biwkv_gated(torch.zeros(1, 4, 6), torch.zeros(3), torch.zeros(2))


def test_spatial_mix_takes_the_kernel_at_inference_only() -> None:
    """A fused Spatial Mix equals the PyTorch one at inference (to float rounding), and training
    keeps PyTorch's formulation (the kernel has no gradient)."""
    torch.manual_seed(0)
    mix = SpatialMix(24)
    x = torch.randn(2, 12 * 20, 24)
    with torch.no_grad():
        plain = mix(x, 12, 20)
        use_fused_kernels(mix)
        fused = mix(x, 12, 20)
    assert not torch.equal(plain, fused)  # it really ran another computation
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    mix(x, 12, 20).sum().backward()  # with grad: the PyTorch path, differentiable
    assert mix.decay.grad is not None


def test_scripted_module_calls_the_kernel() -> None:
    torch.manual_seed(1)
    mix = use_fused_kernels(reparameterize(SpatialMix(16))).eval()
    x = torch.randn(1, 8 * 9, 16)
    scripted = torch.jit.freeze(torch.jit.script(mix))
    with torch.no_grad():
        assert "lalic::biwkv_gated" in str(scripted.graph)
        assert torch.equal(scripted(x, 8, 9), mix(x, 8, 9))


def test_use_fused_kernels_refuses_without_the_extension(monkeypatch) -> None:
    monkeypatch.setattr(transform_kernels, "_native", None)
    with pytest.raises(RuntimeError, match="not built"):
        use_fused_kernels(SpatialMix(4))


def _build(tmp: Path, march: str) -> object:
    """The same C file built for one instruction set (no clones), beside the installed one."""
    include = sysconfig.get_paths()["include"]
    target = tmp / f"_transform_kernels_{march}.so"
    flags = ["-O3", f"-march={march}", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared"]
    subprocess.run(
        ["gcc", *flags, "-DLALIC_NO_CLONES", f"-I{include}", str(SOURCE), "-o", str(target)], check=True
    )
    spec = importlib.util.spec_from_file_location("_transform_kernels", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3"])
def test_builds_for_older_cpus(tmp_path: Path, monkeypatch, march: str) -> None:
    """What a CPU without AVX2 (x86-64: SSE2) or without AVX-512 (x86-64-v3) runs is right too (the
    installed clones are picked by the CPU, so only a build of its own tests them here)."""
    monkeypatch.setattr(transform_kernels, "_native", _build(tmp_path, march))
    gen = torch.Generator().manual_seed(5)
    for b, t, c, key_scale, decay_scale in CASES[2:5]:
        kvr, decay, boost = inputs(gen, b, t, c, key_scale, decay_scale)
        want = reference(kvr, decay, boost)
        got = torch.ops.lalic.biwkv_gated(kvr, decay, boost)
        assert (got.double() - want).abs().max().item() <= 2e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_codec_with_and_without_the_kernel(precision: str) -> None:
    """The codec's g_a and g_s run on the kernel by default (the network's own modules do not); a
    stream decodes to the same latents either way, with pixels within 0.01 dB; an encoder on the
    kernel writes streams of the same rate and distortion (float32: within 0.3 % and 0.02 dB, the
    issue's bound; bfloat16's own rounding moves a crop this small by up to 0.1 dB either way, and
    bench/precision.py measures it on all of Kodak)."""
    image = np.asarray(Image.open(KODAK_DIR / "kodim07.png").convert("RGB"))[:96, :128]
    kwargs = {"synthesis_precision": precision, "analysis_precision": precision}
    fused, plain = (Codec.from_pretrained(fused_kernels=f, **kwargs) for f in (True, False))
    for name in ("analysis", "synthesis"):
        modules = [m for m in fused._stages.runners[name].module.modules() if isinstance(m, SpatialMix)]
        assert modules and all(m.fused for m in modules)
    assert not any(m.fused for m in fused.net.modules() if isinstance(m, SpatialMix))
    assert not any(
        m.fused for m in stage_modules(fused.net)["synthesis"].modules() if isinstance(m, SpatialMix)
    )
    stream = plain.compress(image, 4.0)
    assert torch.equal(fused.decode_latents(stream)[0], plain.decode_latents(stream)[0])
    a, b = fused.decompress(stream), plain.decompress(stream)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    assert abs(psnr(image, a) - psnr(image, b)) <= 0.01
    fused_stream = fused.compress(image, 4.0)
    rate, distortion = (0.003, 0.02) if precision == "float32" else (0.02, 0.1)
    # streams grow in 4-byte words of the range coder: at ~180 bytes, bfloat16 may move one word
    slack = 0 if precision == "float32" else 4
    assert abs(len(fused_stream) - len(stream)) <= max(rate * len(stream), slack)
    assert abs(psnr(image, plain.decompress(fused_stream)) - psnr(image, b)) <= distortion


# g_s's last layer: the sub-pixel convolution and the pixel shuffle as one kernel -------------


def subpixel_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``pixel_shuffle(conv2d(x, w, b, padding=S // 2), 2)`` in float64."""
    pad = weight.shape[-1] // 2
    return F.pixel_shuffle(F.conv2d(x.double(), weight.double(), bias.double(), padding=pad), 2)


SUBPIXEL_CASES = [
    (1, 48, 16, 24, 3, 3),  # g_s's last layer of lalic-s (48 channels, k5 -> a 3x3 sub-pixel kernel)
    (2, 5, 3, 17, 3, 3),  # a batch; a width that is not a multiple of the vector; few channels
    (1, 47, 1, 1, 4, 3),  # one position; odd channels (the last pairs with a zero)
    (1, 9, 6, 40, 2, 5),  # a 5x5 kernel, 8 outputs
]


@pytest.mark.parametrize(("b", "c", "h", "w", "cout", "size"), SUBPIXEL_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_subpixel_conv_matches_convolution_and_shuffle(b, c, h, w, cout, size, dtype, threads) -> None:
    """The float32 form equals the convolution and the shuffle to float32 rounding (bfloat16 maps
    widened exactly); the bfloat16-pair form (AVX512-BF16) equals them with the weights rounded to
    bfloat16. Output: channels-last float32, the shuffled layout."""
    gen = torch.Generator().manual_seed(size * 100 + c)
    weight = torch.randn(4 * cout, c, size, size, generator=gen) * 0.2
    bias = torch.randn(4 * cout, generator=gen)
    x = torch.randn(b, c, h, w, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    packed = transform_kernels.pack_subpixel_weight(weight)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        exact = torch.ops.lalic.subpixel_conv(x, packed, bias, False)
        paired = torch.ops.lalic.subpixel_conv(x, packed, bias, True)
    finally:
        torch.set_num_threads(before)
    want = subpixel_reference(x, weight, bias)
    assert exact.shape == want.shape == (b, cout, 2 * h, 2 * w) and exact.dtype == torch.float32
    assert exact.is_contiguous(memory_format=torch.channels_last)
    tol = 1e-5 * max(1.0, want.abs().max().item())
    assert (exact.double() - want).abs().max().item() <= tol
    if transform_kernels.bf16_dot_supported(x):
        rounded = subpixel_reference(x, weight.bfloat16().float(), bias)
        assert (paired.double() - rounded).abs().max().item() <= tol
        assert not torch.equal(paired, exact)  # the pair form really ran
    else:
        assert torch.equal(paired, exact)


def test_subpixel_conv_refuses_what_it_does_not_compute() -> None:
    packed = transform_kernels.pack_subpixel_weight(torch.zeros(12, 4, 3, 3))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        torch.ops.lalic.subpixel_conv(torch.zeros(1, 4, 2, 2, dtype=torch.float64), packed, torch.zeros(12))
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        torch.ops.lalic.subpixel_conv(torch.zeros(1, 5, 2, 2), packed, torch.zeros(12))
    with pytest.raises(ValueError, match="S odd"):
        even = transform_kernels.pack_subpixel_weight(torch.zeros(12, 4, 2, 2))
        torch.ops.lalic.subpixel_conv(torch.zeros(1, 4, 2, 2), even, torch.zeros(12))
    with pytest.raises(ValueError, match="multiple of 4"):
        wide = transform_kernels.pack_subpixel_weight(torch.zeros(20, 4, 3, 3))
        torch.ops.lalic.subpixel_conv(torch.zeros(1, 4, 2, 2), wide, torch.zeros(20))


def test_transposed_convolution_takes_the_kernel_at_inference_only() -> None:
    """g_s's last layer (k5, stride 2, 3 outputs) on the kernel equals the transposed convolution it
    stands for, in float32 and from a bfloat16 map; a layer whose sub-pixel kernel is not a square
    'same' one (k3: size 2) keeps PyTorch's convolution; training never takes it."""
    torch.manual_seed(3)
    last = deconv(48, 3, 5)
    last.use_subpixel()
    x = torch.randn(1, 48, 10, 14).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = F.conv_transpose2d(x.double(), last.weight.double(), last.bias.double(), 2, 2, 1)
        use_fused_kernels(last)
        assert last.subpixel_packed is not None
        got = last(x)
        assert (got.double() - want).abs().max().item() <= 1e-5
        from_bf16 = last(x.bfloat16())
        widened = F.conv_transpose2d(x.bfloat16().double(), last.weight.double(), last.bias.double(), 2, 2, 1)
        tol = 1e-5 if not transform_kernels.bf16_dot_supported(x.bfloat16()) else 2e-2
        assert (from_bf16.double() - widened).abs().max().item() <= tol
    assert last(x.requires_grad_()).grad_fn is not None  # with grad: PyTorch's sub-pixel convolution
    narrow = deconv(48, 3, 3)
    narrow.use_subpixel()
    use_fused_kernels(narrow)
    assert narrow.subpixel_packed is None
    last.use_subpixel()  # new sub-pixel weights drop the packing of the old ones
    assert last.subpixel_packed is None


def test_scripted_synthesis_calls_the_subpixel_kernel() -> None:
    """The codec's g_s (torchscript, both precisions) runs its last layer on the kernel, and the
    network it was copied from does not."""
    for precision in ("float32", "bfloat16"):
        codec = Codec.random(backend="torchscript", synthesis_precision=precision)
        graph = str(codec._stages.runners["synthesis"].module.graph)
        assert "lalic::subpixel_conv" in graph
    assert all(m.subpixel_packed is None for m in codec.net.modules() if isinstance(m, ConvTranspose2d))


NORM_SHAPES = [(1, 1, 5), (2, 7, 16), (1, 300, 72), (2, 200, 130)]  # widths below, at and off 16 lanes


@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_and_layer_norm_match_pytorch(shape, dtype) -> None:
    """``residual`` is PyTorch's addcmul rounded once (to a last-place unit where one of the two
    contracts its multiply-add and the other does not); the LayerNorms are PyTorch's within float32
    summation order; one thread and two give the same bits (rows are independent)."""
    gen = torch.Generator().manual_seed(sum(shape))
    c = shape[-1]
    x, branch = (torch.randn(*shape, generator=gen).mul_(3).add_(1).to(dtype) for _ in range(2))
    gamma, weight, bias = (torch.randn(c, generator=gen).to(dtype) for _ in range(3))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(
                (
                    torch.ops.lalic.residual(x, gamma, branch),
                    torch.ops.lalic.layer_norm(x, weight, bias, 1e-5),
                    *torch.ops.lalic.residual_layer_norm(x, gamma, branch, weight, bias, 1e-5),
                )
            )
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    total, normed, fused_total, fused_normed = results[0]
    assert torch.equal(total, fused_total)
    assert total.dtype == normed.dtype == fused_normed.dtype == dtype
    exact = dtype == torch.float32
    tol = dict(atol=1e-5, rtol=1e-5) if exact else dict(atol=2**-7, rtol=2**-7)
    want_total = torch.addcmul(x, gamma, branch)
    torch.testing.assert_close(total.float(), want_total.float(), atol=1e-6, rtol=1e-6 if exact else 2**-7)
    torch.testing.assert_close(normed.float(), F.layer_norm(x, (c,), weight, bias, 1e-5).float(), **tol)
    want_normed = F.layer_norm(fused_total, (c,), weight, bias, 1e-5)
    torch.testing.assert_close(fused_normed.float(), want_normed.float(), **tol)


def test_residual_and_layer_norm_refuse_what_they_do_not_compute() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="branch"):
        torch.ops.lalic.residual(x, torch.ones(8), torch.randn(4, 8).bfloat16())
    with pytest.raises(ValueError, match=r"\(8,\)"):
        torch.ops.lalic.layer_norm(x, torch.ones(7), torch.zeros(8), 1e-5)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        torch.ops.lalic.layer_norm(x.double(), torch.ones(8), torch.zeros(8), 1e-5)


def bfloat16_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A bfloat16 copy with BiWKV's decay and boost kept float32, as model.stages.BFloat16Gained makes it."""
    module = copy.deepcopy(module).to(torch.bfloat16)
    for m in module.modules():
        if isinstance(m, SpatialMix):
            m.decay.data, m.boost.data = m.decay.data.float(), m.boost.data.float()
    return module


def test_bfloat16_blocks_take_the_fused_norms_at_inference_only() -> None:
    """A bfloat16 Bi-RWKV block switched by use_fused_kernels computes what its PyTorch passes
    compute (within bfloat16 rounding of the LayerNorm statistics), eager and scripted; a float32
    block is not switched (its results stay PyTorch's); with autograd on, the PyTorch passes run."""
    torch.manual_seed(3)
    stage = reparameterize(BlockStage(24, depth=2, ratio=2)).eval()
    for block in stage.blocks:
        block.gamma1.data.uniform_(0.5, 1.5)
        block.gamma2.data.uniform_(0.5, 1.5)
    x = torch.randn(1, 24, 12, 20).bfloat16()
    fused = use_fused_kernels(bfloat16_copy(stage))
    plain = copy.deepcopy(fused)
    for block in plain.blocks:
        block.fused_norms = False
    assert all(b.fused_norms for b in fused.blocks)
    assert not any(b.fused_norms for b in use_fused_kernels(copy.deepcopy(stage)).blocks)  # float32
    with torch.no_grad():
        got, want = fused(x), plain(x)
        scripted = torch.jit.freeze(torch.jit.script(fused))
        assert "lalic::residual_layer_norm" in str(scripted.graph)
        assert torch.equal(scripted(x), got)
    torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02)
    with torch.enable_grad():
        assert torch.equal(fused(x), plain(x))
