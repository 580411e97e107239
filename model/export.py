"""Writing LALIC's stages (:mod:`model.stages`) to files: TorchScript and ONNX.

Height, width, batch and token count are dynamic in every export. Omni-Shift is folded into its
single 5x5 kernel before export (:meth:`model.lalic.LALIC.prepare_for_inference`).
:mod:`model.backends` loads what this module writes.

ONNX goes through the dynamo exporter (``torch.onnx.export(..., dynamo=True)``, opset 18); the
legacy TorchScript-based exporter cannot express BiWKV's ``logcumsumexp``. The exporter lowers
``logcumsumexp`` as ``log(cumsum(exp(x - max))) + max`` with one maximum per tensor; BiWKV runs
that scan in float64 on chunk summaries, so terms only vanish when they lie more than ~700 below
the maximum, far outside the ranges checked in ``tests/model/test_backends.py`` (|decay| <= 8,
|k| <= 40, sequence lengths 1..16384).

Exports are cached per weights and code version under ``~/.cache/lalic/export`` (``LALIC_CACHE``
overrides the root); ``lalic export`` writes them anywhere, with a manifest naming the weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.lalic import LALIC
from model.layers import BIWKV_DOMAIN, biwkv_branch_free
from model.stages import stage_kind, stage_modules

OPSET = 18
FORMAT_VERSION = 1
_SOURCES = ("layers.py", "transforms.py", "context.py", "lalic.py", "stages.py", "export.py")


def example_inputs(net: LALIC, name: str) -> tuple[Tensor, ...]:
    """Inputs to trace ``name`` with: batch 2 and maps whose every Bi-RWKV stage has > 64 tokens,
    so that the exporter keeps BiWKV's general multi-chunk path and never specialises on 1."""
    c = net.config
    g = torch.Generator().manual_seed(0)
    q = torch.tensor([2.5, 4.0])
    kind = stage_kind(name)
    k = int(name[len(kind) :] or 0)
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
    kind = stage_kind(name)
    if kind in ("analysis", "synthesis"):
        return {0: dyn, 2: dyn, 3: dyn}, {0: dyn}
    if kind == "params":
        return ({0: dyn, 1: dyn},)
    return ({0: dyn, 2: dyn, 3: dyn},)


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
class _BiWKV(nn.Module):
    """:func:`model.layers.biwkv_branch_free` as a module, to export the body of ``lalic.BiWKV``."""

    def forward(self, w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return biwkv_branch_free(w, u, k, v)


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

    proto = _onnx_export(module, args, dynamic).model_proto  # Spatial Mix emits lalic.BiWKV nodes
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
