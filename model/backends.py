"""The runtimes behind :class:`model.codec.Codec`: eager PyTorch, TorchScript and onnxruntime.

:func:`load_stages` turns a network into :class:`Stages` (the stages of :mod:`model.stages`, each
behind a :class:`Runner`); the codec and the coding loop call only those. ``torch`` calls the
modules; ``torchscript`` scripts and freezes them in memory, or loads files that ``lalic export``
wrote; ``onnxruntime`` loads exported ONNX files (:mod:`model.export`), exporting them into the
per-weights cache first when they are missing or stale.

onnxruntime: the CPU package ``onnxruntime`` is what tests and benchmarks use; the GPU image uses
``onnxruntime-gpu`` instead (the two packages provide the same module and must never be
installed together). Sessions of the entropy-parameter stages run with one intra-op thread, like
the eager path, so that streams do not depend on thread settings.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from model import transform_kernels
from model.context import SelectingNetworks
from model.export import (
    FORMAT_VERSION,
    cache_dir,
    code_fingerprint,
    export_stages,
    read_manifest,
    script_stage,
)
from model.lalic import LALIC
from model.stages import is_entropy_stage, stage_modules

log = logging.getLogger(__name__)

BACKENDS = ("torch", "torchscript", "onnxruntime")


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


class Stages(SelectingNetworks):
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


def check_backend(backend: str) -> str:
    """``backend`` if it is one of :data:`BACKENDS`; a ValueError naming them otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not available (supported: {', '.join(BACKENDS)})")
    return backend


def load_stages(
    net: LALIC,
    backend: str,
    digest: str,
    export_dir: str | Path | None = None,
    threads: int | None = None,
    device: str = "cpu",
    synthesis_precision: str = "float32",
    analysis_precision: str = "float32",
    fused_kernels: bool = True,
) -> Stages:
    """The :class:`Stages` of ``net`` on ``backend``.

    ``torch`` calls the modules; ``torchscript`` scripts them in memory (or loads ``export_dir``);
    ``onnxruntime`` loads ``export_dir``, or the per-weights cache, exporting into it first if it
    is missing or stale (about a minute for lalic-s on two cores). Files whose manifest names
    other weights are refused. ``bfloat16`` for g_s or g_a (:class:`model.stages.BFloat16Gained`)
    needs the in-memory torch or torchscript backend. ``fused_kernels``: g_a's and g_s's Spatial Mixes
    on the fused CPU kernel (:func:`model.stages.stage_modules`) where it was built and the stages
    run in memory on the CPU; files exported to ``export_dir`` keep the PyTorch formulation.
    """
    check_backend(backend)
    reduced = {"synthesis": synthesis_precision, "analysis": analysis_precision}
    for stage, precision in reduced.items():
        if precision == "bfloat16" and (backend == "onnxruntime" or export_dir is not None):
            raise ValueError(
                f"{stage} precision {precision} needs backend torch or torchscript without "
                "export_dir (exported files hold float32 networks)"
            )
    fused = fused_kernels and torch.device(device).type == "cpu" and transform_kernels.available()
    if backend == "torch":
        modules = stage_modules(net, synthesis_precision, analysis_precision, fused)
        runners: dict[str, Runner] = {n: ModuleRunner(m) for n, m in modules.items()}
        return Stages(runners, backend)
    fmt = "torchscript" if backend == "torchscript" else "onnx"
    if backend == "torchscript" and export_dir is None:
        modules = stage_modules(net, synthesis_precision, analysis_precision, fused)
        runners = {n: ModuleRunner(script_stage(m)) for n, m in modules.items()}
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
    """The manifest of ``directory`` if it holds a ``fmt`` export of these weights and this code."""
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
