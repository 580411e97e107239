"""``lalic import``: the official LALIC checkpoints mapped onto our ``lalic`` network.

No official weights exist here: the checkpoints are synthetic, with every official name and shape
(``official_checkpoint.py``, from the reference layout file) and a distinct random tensor per key.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lalic.cli import main as lalic
from model.codec import Codec
from model.codecset import CodecSet, load_codec
from model.configs import get_config
from model.lalic import LALIC
from model.official import convert, import_checkpoints, normalize, official_layout
from model.zoo import read_weight_set, read_weights, sha256_file
from tests.model.official_checkpoint import official_shapes, synthetic_checkpoint

EB = "latent_codec.hyper.entropy_bottleneck."
Y1 = "latent_codec.y.latent_codec.y1."
Y4 = "latent_codec.y.latent_codec.y4."
C4 = "latent_codec.y.channel_context.y4."


@pytest.fixture(scope="module")
def net() -> LALIC:
    """The 65.6 M-parameter ``lalic`` network, built once (its structure and buffers are read only)."""
    torch.manual_seed(0)
    return LALIC(get_config("lalic"))


@pytest.fixture(scope="module")
def upstream() -> dict[str, torch.Tensor]:
    return synthetic_checkpoint(seed=0)


@pytest.fixture(scope="module")
def converted(upstream: dict[str, torch.Tensor], net: LALIC) -> dict[str, torch.Tensor]:
    return convert(upstream, net)


def test_the_layout_covers_every_official_key_with_its_shape(net: LALIC) -> None:
    layout = official_layout(net)
    shapes = official_shapes()
    assert len(shapes) == 1623
    sources = {s: shape for m in layout.mapped.values() for s, shape in zip(m.sources, m.shapes, strict=True)}
    assert not set(sources) & set(layout.derived)
    assert set(sources) | set(layout.derived) == set(shapes)
    assert {k: shapes[k] for k in sources} == sources
    assert all(d.shape in (None, shapes[k]) for k, d in layout.derived.items())
    assert set(layout.mapped) == {k for k, _ in net.named_parameters()}
    # 1 094 parameters of ours, key|value|receptance three tensors upstream in each of 44 blocks
    assert len(layout.mapped) == 1094 and len(sources) == 1094 + 2 * 44
    # folded Omni-Shift kernels (2 per block), h_a/h_s copies, the prior's 5 and the slices' 5 x 8
    assert len(layout.derived) == 2 * 44 + 2 * 154 + 5 + 5 * 8
    # the derived tensors: 512 000 folded Omni-Shift parameters (h_a/h_s copies aside), masks, tables
    folded = sum(math.prod(shapes[k]) for k in layout.derived if "reparam" in k and "hyper.h_" not in k)
    assert folded == 512_000
    derived = sorted(
        {k.rsplit(".", 1)[-1] if "hyper.h_" not in k else "h_a/h_s copy" for k in layout.derived}
    )
    assert derived == [
        "_cdf_length",
        "_offset",
        "_quantized_cdf",
        "bound",
        "h_a/h_s copy",
        "mask",
        "scale_bound",
        "scale_table",
        "target",
        "weight",  # conv5x5_reparam.weight
    ]


def test_every_official_tensor_lands_in_its_place(
    upstream: dict[str, torch.Tensor], converted: dict[str, torch.Tensor], net: LALIC
) -> None:
    u = upstream
    same = {  # ours: upstream (flat sequences, renames)
        "g_a.0.weight": "g_a.0.weight",
        "g_a.2.bias": "g_a.3.bias",
        "g_a.3.blocks.3.channel.key.weight": "g_a.7.ffn.key.weight",
        "g_a.5.blocks.5.gamma2": "g_a.14.gamma2",
        "g_a.6.weight": "g_a.15.weight",
        "g_s.0.weight": "g_s.0.weight",
        "g_s.1.blocks.0.spatial.decay": "g_s.1.att.decay",
        "g_s.4.weight": "g_s.12.weight",
        "g_s.5.blocks.1.norm2.bias": "g_s.14.ln2.bias",
        "g_s.6.bias": "g_s.15.bias",
        "h_a.1.blocks.2.norm1.weight": "h_a.3.ln1.weight",
        "h_a.2.bias": "h_a.7.bias",
        "h_s.1.blocks.5.spatial.shift.conv3": "h_s.6.att.omni_shift.conv3x3.weight",
        "h_s.1.blocks.0.channel.shift.alpha": "h_s.1.ffn.omni_shift.alpha",
        "h_s.1.blocks.4.spatial.boost": "h_s.5.att.boost",
        "h_s.1.blocks.3.spatial.output.weight": "h_s.4.att.output.weight",
        "h_s.2.weight": "h_s.7.weight",
        "entropy_bottleneck.matrices.4": EB + "matrices.4",
        "entropy_bottleneck.biases.0": EB + "biases.0",
        "entropy_bottleneck.factors.3": EB + "factors.3",
        "entropy_bottleneck.quantiles": EB + "quantiles",
        "context.spatial.3.weight": "latent_codec.y.latent_codec.y3.context_prediction.weight",
        "context.spatial.0.bias": "latent_codec.y.latent_codec.y0.context_prediction.bias",
        "context.channel.0.inp.weight": "latent_codec.y.channel_context.y1.0.weight",
        "context.channel.0.out.weight": "latent_codec.y.channel_context.y1.3.weight",
        "context.channel.2.inp.bias": "latent_codec.y.channel_context.y3.0.bias",
        "context.channel.3.blocks.blocks.1.spatial.decay": "latent_codec.y.channel_context.y4.2.att.decay",
        "context.channel.3.blocks.blocks.0.channel.value.weight": C4 + "1.ffn.value.weight",
        "context.params.1.blocks.0.mlp.value.weight": Y1 + "entropy_parameters.0.value.weight",
        "context.params.4.blocks.1.proj.bias": Y4 + "entropy_parameters.2.mix.bias",
        "context.params.4.blocks.2.norm.weight": Y4 + "entropy_parameters.4.norm.weight",
        "context.params.4.blocks.2.mlp.receptance.weight": Y4 + "entropy_parameters.4.receptance.weight",
    }
    for ours, theirs in same.items():
        assert torch.equal(converted[ours], u[theirs]), (ours, theirs)
    # 1x1 convolutions upstream, linear layers here
    proj = converted["context.params.4.blocks.2.proj.weight"]
    assert proj.shape == (384, 618) and torch.equal(
        proj, u[Y4 + "entropy_parameters.4.mix.weight"][:, :, 0, 0]
    )
    # key | value | receptance as one weight, in that order
    for ours, theirs in (
        ("g_a.1.blocks.1.spatial.kvr.weight", "g_a.2.att."),
        ("h_a.1.blocks.5.spatial.kvr.weight", "h_a.6.att."),
        ("context.channel.1.blocks.blocks.1.spatial.kvr.weight", "latent_codec.y.channel_context.y2.2.att."),
    ):
        parts = [u[theirs + p + ".weight"] for p in ("key", "value", "receptance")]
        assert torch.equal(converted[ours], torch.cat(parts)), ours
    # every learned upstream tensor is used once: same element count and sum
    params = {k for k, _ in net.named_parameters()}
    layout = official_layout(net)
    learned = [k for k in u if k not in layout.derived]
    assert sum(u[k].numel() for k in learned) == sum(converted[k].numel() for k in params) == 65_621_045
    total = sum(float(u[k].double().sum()) for k in learned)
    assert sum(float(converted[k].double().sum()) for k in params) == pytest.approx(total, rel=1e-12)
    # buffers are ours (the CDF tables are rebuilt by update())
    buffers = {k: v for k, v in net.state_dict().items() if k not in params}
    assert sorted(buffers) == [
        "entropy_bottleneck.target",
        "entropy_bottleneck.z_cdf_lengths",
        "entropy_bottleneck.z_cdfs",
        "entropy_bottleneck.z_offsets",
        "gaussian.scale_table",
        "gaussian.y_cdf_lengths",
        "gaussian.y_cdfs",
        "gaussian.y_offsets",
    ]
    assert all(torch.equal(converted[k], v) for k, v in buffers.items())
    assert set(converted) == set(net.state_dict())


def test_imported_weights_load_strictly_and_code_an_image(converted: dict[str, torch.Tensor]) -> None:
    net = LALIC(get_config("lalic"))
    net.load_state_dict(converted, strict=True)
    net.update()
    codec = Codec(net)
    image = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    data = codec.compress(image, 3)
    header = codec.read_header(data)
    assert (header.model_id, header.weights_digest.hex()) == ("lalic", codec.weights_digest)
    encoded = codec.encoder_latents(image, 3)["y_hat"]
    decoded, _ = codec.decode_latents(data)
    assert torch.equal(decoded, encoded)
    out = codec.decompress(data)
    assert out.shape == image.shape and np.array_equal(out, codec.decompress(data))


def _refused(state: dict[str, torch.Tensor], net: LALIC) -> str:
    with pytest.raises(ValueError) as info:
        convert(state, net)
    return str(info.value)


def test_missing_unused_and_misshapen_tensors_are_named(
    upstream: dict[str, torch.Tensor], net: LALIC
) -> None:
    state = dict(upstream)
    del state["g_s.9.att.key.weight"]
    assert _refused(state, net) == "not an official LALIC state dict: missing: g_s.9.att.key.weight"
    state = dict(upstream, **{"g_a.1.att.extra": torch.zeros(3)})
    assert _refused(state, net) == "not an official LALIC state dict: unused: g_a.1.att.extra"
    state = dict(upstream, **{"h_a.0.bias": torch.zeros(255)})
    assert _refused(state, net) == (
        "not an official LALIC state dict: shape of h_a.0.bias: (255,) in the checkpoint, (256,) expected"
    )
    key = Y4 + "entropy_parameters.2.mix.weight"  # the rounding that differs: 618 upstream, 619 rounded
    state = dict(upstream, **{key: torch.zeros(619, 853, 1, 1)})
    assert _refused(state, net).endswith(
        f"shape of {key}: (619, 853, 1, 1) in the checkpoint, (618, 853, 1, 1) expected"
    )


def test_derived_tensors_are_checked_then_dropped(upstream: dict[str, torch.Tensor], net: LALIC) -> None:
    copy = "latent_codec.hyper.h_s.7.bias"
    state = dict(upstream, **{copy: upstream[copy] + 1})
    assert _refused(state, net) == (
        f"inconsistent official LALIC state dict: {copy} differs from h_s.7.bias (the same module upstream)"
    )
    mask = "latent_codec.y.latent_codec.y2.context_prediction.mask"
    state = dict(upstream, **{mask: torch.ones(64, 32, 5, 5)})
    assert _refused(state, net).startswith(f"inconsistent official LALIC state dict: {mask} is [1.0, 1.0")
    bound = "latent_codec.y.latent_codec.y0.y.gaussian_conditional.scale_bound"
    state = dict(upstream, **{bound: torch.tensor([0.2])})
    message = _refused(state, net)
    assert message.startswith(f"inconsistent official LALIC state dict: {bound} is [0.200")
    # derived tensors may be absent: what they hold is recomputed
    layout = official_layout(net)
    state = {k: v for k, v in upstream.items() if k not in layout.derived}
    lean = convert(state, net)
    full = convert(upstream, net)
    assert all(torch.equal(lean[k], full[k]) for k in full)


def test_checkpoint_wrappers_prefixes_and_both_prior_namings(upstream: dict[str, torch.Tensor]) -> None:
    plain = normalize(upstream)
    assert list(plain) == list(upstream)
    renamed = {k.replace(EB + "matrices", EB + "_matrices"): v for k, v in upstream.items()}
    renamed = {
        k.replace(EB + "biases", EB + "_biases").replace(EB + "factors", EB + "_factors"): v
        for k, v in renamed.items()
    }
    assert any(k.startswith(EB + "_matrices.") for k in renamed)
    parallel = {"module." + k: v for k, v in renamed.items()}
    for blob in (
        {"state_dict": upstream, "epoch": 3},
        {"model_state_dict": upstream, "optimizer": {}},
        renamed,
        {"state_dict": parallel},
    ):
        out = normalize(blob)
        assert list(out) == list(plain) and all(out[k] is plain[k] for k in plain)
    both = dict(upstream, **{EB + "_matrices.0": upstream[EB + "matrices.0"]})
    with pytest.raises(ValueError, match=r"holds latent_codec.hyper.entropy_bottleneck.matrices.0 twice"):
        normalize(both)
    with pytest.raises(ValueError, match="holds no state dict"):
        normalize({"epoch": 3})


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two synthetic checkpoints (q1 in float32, q6 in float16) imported through the command line."""
    folder = tmp_path_factory.mktemp("official")
    sources = {1: synthetic_checkpoint(seed=1), 6: synthetic_checkpoint(seed=6, dtype=torch.float16)}
    paths = []
    for quality, state in sources.items():
        paths.append(folder / f"lalic_q{quality}.pth.tar")
        torch.save({"state_dict": state, "epoch": 100}, paths[-1])
    out = folder / "lalic-official.pt"
    argv = ["import", *map(str, paths), "--qualities", "1", "6", "--out", str(out)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = lalic(argv)
    return {"sources": sources, "paths": paths, "out": out, "status": status, "printed": printed.getvalue()}


def test_import_writes_one_exact_weight_set(imported: dict) -> None:
    assert imported["status"] == 0
    out: Path = imported["out"]
    weight_set = read_weight_set(out)
    assert weight_set.qualities == (1.0, 6.0)
    assert [(m.label, m.lmbda) for m in weight_set.members] == [("q1", 0.0018), ("q6", 0.0483)]
    assert weight_set.config == get_config("lalic")
    manifest = weight_set.manifest
    for member, path, quality, dtype in zip(
        manifest["members"], imported["paths"], (1, 6), ("float32", "float16"), strict=True
    ):
        assert member == {
            "quality": float(quality),
            "label": f"q{quality}",
            "model_id": f"lalic-q{quality}",
            "lambda": get_config("lalic").lambdas[quality - 1],
            "file": path.name,
            "sha256": sha256_file(path),
            "tensors": 1623,
            "storage": dtype,
        }
    for m, state in zip(weight_set.members, imported["sources"].values(), strict=True):
        kvr = torch.cat([state[f"g_s.3.att.{p}.weight"] for p in ("key", "value", "receptance")])
        assert m.state["g_s.1.blocks.2.spatial.kvr.weight"].dtype == kvr.dtype  # as exact as the source
        assert torch.equal(m.state["g_s.1.blocks.2.spatial.kvr.weight"], kvr)
        assert m.state["entropy_bottleneck.z_cdfs"].numel() > 0 and m.state["gaussian.y_cdfs"].numel() > 0
    with pytest.raises(ValueError, match=r"is a weight set of one network per quality \(1, 6\)"):
        read_weights(out)


def test_import_prints_the_manifest_entry(imported: dict) -> None:
    out: Path = imported["out"]
    manifest = read_weight_set(out).manifest
    assert manifest["name"] == "lalic" and manifest["source"].startswith("official LALIC checkpoint")
    entry = json.loads(imported["printed"])
    assert entry == {"file": out.name, "sha256": sha256_file(out), "bytes": out.stat().st_size, **manifest}


def test_import_refuses_a_checkpoint_missing_a_key(
    tmp_path: Path, imported: dict, capsys: pytest.CaptureFixture
) -> None:
    state = dict(imported["sources"][1])
    del state[EB + "quantiles"]
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    out = tmp_path / "w.pt"
    assert lalic(["import", str(bad), "--qualities", "3", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"lalic import: error: {bad}: not an official LALIC state dict: missing: {EB}quantiles\n"
    assert not out.exists()
    assert lalic(["import", str(bad), "--qualities", "1", "2", "--out", str(out)]) == 2
    assert "1 checkpoint(s) but 2 qualities" in capsys.readouterr().err
    assert lalic(["import", str(bad), "--qualities", "7", "--out", str(out)]) == 2
    assert "qualities must be distinct integers in 1..6, got [7]" in capsys.readouterr().err


def test_import_help_shows_an_example(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        lalic(["import", "--help"])
    text = capsys.readouterr().out
    assert "--qualities 1 2 3 4 5 6 --out lalic-official.pt" in text and "--lambdas" in text


def test_an_imported_set_serves_its_qualities(imported: dict) -> None:
    """From the official files to a running codec: each quality codes with its own network."""
    codecs = load_codec(str(imported["out"]), lazy=True)
    assert isinstance(codecs, CodecSet) and codecs.qualities == (1.0, 6.0) and codecs.loaded == ()
    image = (np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8)
    data = codecs.compress(image, 6)
    header = codecs.read_header(data)
    assert (header.model_id, header.quality, codecs.loaded) == ("lalic-q6", 6.0, (6.0,))
    assert header.weights_digest.hex() == codecs.codec(6).weights_digest
    assert codecs.decompress(data).shape == image.shape
    with pytest.raises(ValueError, match="quality 3.5 is not served"):
        codecs.compress(image, 3.5)


def test_import_checks_its_arguments_before_reading(tmp_path: Path) -> None:
    nowhere = tmp_path / "absent.pth"  # never opened: the arguments are refused first
    with pytest.raises(ValueError, match=r"^qualities must be distinct integers in 1..6, got \[2.5\]$"):
        import_checkpoints([nowhere], [2.5], tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"^qualities must be distinct integers in 1..6, got \[3, 3\]$"):
        import_checkpoints([nowhere, nowhere], [3, 3], tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"^label 'q 1' must be letters, digits, '.', '_' or '-'"):
        import_checkpoints([nowhere], [1], tmp_path / "w.pt", labels=["q 1"])
    with pytest.raises(ValueError, match=r"^give one label and one lambda per checkpoint$"):
        import_checkpoints([nowhere], [1], tmp_path / "w.pt", lambdas=[0.1, 0.2])
    message = f"^{nowhere}: not a torch checkpoint readable with weights_only=True: Weights only load failed"
    with pytest.raises(ValueError, match=message):
        nowhere.write_bytes(b"not a checkpoint")
        import_checkpoints([nowhere], [1], tmp_path / "w.pt")
    assert not (tmp_path / "w.pt").exists()
