"""A tiny real training run: the loss falls, checkpoints resume to the same step."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.train import CropSampler, parse_crop
from model.train import main as train_main


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def keep_torch_threads():
    """``lalic train --threads`` sets the process-wide thread count: give it back to later tests
    (g_s results depend on it, and test_cli compares an in-process decode with the CLI's)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("keep_torch_threads")
def test_training_reduces_loss_and_resumes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    yy, xx = np.mgrid[0:64, 0:64]
    for i in range(2):
        img = np.stack([(xx * (3 + i)) % 256, (yy * 2) % 256, (xx + yy) % 256], -1).astype(np.uint8)
        Image.fromarray(img).save(data / f"img{i}.png")
    common = [
        "--data",
        str(data),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--run",
        "tiny",
        "--crop",
        "64",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--warmup",
        "1",
        "--eval-images",
        "0",
        "--log-every",
        "1",
        "--threads",
        "1",
        "--quality",
        "6",
    ]
    assert train_main([*common, "--steps", "12"]) == 0
    records = _log(tmp_path / "runs" / "tiny")
    losses = [r["loss"] for r in records]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses

    # --eval-every 0: one quick eval, at the last step only
    evals = ["--eval-images", "1", "--eval-every", "0", "--kodak", str(data)]
    assert train_main([*common, "--steps", "14", "--resume", *evals]) == 0
    state = torch.load(tmp_path / "runs" / "tiny" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 14
    resumed = _log(tmp_path / "runs" / "tiny")[12:]
    assert [r["step"] for r in resumed] == [13, 14, 14]
    assert [sorted(r["eval"]) for r in resumed if "eval" in r] == [["q1", "q3", "q6"]]
    assert resumed[-1]["eval"]["q6"]["bpp"] > 0


@pytest.mark.usefixtures("keep_torch_threads")
def test_train_step_benchmark_times_each_variant(tmp_path: Path) -> None:
    """bench/train_step.py runs the real optimisation step per variant and reports medians."""
    from tests.model.bench_scripts import load_bench_script

    module = load_bench_script("train_step")
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (72, 72, 3), dtype=np.uint8)).save(
        data / "a.png"
    )
    out = tmp_path / "out"
    argv = ["--variants", "fp32", "bf16", "--crops", "64", "--steps", "2", "--rounds", "1", "--warmup", "1"]
    assert (
        module.main([*argv, "--batch-size", "1", "--threads", "1", "--data", str(data), "--out", str(out)])
        == 0
    )
    results = json.loads((out / "train-step.json").read_text())["results"]
    assert sorted(results["64"]) == ["bf16", "fp32"]
    for r in results["64"].values():
        assert len(r["times"]) == 2 and r["median_s"] > 0 and len(r["warmup_s"]) == 1
    table = (out / "train-step.md").read_text()
    assert "| 64² | fp32 |" in table and "| 1.00 |" in table and "| 64² | bf16 |" in table


def _fine_tuning_setup(tmp_path: Path, run: str) -> tuple[dict[str, torch.Tensor], Path, list[str]]:
    """A random 64² photo, a random lalic-s saved as ``init.pt`` and the ``lalic train`` arguments
    of a one-image, 64² fine-tuning run named ``run``: (initial state dict, runs dir, arguments)."""
    from model.configs import get_config
    from model.lalic import LALIC

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data / "a.png")
    torch.manual_seed(0)
    init = LALIC(get_config("lalic-s"))
    torch.save({"config": init.config.to_dict(), "model": init.state_dict()}, tmp_path / "init.pt")
    runs = tmp_path / "runs"
    common = ["--data", str(data), "--runs-dir", str(runs), "--run", run, "--crop", "64"]
    common += ["--batch-size", "1", "--lr", "1e-3", "--warmup", "1", "--eval-images", "0", "--threads", "1"]
    common += ["--log-every", "1", "--init", str(tmp_path / "init.pt")]
    return init.state_dict(), runs, common


@pytest.mark.usefixtures("keep_torch_threads")
def test_fine_tuning_on_the_rounded_rate_keeps_frozen_parameters(tmp_path: Path) -> None:
    """``--rate rounded --freeze g_a log_gain``: the encoder side stays bit-identical, the rest
    moves, and a resume keeps the freeze."""
    from model.zoo import read_weights

    before, runs, common = _fine_tuning_setup(tmp_path, "hard")
    common += ["--rate", "rounded", "--freeze", "g_a", "log_gain"]
    assert train_main([*common, "--steps", "2"]) == 0
    assert train_main([*common, "--steps", "3", "--resume"]) == 0
    _, after = read_weights(runs / "hard" / "checkpoint.pt")
    frozen = [n for n in before if n.startswith(("g_a.", "log_gain"))]
    assert frozen and all(torch.equal(after[n], before[n]) for n in frozen)
    for name in ("g_s.", "context.", "h_s.", "log_inverse_gain"):
        moved = [n for n in before if n.startswith(name) and not torch.equal(after[n], before[n])]
        assert moved, name
    assert [r["step"] for r in _log(runs / "hard")] == [1, 2, 3]

    with pytest.raises(SystemExit, match="--freeze g_b"):
        train_main([*common[:-3], "--freeze", "g_b", "--steps", "1", "--run", "bad"])


@pytest.mark.usefixtures("keep_torch_threads")
def test_freezing_the_factorised_prior_drops_its_auxiliary_optimiser(tmp_path: Path) -> None:
    """``--freeze entropy_bottleneck`` freezes the quantiles too: training runs and resumes without
    the auxiliary optimiser, the prior stays bit-identical and the rest moves; freezing every
    parameter is an error."""
    from model.zoo import read_weights

    before, runs, common = _fine_tuning_setup(tmp_path, "eb")
    common += ["--freeze", "entropy_bottleneck"]
    assert train_main([*common, "--steps", "1"]) == 0
    assert torch.load(runs / "eb" / "checkpoint.pt", weights_only=False)["aux_optimizer"] is None
    assert train_main([*common, "--steps", "2", "--resume"]) == 0
    _, after = read_weights(runs / "eb" / "checkpoint.pt")
    density = ("quantiles", "matrices", "biases", "factors")  # the prior's parameters, not its tables
    prior = [n for n in before if n.split(".")[0] == "entropy_bottleneck" and n.split(".")[1] in density]
    assert len(prior) == 1 + 5 + 5 + 4  # quantiles, 5 matrices, 5 biases, 4 factors
    assert all(torch.equal(after[n], before[n]) for n in prior)
    assert not torch.equal(after["h_a.0.weight"], before["h_a.0.weight"])
    assert [r["step"] for r in _log(runs / "eb")] == [1, 2]
    everything = ["g_a", "g_s", "h_a", "h_s", "context", "entropy_bottleneck", "log_gain", "log_inverse_gain"]
    with pytest.raises(SystemExit, match="no parameter is left to train"):
        train_main([*common[:-1], *everything, "--steps", "1", "--run", "none"])


def test_parse_crop() -> None:
    assert parse_crop("256") == (256, 256)
    assert parse_crop("768x512") == (512, 768)  # WxH, as image sizes are written
    for bad in ("0", "100", "768x", "axb", "768x512x3", "8x8"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_crop(bad)


def test_rectangular_crops_turn_portrait_photos_and_upscale_only_when_needed(tmp_path: Path) -> None:
    def coordinates(h: int, w: int, tag: int) -> np.ndarray:
        """Red = row, green = column, blue = a tag naming the photo."""
        yy, xx = np.mgrid[0:h, 0:w]
        return np.stack([yy, xx, np.full_like(yy, tag)], -1).astype(np.uint8)

    Image.fromarray(coordinates(96, 160, 10)).save(tmp_path / "a_landscape.png")
    Image.fromarray(coordinates(160, 96, 20)).save(tmp_path / "b_portrait.png")
    Image.fromarray(coordinates(40, 50, 30)).save(tmp_path / "c_small.png")
    sampler = CropSampler(sorted(tmp_path.glob("*.png")), (64, 128), seed=0)  # 128 wide, 64 tall
    # the large photos are kept as they are; the small one is upscaled just enough to hold the crop
    # upright (x2.56 -> 103 x 128; turned it would need x3.2)
    assert [im.shape[:2] for im in sampler.images] == [(96, 160), (160, 96), (103, 128)]
    batch = (sampler.batch(32) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert batch.shape == (32, 64, 128, 3)
    tags = [int(crop[0, 0, 2]) for crop in batch]
    assert {10, 20} <= set(tags) <= {10, 20, 30}
    for crop, tag in zip(batch, tags, strict=True):
        rows, cols = crop[..., 0].astype(int), crop[..., 1].astype(int)
        if tag == 30:
            continue  # upscaled: interpolated coordinates
        # source rows run down the crop for a landscape photo, across it for a turned portrait one
        along, across = (rows, cols) if tag == 10 else (cols, rows)
        assert (np.abs(np.diff(along, axis=0)) == 1).all() and (np.diff(along, axis=1) == 0).all()
        assert (np.abs(np.diff(across, axis=1)) == 1).all() and (np.diff(across, axis=0) == 0).all()


@pytest.mark.usefixtures("keep_torch_threads")
def test_moving_average_of_the_weights_resumes_and_is_delivered(tmp_path: Path) -> None:
    """``--ema 0.75``: after step 1 the average is the weights, after step 2 (a resumed run) it is
    0.75 * step 1 + 0.25 * step 2; checkpoints read as weights and ``--export`` give the average,
    and the quick eval reports both."""
    from model.zoo import read_weights

    _, runs, common = _fine_tuning_setup(tmp_path, "ema")
    common += ["--ema", "0.75"]
    assert train_main([*common, "--steps", "1"]) == 0
    first = torch.load(runs / "ema" / "checkpoint.pt", weights_only=False)
    assert first["ema_updates"] == 1
    name = "g_s.0.weight"
    assert torch.equal(first["ema"][name], first["model"][name])

    export = tmp_path / "out" / "weights.pt"
    evals = ["--eval-images", "1", "--eval-every", "0", "--kodak", str(tmp_path / "data")]
    assert train_main([*common, "--steps", "2", "--resume", "--export", str(export), *evals]) == 0
    second = torch.load(runs / "ema" / "checkpoint.pt", weights_only=False)
    assert second["ema_updates"] == 2
    step1, step2 = first["model"][name], second["model"][name]
    assert not torch.equal(step1, step2)
    torch.testing.assert_close(second["ema"][name], 0.75 * step1 + 0.25 * step2)
    buffer = "entropy_bottleneck.target"
    assert torch.equal(second["ema"][buffer], second["model"][buffer])

    _, delivered = read_weights(runs / "ema" / "checkpoint.pt")
    assert torch.equal(delivered[name], second["ema"][name])
    _, exported = read_weights(export)
    assert torch.equal(exported[name], second["ema"][name].half().float())
    assert torch.load(export, weights_only=False)["state_dict"][name].dtype == torch.float16
    final = _log(runs / "ema")[-1]
    assert sorted(final["eval"]) == sorted(final["eval_ema"]) == ["q1", "q3", "q6"]
    assert final["eval"] != final["eval_ema"]

    with pytest.raises(SystemExit, match="--ema 1.5"):
        train_main([*common[:-2], "--ema", "1.5", "--steps", "1", "--run", "bad"])


def test_learning_rate_drops_by_step_or_by_the_clock() -> None:
    """Warm-up by steps; the drop to lr/10 at 70 % of the steps, or of --max-minutes if sooner."""
    from model.train import LrSchedule

    args = argparse.Namespace(lr=1e-4, warmup=10, steps=1000, drop_fraction=0.3, max_minutes=0)
    schedule = LrSchedule.from_args(args)
    assert schedule.at(0) == pytest.approx(1e-5) and schedule.at(9) == pytest.approx(1e-4)
    assert schedule.at(699, minutes=500) == 1e-4  # no clock without --max-minutes
    assert schedule.at(700) == pytest.approx(1e-5)
    clocked = LrSchedule(lr=1e-4, warmup=10, steps=1000, drop_fraction=0.3, max_minutes=10)
    assert clocked.at(100, minutes=6.9) == 1e-4
    assert clocked.at(100, minutes=7.0) == pytest.approx(1e-5)
    assert clocked.at(5, minutes=9) == pytest.approx(6e-5)  # warm-up first
