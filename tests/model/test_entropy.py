"""The Gaussian conditional's scale tables: nearest-in-log indexing, coding cost, old weight files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.bitstream import unpack
from model.codec import Codec
from model.configs import get_config
from model.entropy import SCALE_LEVELS, GaussianConditional, gaussian_likelihood, scale_table
from model.image import load_image
from model.lalic import LALIC
from model.paths import KODAK_DIR
from tests.model.bench_scripts import load_bench_script


def test_indexes_pick_the_nearest_table_scale_in_log_scale() -> None:
    g = GaussianConditional()
    table = g.scale_table.double()
    scales = torch.exp(torch.linspace(math.log(0.01), math.log(1000.0), 20_011)).float()
    want = (scales.double().log()[:, None] - table.log()[None]).abs().argmin(dim=1)
    got = g.indexes(scales.view(1, -1, 1)).view(-1).long()
    assert got.dtype == torch.int64 and got.min() == 0 and got.max() == SCALE_LEVELS - 1
    # only ties (a scale exactly between two table scales, to float32 precision) may differ by one
    differs = got != want
    assert int(differs.sum()) <= 2 and torch.all((got - want).abs()[differs] == 1)


def test_table_cost_is_within_0_05_percent_of_the_exact_gaussian() -> None:
    """Symbols drawn from Gaussians of log-uniform scales, coded with the chosen integer tables.

    Here 128 tables, nearest in log scale, cost 0.033 % more than the exact Gaussian; 64 tables
    cost 0.072 % (nearest) and 0.18 % (next larger scale, CompressAI's rule; 0.3-0.5 % on the
    shipped weights' Kodak latents).
    """
    rng = np.random.default_rng(0)
    g = GaussianConditional()
    tables = g.tables()
    scales = np.exp(rng.uniform(math.log(0.2), math.log(40.0), 200_000))
    symbols = np.round(rng.normal(0.0, scales)).astype(np.int64)
    s = torch.from_numpy(scales)
    exact = -torch.log2(gaussian_likelihood(torch.from_numpy(symbols).double(), s, torch.zeros_like(s)))
    idx = g.indexes(s.float()).numpy()
    coded = tables.information_bits(symbols, idx)
    assert tables.information_bits(symbols, idx, escape_bits=1e9) == coded  # no escapes at these scales
    overhead = coded / float(exact.sum()) - 1
    assert 0 <= overhead < 5e-4, overhead


def fresh_network() -> LALIC:
    torch.manual_seed(0)
    net = LALIC(get_config("lalic-s"))
    net.update()
    return net


def test_weights_with_another_scale_table_load_and_rebuild_their_tables() -> None:
    """A state dict written with CompressAI's 64-level table (our format before 2026-12-03)."""
    net = fresh_network()
    old = dict(net.state_dict())
    old["gaussian.scale_table"] = scale_table(64)
    old["gaussian.y_cdfs"] = torch.zeros(64, 7, dtype=torch.int32)
    old["gaussian.y_cdf_lengths"] = torch.full((64,), 7, dtype=torch.int32)
    old["gaussian.y_offsets"] = torch.full((64,), -2, dtype=torch.int32)
    reloaded = LALIC(net.config)
    reloaded.load_state_dict(old)
    assert torch.equal(reloaded.gaussian.scale_table, scale_table())
    assert reloaded.gaussian.y_cdfs.numel() == 0  # the stale tables are not used
    swapped = dict(old)  # valid z tables that update() would not build: channels 0 and 1 swapped
    for name in ("z_cdfs", "z_cdf_lengths", "z_offsets"):
        swapped[f"entropy_bottleneck.{name}"] = old[f"entropy_bottleneck.{name}"][
            [1, 0, *range(2, net.config.hyper_latent)]
        ]
    reloaded_z = LALIC(net.config)
    reloaded_z.load_state_dict(swapped)
    kept = Codec(reloaded_z).net.entropy_bottleneck.z_cdfs  # only the missing y tables are built
    assert torch.equal(kept, swapped["entropy_bottleneck.z_cdfs"])
    assert not torch.equal(kept, net.entropy_bottleneck.z_cdfs)
    codec, reference = Codec(reloaded), Codec(net)
    assert codec.net.gaussian.y_cdfs.shape[0] == SCALE_LEVELS
    assert codec.digest == reference.digest  # the same weights, tables rebuilt as update() builds them
    image = np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    data = codec.compress(image, 3.0)
    assert data == reference.compress(image, 3.0)
    assert np.array_equal(codec.decompress(data), reference.decompress(data))


def test_a_matching_scale_table_is_loaded_as_stored() -> None:
    net = fresh_network()
    state = dict(net.state_dict())
    state["gaussian.scale_table"] = state["gaussian.scale_table"] * (1 + 2e-7)  # last-ulp differences
    reloaded = LALIC(net.config)
    reloaded.load_state_dict(state)
    assert torch.equal(reloaded.gaussian.scale_table, state["gaussian.scale_table"])
    assert torch.equal(reloaded.gaussian.y_cdfs, net.gaussian.y_cdfs)


def test_scale_table_benchmark_matches_the_real_stream(tmp_path: Path) -> None:
    """bench/scale_tables.py: its table bits for our layout are the real stream's y bits."""
    module = load_bench_script("scale_tables")
    images = tmp_path / "images"
    images.mkdir()
    kodak = KODAK_DIR / "kodim23.png"
    image = load_image(kodak)[:128, :192]
    Image.fromarray(image).save(images / "crop.png")
    argv = ["--images", str(images), "--qualities", "3", "--levels", "64", "128", "--out", str(tmp_path)]
    assert module.main([*argv, "--no-progress", "--threads", "1"]) == 0
    row = json.loads((tmp_path / "scale-tables.json").read_text())["qualities"]["3"]
    overhead = row["overhead_percent"]
    assert sorted(overhead) == sorted(f"{n} tables, {r}" for n in (64, 128) for r in ("ceil", "nearest"))
    assert overhead["128 tables, nearest"] < overhead["64 tables, nearest"] < overhead["64 tables, ceil"]
    # our layout's bits for y, plus z's table bits, make up the stream but for header and flush
    codec = Codec.from_pretrained()
    data = codec.compress(image, 3.0)
    layout = module.Layout(SCALE_LEVELS, "nearest")
    y_bits = sum(layout.bits(s, sc) for s, sc in module.coding_loop_scales(codec, image, 3.0))
    assert y_bits == pytest.approx(128 * 192 * row["exact_bpp"] * (1 + overhead["128 tables, nearest"] / 100))
    z = codec.encoder_latents(image, 3.0)["z_symbols"].numpy()
    channel = np.broadcast_to(np.arange(z.shape[0])[:, None, None], z.shape)
    z_bits = codec.net.entropy_bottleneck.tables().information_bits(z, channel)
    header = len(data) - len(unpack(data)[1][0])
    coded = 8 * (len(data) - header)
    assert 0 <= coded - (y_bits + z_bits) < 8 * 16, (coded, y_bits, z_bits)
