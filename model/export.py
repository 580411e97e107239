"""Backends for LALIC's networks: eager PyTorch, TorchScript and ONNX (onnxruntime).

Only the neural stages are exported; entropy coding and the pass-by-pass coding loop
(:meth:`model.context.ContextModel.code`) stay Python and call the networks through
:class:`Stages`, whichever backend runs them (CompressAI issues #72, #87 and #247: the
``compress``/``decompress`` loops of learned codecs cannot be scripted or exported). The stages:

================  =====================================  =========================================
name              inputs                                 output
================  =====================================  =========================================
analysis          image (B, 3, H, W), quality (B,)       y = g_a(x) * gain(quality)
hyper_analysis    y (B, M, H/16, W/16)                   z = h_a(y)
hyper_synthesis   z_hat (B, Z, H/64, W/64)               hyper = h_s(z_hat)
synthesis         y_hat (B, M, H/16, W/16), quality      x_hat = g_s(y_hat * inverse_gain(quality))
channel{k}        earlier slices (B, sum g, h, w)        channel context of slice k >= 1
spatial{k}        decoded anchors (B, g_k, h, w)         checkerboard context of slice k
params{k}         tokens (B, n, cin)                     scales, means (B, n, g_k)
================  =====================================  =========================================

Height, width, batch and token count are dynamic in every export. Omni-Shift is folded into its
single 5x5 kernel before export (:meth:`model.lalic.LALIC.prepare_for_inference`).

ONNX goes through the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, opset 18); the
legacy TorchScript-based exporter cannot express BiWKV's ``logcumsumexp``. The exporter lowers
``logcumsumexp`` as ``log(cumsum(exp(x - max))) + max`` with one maximum per tensor; BiWKV runs
that scan in float64 on chunk summaries, so terms only vanish when they lie more than ~700 below
the maximum, far outside the ranges checked in ``tests/model/test_backends.py`` (|decay| <= 8,
|k| <= 40, sequence lengths 1..16384).

onnxruntime: the CPU package ``onnxruntime`` is what tests and benchmarks use; the GPU image uses
``onnxruntime-gpu`` instead (the two packages provide the same module and must never be
installed together). Sessions for the entropy-parameter networks run with one intra-op thread,
like the eager path, so that streams do not depend on thread settings.

Exports are cached per weights and code version under ``~/.cache/lalic/export`` (``LALIC_CACHE``
overrides the root); ``lalic export`` writes them anywhere, with a manifest naming the weights.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import model.layers
from model.context import ParameterNet
from model.lalic import LALIC, interpolated_gain
from model.layers import CHUNK, _exclusive_logcumsumexp

log = logging.getLogger(__name__)

BACKENDS = ("torch", "torchscript", "onnxruntime")
OPSET = 18
FORMAT_VERSION = 1
_SOURCES = ("layers.py", "transforms.py", "context.py", "lalic.py", "export.py")


# ---------------------------------------------------------------------------------------------
# Stage modules: tensors in, tensors out, holding only the weights they need.
# ---------------------------------------------------------------------------------------------
class GainedAnalysis(nn.Module):
    """``g_a(x) * gain(quality)`` (Cui et al. 2021 variable rate; a gain of 1 for fixed-rate nets)."""

    def __init__(self, net: LALIC) -> None:
        super().__init__()
        self.g_a = net.g_a
        table = net.log_gain.detach() if net.config.variable_rate else torch.zeros(2, net.config.latent)
        self.register_buffer("log_gain", table.clone())

    def forward(self, x: Tensor, quality: Tensor) -> Tensor:
        return self.g_a(x) * interpolated_gain(self.log_gain, quality)


class GainedSynthesis(nn.Module):
    """``g_s(y_hat * inverse_gain(quality))``."""

    def __init__(self, net: LALIC) -> None:
        super().__init__()
        self.g_s = net.g_s
        fixed = torch.zeros(2, net.config.latent)
        table = net.log_inverse_gain.detach() if net.config.variable_rate else fixed
        self.register_buffer("log_inverse_gain", table.clone())

    def forward(self, y_hat: Tensor, quality: Tensor) -> Tensor:
        return self.g_s(y_hat * interpolated_gain(self.log_inverse_gain, quality))


class SplitParams(nn.Module):
    """A parameter network returning ``(scales, means)`` as two tensors (scriptable, exportable)."""

    def __init__(self, params: ParameterNet) -> None:
        super().__init__()
        self.blocks = params.blocks

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        out = self.blocks(tokens)
        g = out.shape[-1] // 2
        return out[..., :g], out[..., g:]


def stage_modules(net: LALIC) -> dict[str, nn.Module]:
    """Every stage of a network prepared for inference, by name (see the module docstring)."""
    ctx = net.context
    stages: dict[str, nn.Module] = {
        "analysis": GainedAnalysis(net),
        "hyper_analysis": net.h_a,
        "hyper_synthesis": net.h_s,
        "synthesis": GainedSynthesis(net),
    }
    for k in range(len(ctx.slices)):
        if k:
            stages[f"channel{k}"] = ctx.channel[k - 1]
        stages[f"spatial{k}"] = ctx.spatial[k]
        stages[f"params{k}"] = SplitParams(ctx.params[k])
    return stages


ENTROPY_STAGES = ("hyper_synthesis", "channel", "spatial", "params")
"""Stages on the entropy-parameter path (their float results decide the coding distributions)."""


def is_entropy_stage(name: str) -> bool:
    return name.rstrip("0123456789") in ENTROPY_STAGES


def example_inputs(net: LALIC, name: str) -> tuple[Tensor, ...]:
    """Inputs to trace ``name`` with: batch 2 and maps whose every Bi-RWKV stage has > 64 tokens,
    so that the exporter keeps BiWKV's general multi-chunk path and never specialises on 1."""
    c = net.config
    g = torch.Generator().manual_seed(0)
    q = torch.tensor([2.5, 4.0])
    kind, k = name.rstrip("0123456789"), int(name[len(name.rstrip("0123456789")) :] or 0)
    if kind == "analysis":
        return torch.rand(2, 3, 128, 192, generator=g), q
    if kind == "hyper_analysis":
        return (torch.randn(2, c.latent, 16, 24, generator=g),)
    if kind == "hyper_synthesis":
        return (torch.randn(2, c.hyper_latent, 4, 6, generator=g),)
    if kind == "synthesis":
        return torch.randn(2, c.latent, 8, 12, generator=g), q
    if kind == "channel":
        return (torch.randn(2, sum(c.slices[:k]), 16, 24, generator=g),)
    if kind == "spatial":
        return (torch.randn(2, c.slices[k], 16, 24, generator=g),)
    if kind == "params":
        cin = net.context.params[k].blocks[0].proj.in_features
        return (torch.randn(2, 100, cin, generator=g),)
    raise KeyError(name)


def _dynamic_shapes(name: str) -> tuple[dict[int, Any], ...]:
    dyn = torch.export.Dim.DYNAMIC
    kind = name.rstrip("0123456789")
    if kind in ("analysis", "synthesis"):
        return {0: dyn, 2: dyn, 3: dyn}, {0: dyn}
    if kind == "params":
        return ({0: dyn, 1: dyn},)
    return ({0: dyn, 2: dyn, 3: dyn},)


# ---------------------------------------------------------------------------------------------
# Export to files
# ---------------------------------------------------------------------------------------------
def script_stage(module: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script`` then ``torch.jit.freeze`` (weights inlined as constants).

    Freezing kept every output bit-identical to eager PyTorch here and made g_s 20 % faster
    (768x512, 2 threads: 211 -> 167 ms; the Spatial Mix went 130 -> 91 ms on one core).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.freeze(torch.jit.script(module.eval()))


def code_fingerprint() -> str:
    """Hash of the network code, torch version and opset: exports from other code are stale."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for name in _SOURCES:
        h.update((root / name).read_bytes())
    h.update(f"{torch.__version__}|{OPSET}|{FORMAT_VERSION}".encode())
    return h.hexdigest()[:12]


def _suffix(fmt: str) -> str:
    return {"torchscript": ".pt", "onnx": ".onnx"}[fmt]


def export_stages(
    net: LALIC,
    directory: str | Path,
    fmt: str,
    digest: str,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Export every stage of ``net`` (prepared for inference) as ``fmt`` ("torchscript" or "onnx")
    into ``directory`` with a ``manifest.json``; written to a temporary folder, then renamed."""
    if fmt not in ("torchscript", "onnx"):
        raise ValueError(f"unknown export format {fmt!r}")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=directory.parent))
    stages = stage_modules(net.prepare_for_inference())
    files = {}
    start = time.perf_counter()
    try:
        for name, module in stages.items():
            if progress:
                progress(name)
            path = tmp / f"{name}{_suffix(fmt)}"
            if fmt == "torchscript":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    torch.jit.save(script_stage(module), str(path))
            else:
                _export_onnx(module, example_inputs(net, name), _dynamic_shapes(name), path)
            files[name] = path.name
        manifest = {
            "format": fmt,
            "format_version": FORMAT_VERSION,
            "model_id": net.config.name,
            "config": net.config.to_dict(),
            "weights_digest": digest,
            "code_fingerprint": code_fingerprint(),
            "torch": torch.__version__,
            "opset": OPSET if fmt == "onnx" else None,
            "stages": files,
            "export_seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


# BiWKV in ONNX ---------------------------------------------------------------------------------
# Tracing BiWKV's chunk arithmetic with symbolic height and width costs the exporter ~4.5 s per
# call site (sympy), 14 times in lalic-s. Every stage graph therefore holds a single custom node
# ``lalic.BiWKV(w, u, k, v)``, and its body, exported once from :func:`biwkv_branch_free`, is
# attached to each model as an ONNX model-local function (onnxruntime inlines it on load).
BIWKV_DOMAIN = "lalic"


def biwkv_branch_free(w: Tensor, u: Tensor, k: Tensor, v: Tensor, chunk: int = CHUNK) -> Tensor:
    """:func:`model.layers.biwkv` with a fixed chunk length and no shape-dependent branches.

    The same function (up to float rounding) for every sequence length, so that one exported
    graph serves all. For ``T < chunk`` the one padded chunk masks the decay kernel to distances
    below ``T`` (the eager code shortens the chunk instead), which keeps every exponent within
    ``|decay|``; for ``T >= chunk`` the masks are all true and the arithmetic is the eager one.
    """
    b, c, t = k.shape
    pad = (chunk - t % chunk) % chunk
    v_min = v.amin(dim=-1, keepdim=True)
    v_max = v.amax(dim=-1, keepdim=True)
    v_span = torch.maximum(v_max - v_min, 1e-4 * torch.maximum(v_max.abs(), v_min.abs())).clamp_min(1e-6)
    shift = v_min - 0.05 * v_span
    k = F.pad(k, (0, pad), value=-1e4).reshape(b, c, -1, chunk)
    v = F.pad(v - shift, (0, pad)).reshape(b, c, -1, chunk)
    n_chunks = k.shape[2]
    m = k.amax(dim=-1, keepdim=True)
    ek = torch.exp(k - m)
    both = torch.cat([ek * v, ek], dim=2)
    pos = torch.arange(chunk, device=k.device, dtype=k.dtype)
    dist = (pos[:, None] - pos[None, :]).abs()
    expo = torch.where(dist < t, -(dist - 1.0)[None] * w[:, None, None], float("-inf"))
    eye = torch.eye(chunk, device=w.device, dtype=torch.bool)
    kernel = torch.where(eye[None], torch.exp(u)[:, None, None], torch.exp(expo))
    intra = torch.matmul(both, kernel)
    back = chunk - 1 - pos
    to_end = torch.exp(torch.where(back < t, -back, 0.0)[None] * w[:, None])
    to_start = torch.exp(torch.where(pos < t, -pos, 0.0)[None] * w[:, None])
    summ = torch.matmul(both, torch.stack([to_end, to_start], dim=-1))
    w64 = w.double()[:, None]
    lw = chunk * w64
    idx = torch.arange(n_chunks, device=k.device, dtype=torch.float64)
    m64 = m[..., 0].double()
    log_s = torch.log(summ.double()).view(b, c, 2, n_chunks, 2)
    alpha_f = m64[:, :, None] + log_s[..., 0] + idx * lw[:, None]
    alpha_b = m64[:, :, None] + log_s[..., 1] - idx * lw[:, None]
    carry_f = _exclusive_logcumsumexp(alpha_f, reverse=False) - (idx - 1) * lw[:, None]
    carry_b = _exclusive_logcumsumexp(alpha_b, reverse=True) + (idx + 1) * lw[:, None]
    ref = torch.maximum(m64, torch.maximum(carry_f[:, :, 1], carry_b[:, :, 1]))[:, :, None]
    scale_local = torch.exp(m64[:, :, None] - ref).to(k.dtype)[..., None]
    scale_f = torch.exp(carry_f - ref).to(k.dtype)
    scale_b = torch.exp(carry_b - ref).to(k.dtype)
    carries = torch.stack([scale_f, scale_b], dim=-1).view(b, c, 2 * n_chunks, 2)
    profiles = torch.stack([to_start, to_end], dim=1)
    scale_local = scale_local.expand(b, c, 2, n_chunks, 1).reshape(b, c, 2 * n_chunks, 1)
    total = (torch.matmul(carries, profiles) + scale_local * intra).view(b, c, 2, n_chunks, chunk)
    out = (total[:, :, 0] / total[:, :, 1]).reshape(b, c, n_chunks * chunk)[..., :t]
    return out + shift


class _BiWKV(nn.Module):
    def forward(self, w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return biwkv_branch_free(w, u, k, v)


def _symbolic_biwkv(w: Tensor, u: Tensor, k: Tensor, v: Tensor, chunk: int = CHUNK) -> Tensor:
    return torch.onnx.ops.symbolic(
        f"{BIWKV_DOMAIN}::BiWKV", (w, u, k, v), dtype=v.dtype, shape=v.shape, version=1
    )


@contextlib.contextmanager
def _opaque_biwkv() -> Iterator[None]:
    """Make Spatial Mix emit ``lalic.BiWKV`` nodes while exporting."""
    original = model.layers.biwkv
    model.layers.biwkv = _symbolic_biwkv
    try:
        yield
    finally:
        model.layers.biwkv = original


def _onnx_export(module: nn.Module, args: tuple[Tensor, ...], dynamic: tuple) -> Any:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            module.eval(),
            args,
            dynamo=True,
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            optimize=True,
            verbose=False,
        )


@functools.cache
def biwkv_function() -> tuple[Any, ...]:
    """ONNX FunctionProtos: ``lalic.BiWKV`` (from :func:`biwkv_branch_free`) and what it calls.

    Cached on disk next to the exports (one model file holding the functions).
    """
    import onnx

    path = _cache_root() / "export" / f"biwkv-{code_fingerprint()}.onnx"
    if path.exists():
        return tuple(onnx.load(str(path)).functions)
    functions = _export_biwkv_function()
    holder = onnx.helper.make_model(onnx.helper.make_graph([], "biwkv", [], []), functions=functions)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    onnx.save(holder, str(tmp))
    tmp.replace(path)
    return functions


def _export_biwkv_function() -> tuple[Any, ...]:
    from onnx import helper

    c = 8
    args = (torch.rand(c) - 0.5, torch.randn(c), torch.randn(2, c, 300), torch.randn(2, c, 300))
    dyn = torch.export.Dim.DYNAMIC
    shapes = ({0: dyn}, {0: dyn}, {0: dyn, 1: dyn, 2: dyn}, {0: dyn, 1: dyn, 2: dyn})
    proto = _onnx_export(_BiWKV(), args, shapes).model_proto
    graph = proto.graph
    nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in graph.initializer]
    nodes += list(graph.node)
    opsets = [o for o in proto.opset_import if o.domain != BIWKV_DOMAIN]
    fn = helper.make_function(
        BIWKV_DOMAIN, "BiWKV", [i.name for i in graph.input], [o.name for o in graph.output], nodes, opsets
    )
    return (fn, *proto.functions)


def _export_onnx(module: nn.Module, args: tuple[Tensor, ...], dynamic: tuple, path: Path) -> None:
    import onnx
    from onnx import helper

    with _opaque_biwkv():
        proto = _onnx_export(module, args, dynamic).model_proto
    used = any(n.domain == BIWKV_DOMAIN for n in proto.graph.node)
    if used:
        have = {(f.domain, f.name) for f in proto.functions}
        for fn in biwkv_function():
            if (fn.domain, fn.name) not in have:
                proto.functions.append(fn)
        domains = {o.domain for o in proto.opset_import}
        for fn in biwkv_function():
            for o in fn.opset_import:
                if o.domain not in domains:
                    proto.opset_import.append(o)
                    domains.add(o.domain)
        if BIWKV_DOMAIN not in domains:
            proto.opset_import.append(helper.make_opsetid(BIWKV_DOMAIN, 1))
    onnx.save(proto, str(path))


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: not an export directory")
    return json.loads(path.read_text())


def _cache_root() -> Path:
    return Path(os.environ.get("LALIC_CACHE", Path.home() / ".cache" / "lalic"))


def cache_dir(model_id: str, digest: str, fmt: str) -> Path:
    """Where the per-weights export of the current code lives (``LALIC_CACHE`` overrides the root)."""
    return _cache_root() / "export" / f"{model_id}-{digest}-{code_fingerprint()}" / fmt


# ---------------------------------------------------------------------------------------------
# Runners and the stage set the codec calls
# ---------------------------------------------------------------------------------------------
class Runner(Protocol):
    """One stage on one backend: tensors in, a tuple of tensors out."""

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]: ...


class ModuleRunner:
    """An eager or TorchScript module.

    TorchScript runs without the profiling executor's shape specialisation: with it, the first
    two calls at every new image size re-profiled and re-optimised the graphs (seconds each),
    and the frozen graphs were no faster afterwards.
    """

    def __init__(self, module: nn.Module | torch.jit.ScriptModule) -> None:
        self.module = module
        self.scripted = isinstance(module, torch.jit.ScriptModule)

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if self.scripted:
            with torch.jit.optimized_execution(False):
                out = self.module(*inputs)
        else:
            out = self.module(*inputs)
        return tuple(out) if isinstance(out, tuple | list) else (out,)


class OnnxRunner:
    """An onnxruntime session; tensors go in and out through numpy (zero-copy where possible)."""

    def __init__(self, path: str | Path, threads: int, device: str = "cpu") -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # no spin-waiting: on a 2-core host idle spinning threads slow everything else down
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.names = [i.name for i in self.session.get_inputs()]
        self.device = device

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        feeds = {
            n: np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())
            for n, t in zip(self.names, inputs, strict=True)
        }
        outs = self.session.run(None, feeds)
        return tuple(torch.from_numpy(o).to(self.device) for o in outs)


class Stages:
    """The networks of one codec behind one backend; also the :class:`~model.context.ContextNetworks`
    of the coding loop."""

    def __init__(self, runners: dict[str, Runner], backend: str) -> None:
        self.runners = runners
        self.backend = backend

    def analysis(self, x: Tensor, quality: Tensor) -> Tensor:
        return self.runners["analysis"](x, quality)[0]

    def hyper_analysis(self, y: Tensor) -> Tensor:
        return self.runners["hyper_analysis"](y)[0]

    def hyper_synthesis(self, z_hat: Tensor) -> Tensor:
        return self.runners["hyper_synthesis"](z_hat)[0]

    def synthesis(self, y_hat: Tensor, quality: Tensor) -> Tensor:
        return self.runners["synthesis"](y_hat, quality)[0]

    def channel(self, k: int, decoded: Tensor) -> Tensor:
        return self.runners[f"channel{k}"](decoded)[0]

    def spatial(self, k: int, anchors: Tensor) -> Tensor:
        return self.runners[f"spatial{k}"](anchors)[0]

    def params(self, k: int, tokens: Tensor) -> tuple[Tensor, Tensor]:
        scales, means = self.runners[f"params{k}"](tokens)
        return scales, means


def load_stages(
    net: LALIC,
    backend: str,
    digest: str,
    export_dir: str | Path | None = None,
    threads: int | None = None,
    device: str = "cpu",
) -> Stages:
    """The :class:`Stages` of ``net`` on ``backend``.

    ``torch`` calls the modules; ``torchscript`` scripts them in memory (or loads ``export_dir``);
    ``onnxruntime`` loads ``export_dir``, or the per-weights cache, exporting into it first if it
    is missing or stale (about a minute for lalic-s on two cores). Files whose manifest names
    other weights are refused.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not available (supported: {', '.join(BACKENDS)})")
    if backend == "torch":
        runners: dict[str, Runner] = {n: ModuleRunner(m) for n, m in stage_modules(net).items()}
        return Stages(runners, backend)
    fmt = "torchscript" if backend == "torchscript" else "onnx"
    if backend == "torchscript" and export_dir is None:
        runners = {n: ModuleRunner(script_stage(m)) for n, m in stage_modules(net).items()}
        return Stages(runners, backend)
    directory = Path(export_dir) if export_dir is not None else cache_dir(net.config.name, digest, fmt)
    manifest = _usable_manifest(directory, fmt, digest)
    if manifest is None:
        if export_dir is not None and (directory / "manifest.json").exists():
            raise ValueError(f"{directory} holds an export of other weights or code; re-run lalic export")
        log.warning("exporting %s stages of %s to %s (first use)", fmt, net.config.name, directory)
        export_stages(net, directory, fmt, digest)
        manifest = read_manifest(directory)
    n_threads = threads or torch.get_num_threads()
    runners = {}
    for name, file in manifest["stages"].items():
        path = directory / file
        if fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                runners[name] = ModuleRunner(torch.jit.load(str(path), map_location=device))
        else:
            runners[name] = OnnxRunner(path, 1 if is_entropy_stage(name) else n_threads, device)
    return Stages(runners, backend)


def _usable_manifest(directory: Path, fmt: str, digest: str) -> dict | None:
    try:
        manifest = read_manifest(directory)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    ok = (
        manifest.get("format") == fmt
        and manifest.get("weights_digest") == digest
        and manifest.get("format_version") == FORMAT_VERSION
        and manifest.get("code_fingerprint") == code_fingerprint()
    )
    return manifest if ok else None


# ---------------------------------------------------------------------------------------------
# lalic export
# ---------------------------------------------------------------------------------------------
def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lalic export``."""
    parser.description = (
        "Export LALIC's networks (g_a with gain, h_a, h_s, context and parameter networks, g_s with "
        "inverse gain) to TorchScript or ONNX with dynamic batch, height and width. Entropy coding "
        "stays in Python; load the result with Codec(..., backend=..., export_dir=DIR)."
    )
    parser.add_argument("--weights", help="weight file (default: the shipped lalic-s weights)")
    parser.add_argument("--random", metavar="CONFIG", help="export randomly initialised weights of CONFIG")
    parser.add_argument("--format", choices=["onnx", "torchscript", "all"], default="all")
    parser.add_argument("--output", "-o", default="export", help="output directory (default: ./export)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="round-trip a test image through each exported backend afterwards",
    )


def _check_against_eager(eager: Any, exported: Any) -> str:
    """Round-trip a test image through ``exported`` and compare with the eager codec."""
    from model.bitstream import BitstreamError

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:128] / 128
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1) * 80 + 128
    image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    data = exported.compress(image, 3.0)
    own = exported.decompress(data)
    same_stream = data == eager.compress(image, 3.0)
    try:
        diff = int(np.abs(eager.decompress(data).astype(int) - own.astype(int)).max())
        decoded = (
            "eager decodes it to the same pixels"
            if diff == 0
            else (f"eager decodes it within {diff} level(s)")
        )
    except BitstreamError:
        decoded = "eager refuses it (entropy parameters differ: BitstreamError)"
    stream = "same stream as eager" if same_stream else "stream differs from eager"
    return f"{len(data)} bytes, {stream}, {decoded}"


def run_export(args: argparse.Namespace) -> int:
    """``lalic export``: write the stages and a manifest per format; optionally check them."""
    from model.codec import Codec

    codec = Codec.random(args.random, seed=0) if args.random else Codec.from_pretrained(args.weights)
    formats: Sequence[str] = ("onnx", "torchscript") if args.format == "all" else (args.format,)
    out = Path(args.output)
    for fmt in formats:
        start = time.perf_counter()
        target = out / fmt
        export_stages(
            codec.net,
            target,
            fmt,
            codec.weights_digest,
            progress=lambda name, fmt=fmt: print(f"  {fmt}: {name}", flush=True),
        )
        size = sum(p.stat().st_size for p in target.iterdir())
        print(
            f"{target}: {len(read_manifest(target)['stages'])} stages, {size / 1e6:.1f} MB, "
            f"{time.perf_counter() - start:.0f} s"
        )
        if args.check:
            backend = "onnxruntime" if fmt == "onnx" else "torchscript"
            exported = Codec(codec.net, backend=backend, export_dir=str(target))
            print(f"  check {backend}: {_check_against_eager(codec, exported)}")
    return 0
