"""The official LALIC checkpoints onto our ``lalic`` configuration (``lalic import``).

The official code (github sjtu-medialab/RwkvCompress, ``models/lalic.py`` at d280846, built on
CompressAI 1.2.x; MIT licence) releases one checkpoint per quality. Every parameter of our ``lalic``
network has an upstream counterpart (``../shared/reference/lalic-official/CHECKPOINTS.md`` and
``official-state-dict-layout.json`` list the official names and shapes):

* g_a, g_s, h_a and h_s are flat ``nn.Sequential`` upstream (``g_a.1`` is a block, ``g_a.3`` a
  convolution); ours nest the blocks of a stage (``g_a.1.blocks.0``, ``g_a.2``).
* Inside a Bi-RWKV block ``ln1``/``ln2``, ``att`` (spatial mix), ``ffn`` (channel mix) and
  ``omni_shift.conv1x1/conv3x3/conv5x5`` are our ``norm1``/``norm2``, ``spatial``, ``channel`` and
  ``shift.conv1/conv3/conv5``; upstream's separate ``att.key``, ``att.value`` and ``att.receptance``
  weights are our one ``spatial.kvr`` weight, concatenated in that order (k | v | r).
* The entropy model lives under ``latent_codec``: the factorised prior under ``hyper``, the channel
  contexts under ``y.channel_context.y{k}`` (conv3x3, blocks, conv1x1 flat), and per slice under
  ``y.latent_codec.y{k}`` the checkerboard convolution (``context_prediction``) and the parameter
  network (``entropy_parameters.{0,2,4}``, CompressAI's ``sequential_channel_ramp`` with identity
  activations between; its 1x1 convolution ``mix`` is our ``proj`` linear layer).
* The factorised prior's ``matrices.i``/``biases.i``/``factors.i`` are ``_matrices.i`` etc. in the
  state dicts of CompressAI 1.2.6 and later; both are read.

What upstream stores but we derive is checked where it is determined, then dropped: the folded
Omni-Shift kernels (``conv5x5_reparam``, recomputed by the official code on its first eval call and
by :meth:`model.lalic.LALIC.prepare_for_inference` here), CompressAI's CDF tables, offsets, lengths
and 64-entry scale tables (we rebuild our own with :meth:`model.lalic.LALIC.update`), the
checkerboard masks (must be the checkerboard), the likelihood and scale bounds and the prior's
``target`` (must be ours), and ``latent_codec.hyper.h_a``/``h_s`` (the same modules as ``h_a``/``h_s``
upstream, so they must be equal copies). Derived tensors may be absent. Every other upstream tensor
must be used exactly once and every parameter of ours filled: anything else is an error naming the
keys (and both shapes for a shape mismatch), never a partial load. Our buffers (the prior's target,
the scale table, the CDF tables) are ours.

Results still differ from the official evaluation even with every tensor in place (CHECKPOINTS.md):
our BiWKV is the exact formula while the official CUDA kernel is compiled with fast math and sums in
chunks, our y is coded with 128 nearest-in-log-scale tables instead of CompressAI's 64, and official
evaluation pads to a multiple of 128 with zeros where we replicate edges to a multiple of 64.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from model.configs import get_config
from model.entropy import LIKELIHOOD_BOUND, SCALE_BOUND
from model.lalic import LALIC
from model.layers import BlockStage
from model.zoo import WeightSet, WeightSetMember, save_weight_set, sha256_file

CONFIG = "lalic"
"""Our configuration that the official checkpoints fill."""

SOURCE = "official LALIC checkpoint (github sjtu-medialab/RwkvCompress, models/lalic.py at d280846)"

WRAPPERS = ("state_dict", "model_state_dict")
"""Keys under which a checkpoint may hold the state dict, tried in this order (the official eval.py)."""

DATA_PARALLEL_PREFIX = "module."

_PRIOR = "latent_codec.hyper.entropy_bottleneck."
_SLICE = "latent_codec.y.latent_codec.y{k}."
_CHANNEL = "latent_codec.y.channel_context.y{k}"
_SHARED = {"h_a": "latent_codec.hyper.h_a", "h_s": "latent_codec.hyper.h_s"}
"""Upstream's hyperprior holds the very modules h_a and h_s: their keys appear twice."""

_PRIOR_RENAMES = re.compile(r"^(.*entropy_bottleneck\.)_(matrices|biases|factors)\.(\d+)$")
"""CompressAI >= 1.2.6 names of the factorised prior's parameters; read as the older names."""

_BLOCK = {  # ours -> upstream, inside one Bi-RWKV block
    "gamma1": ("gamma1",),
    "gamma2": ("gamma2",),
    "norm1.weight": ("ln1.weight",),
    "norm1.bias": ("ln1.bias",),
    "norm2.weight": ("ln2.weight",),
    "norm2.bias": ("ln2.bias",),
    "spatial.decay": ("att.decay",),
    "spatial.boost": ("att.boost",),
    "spatial.kvr.weight": ("att.key.weight", "att.value.weight", "att.receptance.weight"),
    "spatial.output.weight": ("att.output.weight",),
    "channel.key.weight": ("ffn.key.weight",),
    "channel.value.weight": ("ffn.value.weight",),
    "channel.receptance.weight": ("ffn.receptance.weight",),
}
_SHIFT = {"alpha": "alpha", "conv1": "conv1x1.weight", "conv3": "conv3x3.weight", "conv5": "conv5x5.weight"}
_MIXES = {"spatial": "att", "channel": "ffn"}
_POINTWISE = {  # ours -> upstream, inside one parameter-network block
    "proj.weight": "mix.weight",
    "proj.bias": "mix.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
    "mlp.key.weight": "key.weight",
    "mlp.value.weight": "value.weight",
    "mlp.receptance.weight": "receptance.weight",
}
_MAX_NAMED = 20
"""Keys listed per kind of problem in an error message (then a count)."""


@dataclass(frozen=True)
class Mapped:
    """One of our parameters: the upstream tensors it is made of, concatenated along dim 0."""

    sources: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    """The shape each source must have."""


@dataclass(frozen=True)
class Derived:
    """An upstream tensor we do not load, and what it must be when present."""

    shape: tuple[int, ...] | None = None
    """Required shape; None for data whose size varies (CDF tables, scale tables)."""
    value: Tensor | None = None
    """Required value (bounds, the prior's target, checkerboard masks)."""
    copy_of: str | None = None
    """Upstream key it must equal (the hyperprior's shared h_a/h_s)."""


@dataclass(frozen=True)
class Layout:
    """How an official state dict maps onto one of our networks."""

    mapped: dict[str, Mapped]
    """Our parameter name -> its upstream sources."""
    derived: dict[str, Derived]
    """Upstream names that are dropped after their check."""


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _block(layout: Layout, net: nn.Module, ours: str, upstream: str) -> None:
    """Names of one Bi-RWKV block (``ours``/``upstream`` end with a dot)."""
    params = dict(net.named_parameters())
    for name, sources in _BLOCK.items():
        shape = _shape(params[name])
        parts = tuple((shape[0] // len(sources), *shape[1:]) for _ in sources)
        layout.mapped[ours + name] = Mapped(tuple(upstream + s for s in sources), parts)
    for mix, up_mix in _MIXES.items():
        for name, up_name in _SHIFT.items():
            shape = _shape(params[f"{mix}.shift.{name}"])
            layout.mapped[f"{ours}{mix}.shift.{name}"] = Mapped(
                (f"{upstream}{up_mix}.omni_shift.{up_name}",), (shape,)
            )
        folded = _shape(params[f"{mix}.shift.conv5"])
        layout.derived[f"{upstream}{up_mix}.omni_shift.conv5x5_reparam.weight"] = Derived(shape=folded)


def _sequence(layout: Layout, parts: Sequence[tuple[str, nn.Module]], ours: str, upstream: str) -> None:
    """A chain of convolutions and Bi-RWKV stages: ours nests each stage's blocks, upstream is flat."""
    flat = 0
    for name, module in parts:
        if isinstance(module, BlockStage):
            for j, block in enumerate(module.blocks):
                _block(layout, block, f"{ours}.{name}.blocks.{j}.", f"{upstream}.{flat + j}.")
            flat += len(module.blocks)
            continue
        for p, tensor in module.named_parameters():
            layout.mapped[f"{ours}.{name}.{p}"] = Mapped((f"{upstream}.{flat}.{p}",), (_shape(tensor),))
        flat += 1


def official_layout(net: LALIC) -> Layout:
    """The mapping between the official state dict and ``net``'s (built for every configuration with
    the official structure; :data:`CONFIG` is the one the released checkpoints fit)."""
    layout = Layout({}, {})
    for name in ("g_a", "g_s", "h_a", "h_s"):
        _sequence(layout, [(str(i), m) for i, m in enumerate(getattr(net, name))], name, name)
    for name, shared in _SHARED.items():
        for key, source in list(layout.mapped.items()):
            if key.startswith(name + "."):
                for upstream, shape in zip(source.sources, source.shapes, strict=True):
                    layout.derived[shared + upstream[len(name) :]] = Derived(shape=shape, copy_of=upstream)
        for key, derived in list(layout.derived.items()):
            if key.startswith(name + "."):
                layout.derived[shared + key[len(name) :]] = derived

    prior = net.entropy_bottleneck
    for p, tensor in prior.named_parameters():
        layout.mapped[f"entropy_bottleneck.{p}"] = Mapped((_PRIOR + p,), (_shape(tensor),))
    layout.derived[_PRIOR + "target"] = Derived(shape=_shape(prior.target), value=prior.target)
    layout.derived[_PRIOR + "likelihood_lower_bound.bound"] = Derived((1,), torch.tensor([LIKELIHOOD_BOUND]))
    for table in ("_quantized_cdf", "_offset", "_cdf_length"):
        layout.derived[_PRIOR + table] = Derived()

    context = net.context
    for k, spatial in enumerate(context.spatial):
        upstream = _SLICE.format(k=k)
        for p, tensor in spatial.named_parameters():
            layout.mapped[f"context.spatial.{k}.{p}"] = Mapped(
                (f"{upstream}context_prediction.{p}",), (_shape(tensor),)
            )
        mask = spatial.mask.expand_as(spatial.weight)
        layout.derived[f"{upstream}context_prediction.mask"] = Derived(_shape(mask), mask)
        conditional = f"{upstream}y.gaussian_conditional."
        for table in ("_quantized_cdf", "_offset", "_cdf_length", "scale_table"):
            layout.derived[conditional + table] = Derived()
        for bound, value in (
            ("scale_bound", SCALE_BOUND),
            ("lower_bound_scale.bound", SCALE_BOUND),
            ("likelihood_lower_bound.bound", LIKELIHOOD_BOUND),
        ):
            layout.derived[conditional + bound] = Derived((1,), torch.tensor([value]))
        for b, block in enumerate(context.params[k].blocks):
            params = dict(block.named_parameters())
            for name, up_name in _POINTWISE.items():
                shape = _shape(params[name])
                if name == "proj.weight":  # a 1x1 convolution upstream
                    shape = (*shape, 1, 1)
                layout.mapped[f"context.params.{k}.blocks.{b}.{name}"] = Mapped(
                    (f"{upstream}entropy_parameters.{2 * b}.{up_name}",), (shape,)
                )
    for k, channel in enumerate(context.channel, start=1):
        parts = [("inp", channel.inp), ("blocks", channel.blocks), ("out", channel.out)]
        _sequence(layout, parts, f"context.channel.{k - 1}", _CHANNEL.format(k=k))
    return layout


def _named(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _MAX_NAMED} more" if len(keys) > _MAX_NAMED else ""
    return ", ".join(keys[:_MAX_NAMED]) + more


def convert(upstream: Mapping[str, Tensor], net: LALIC) -> dict[str, Tensor]:
    """Our state dict for ``net`` from an official one (already unwrapped, see :func:`normalize`).

    Parameters come from upstream in their stored dtype (concatenated and reshaped as
    :func:`official_layout` says); buffers are ``net``'s own (its CDF tables are then rebuilt with
    :meth:`~model.lalic.LALIC.update`). Raises ValueError naming every missing, unused, misshapen or
    inconsistent key.
    """
    layout = official_layout(net)
    ours = dict(net.named_parameters())
    unfilled = sorted(set(ours) - set(layout.mapped))
    if unfilled:
        raise ValueError(f"{net.config.name} parameters without an official counterpart: {_named(unfilled)}")
    wanted = {s for m in layout.mapped.values() for s in m.sources}
    missing = sorted(wanted - set(upstream))
    unused = sorted(set(upstream) - wanted - set(layout.derived))
    problems = []
    if missing:
        problems.append(f"missing: {_named(missing)}")
    if unused:
        problems.append(f"unused: {_named(unused)}")
    checks = [
        (s, shape) for m in layout.mapped.values() for s, shape in zip(m.sources, m.shapes, strict=True)
    ]
    checks += [(key, d.shape) for key, d in layout.derived.items() if d.shape is not None]
    for key, shape in checks:
        if key in upstream and _shape(upstream[key]) != shape:
            problems.append(f"shape of {key}: {_shape(upstream[key])} in the checkpoint, {shape} expected")
    if problems:
        raise ValueError("not an official LALIC state dict: " + "; ".join(problems))
    for key, d in layout.derived.items():
        if key not in upstream:
            continue
        value = upstream[key]
        # compared in the checkpoint's dtype: a float16 model stores the 1e-9 bounds as 0
        if d.value is not None and not torch.equal(value, d.value.to(value.dtype)):
            shown, expected = value.flatten().tolist()[:8], d.value.to(value.dtype).flatten().tolist()[:8]
            problems.append(f"{key} is {shown}, ours is {expected}")
        if d.copy_of is not None and d.copy_of in upstream and not torch.equal(value, upstream[d.copy_of]):
            problems.append(f"{key} differs from {d.copy_of} (the same module upstream)")
    if problems:
        raise ValueError("inconsistent official LALIC state dict: " + "; ".join(problems))
    state = {k: v.detach().clone() for k, v in net.state_dict().items() if k not in ours}
    for key, m in layout.mapped.items():
        parts = [upstream[s] for s in m.sources]
        joined = parts[0] if len(parts) == 1 else torch.cat(parts)
        state[key] = joined.reshape(ours[key].shape)
    return state


def normalize(checkpoint: object, name: str = "the checkpoint") -> dict[str, Tensor]:
    """The state dict inside an official checkpoint: under ``state_dict`` or ``model_state_dict``, or
    the object itself; ``module.`` prefixes (data-parallel training) removed; the factorised prior's
    CompressAI >= 1.2.6 names (``_matrices.i``) read as the older ones (``matrices.i``)."""
    state = checkpoint
    if isinstance(checkpoint, Mapping):
        for key in WRAPPERS:
            if key in checkpoint:
                state = checkpoint[key]
                break
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{name} holds no state dict (a mapping of names to tensors)")
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if key.startswith(DATA_PARALLEL_PREFIX):
            key = key[len(DATA_PARALLEL_PREFIX) :]
        key = _PRIOR_RENAMES.sub(r"\1\2.\3", key)
        if key in out:
            raise ValueError(f"{name} holds {key} twice (with and without a prefix or an underscore)")
        out[key] = tensor
    return out


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The normalised state dict of an official checkpoint file (loaded with ``weights_only``, as the
    official eval.py does); errors do not repeat the path (callers name the file)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"not a torch checkpoint readable with weights_only=True: {first}") from None
    return normalize(blob)


def storage(state: Mapping[str, Tensor]) -> str:
    """Floating-point dtypes of a state dict, e.g. ``float32`` (kept as stored: exact)."""
    kinds = sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()})
    return "+".join(kinds)


def import_checkpoints(
    paths: Sequence[str | Path],
    qualities: Sequence[int],
    out: str | Path,
    labels: Sequence[str] | None = None,
    lambdas: Sequence[float] | None = None,
) -> dict:
    """Map official checkpoints (one per quality) onto our ``lalic`` network, rebuild the CDF tables,
    and write one weight set (:func:`model.zoo.save_weight_set`). Returns its manifest entry.

    Tensors keep the dtype they have in the checkpoints (exact); our buffers are added.
    """
    config = get_config(CONFIG)
    levels = len(config.lambdas)
    if len(qualities) != len(paths):
        raise ValueError(
            f"{len(paths)} checkpoint(s) but {len(qualities)} qualities: give one quality per file"
        )
    whole = all(isinstance(q, int) and not isinstance(q, bool) and 1 <= q <= levels for q in qualities)
    if len(set(qualities)) != len(qualities) or not whole:
        raise ValueError(f"qualities must be distinct integers in 1..{levels}, got {list(qualities)}")
    labels = list(labels) if labels is not None else [f"q{q}" for q in qualities]
    lambdas = list(lambdas) if lambdas is not None else [config.lambdas[q - 1] for q in qualities]
    if len(labels) != len(paths) or len(lambdas) != len(paths):
        raise ValueError("give one label and one lambda per checkpoint")
    # the set's own checks (labels that make model ids), before minutes of reading checkpoints
    empty = [WeightSetMember(float(q), label, 0.0, {}) for q, label in zip(qualities, labels, strict=True)]
    WeightSet(config, tuple(empty), {})
    net = LALIC(config)
    learned = {k for k, _ in net.named_parameters()}
    members, sources = [], []
    for path, quality, label, lmbda in zip(paths, qualities, labels, lambdas, strict=True):
        path = Path(path)
        try:
            upstream = read_checkpoint(path)
            state = convert(upstream, net)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        net.update()
        dtypes = {k: state[k].dtype for k in learned}
        built = {k: v.detach().to(dtypes.get(k, v.dtype), copy=True) for k, v in net.state_dict().items()}
        member = WeightSetMember(quality=float(quality), label=label, lmbda=float(lmbda), state=built)
        members.append(member)
        sources.append(
            {
                "quality": member.quality,
                "label": label,
                "model_id": member.model_id(config),
                "lambda": member.lmbda,
                "file": path.name,
                "sha256": sha256_file(path),
                "tensors": len(upstream),
                "storage": storage(upstream),
            }
        )
    manifest = {
        "name": config.name,
        "source": SOURCE,
        "imported": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "members": sources,
    }
    weight_set = WeightSet(config=config, members=tuple(members), manifest=manifest)
    out = Path(out)
    save_weight_set(weight_set, out)
    return {"file": out.name, "sha256": sha256_file(out), "bytes": out.stat().st_size, **manifest}


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lalic import``."""
    parser.description = (
        "Import the official LALIC checkpoints (one file per quality, github sjtu-medialab/RwkvCompress) "
        "into one weight file for our lalic configuration: every tensor mapped and checked (a missing, "
        "unused or misshapen one is an error naming it), derived ones dropped, our entropy tables built. "
        "Serve it with --weights / LALIC_WEIGHTS."
    )
    parser.epilog = (
        "example: lalic import q1.pth.tar q2.pth.tar q3.pth.tar q4.pth.tar q5.pth.tar q6.pth.tar "
        "--qualities 1 2 3 4 5 6 --out lalic-official.pt"
    )
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="official checkpoint files")
    parser.add_argument(
        "--qualities",
        nargs="+",
        type=int,
        required=True,
        metavar="Q",
        help="the quality (1..6) of each checkpoint, in the same order",
    )
    parser.add_argument("--out", type=Path, required=True, help="weight file to write")
    parser.add_argument(
        "--labels",
        nargs="+",
        metavar="LABEL",
        help="name of each quality, part of its model id in bitstream headers (lalic-LABEL; default q1..q6)",
    )
    parser.add_argument(
        "--lambdas",
        nargs="+",
        type=float,
        metavar="LAMBDA",
        help="rate-distortion lambda each checkpoint was trained with, recorded in the file "
        "(default: the paper's MSE lambdas of the qualities; give them for the MS-SSIM set)",
    )


def run_import(args: argparse.Namespace) -> int:
    """``lalic import``: write the weight set and print its manifest entry as JSON."""
    entry = import_checkpoints(args.checkpoints, args.qualities, args.out, args.labels, args.lambdas)
    print(json.dumps(entry, indent=2))
    return 0
