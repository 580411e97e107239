"""A tiny real training run: the loss falls, checkpoints resume to the same step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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
    import importlib.util
    import sys

    bench = Path(__file__).resolve().parents[2] / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location("train_step_bench", bench / "train_step.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
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
