"""The GPU training kit: pre-cut tile packs (``python -m model.crops``) and the one-command
fine-tuning script that trains from them (``scripts/gpu_finetune.sh``, run here on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.crops import main as crops_main
from model.crops import pack_crops

REPO = Path(__file__).resolve().parents[2]


def _photos(folder: Path, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """Random photos of the given (height, width), saved losslessly as PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    arrays = []
    for i, (h, w) in enumerate(sizes):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"p{i}.png")
        arrays.append(arr)
    return arrays


def test_tiles_are_cut_round_robin_within_the_budget_and_losslessly(tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos", [(40, 100), (70, 70), (20, 200)])  # the last holds no 32² tile
    out = tmp_path / "pack"
    index = pack_crops([tmp_path / "photos"], out, (32, 32), budget_bytes=10**7, fmt="webp", progress=False)
    # p0 has a 1 x 3 grid of 32² cells, p1 a 2 x 2 grid, p2 none: 7 tiles, all distinct cells
    assert sorted(r["source"] for r in index) == ["photos/p0.png"] * 3 + ["photos/p1.png"] * 4
    assert len({(r["source"], tuple(r["box"])) for r in index}) == 7
    assert {r["source"] for r in index[:2]} == {"photos/p0.png", "photos/p1.png"}  # one each first
    assert json.loads((out / "index.json").read_text()) == index
    for r in index:
        left, top, w, h = r["box"]
        source = photos[int(r["source"][len("photos/p")])]
        with Image.open(out / r["file"]) as im:
            assert np.array_equal(np.asarray(im), source[top : top + h, left : left + w])
        assert r["bytes"] == (out / r["file"]).stat().st_size
    # p0's 100-pixel width leaves 4 columns over: its grid is centred, so tiles start at x = 2
    assert sorted(r["box"][0] for r in index if r["source"] == "photos/p0.png") == [2, 34, 66]

    budget = sum(r["bytes"] for r in index[:3])
    again = pack_crops([tmp_path / "photos"], tmp_path / "small", (32, 32), budget, "webp", progress=False)
    assert again == index[:3]  # the same seed cuts the same tiles, and the budget is never exceeded


def test_the_command_packs_jpeg_tiles_and_the_evaluation_crops(tmp_path: Path) -> None:
    _photos(tmp_path / "photos", [(64, 64)])
    kodak = tmp_path / "kodak"
    _photos(kodak, [(40, 48), (40, 48), (40, 48)])
    argv = ["--data", str(tmp_path / "photos"), "--out", str(tmp_path / "pack")]
    argv += ["--tile", "32", "--no-progress"]
    argv += ["--eval-out", str(tmp_path / "eval"), "--kodak", str(kodak), "--eval-images", "2"]
    assert crops_main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "pack").iterdir()) == [f"0000{i}.jpg" for i in range(4)] + [
        "index.json"
    ]
    with Image.open(tmp_path / "pack" / "00000.jpg") as im:
        assert im.format == "JPEG" and im.size == (32, 32)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["p0.png", "p1.png"]
    with pytest.raises(SystemExit, match="holds a 128x128 tile"):
        crops_main([*argv[:4], "--tile", "128", "--no-progress"])


def test_gpu_finetune_script_trains_from_a_kit_and_writes_the_weights(tmp_path: Path) -> None:
    """The device's one command, with DEVICE=cpu and two 64² steps: weights, log and train.log."""
    from model.configs import get_config
    from model.lalic import LALIC
    from model.zoo import read_weights

    kit = tmp_path / "kit"
    _photos(kit / "photos", [(64, 128)])
    pack_crops([kit / "photos"], kit / "crops", (64, 64), 10**7, "jpeg", progress=False)
    _photos(kit / "kodak", [(64, 64)])
    torch.manual_seed(0)
    init = LALIC(get_config("lalic-s"))
    torch.save({"config": init.config.to_dict(), "model": init.state_dict()}, tmp_path / "init.pt")
    out = tmp_path / "out"
    env = os.environ | {
        "KIT": str(kit), "OUT": str(out), "DEVICE": "cpu", "MINUTES": "5", "STEPS": "2", "CROP": "64",
        "BATCH": "1", "WARMUP": "1", "LR": "1e-3", "EVAL_EVERY": "0", "INIT": str(tmp_path / "init.pt"),
        "PYTHON": sys.executable, "EXTRA": "--threads 1 --log-every 1 --eval-images 1",
    }  # fmt: skip
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_finetune.sh")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", "train.log", "weights.pt"]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 2] and "eval_ema" in records[-1]
    assert "cuda False" in (out / "train.log").read_text()
    _, weights = read_weights(out / "weights.pt")
    assert not torch.equal(weights["g_s.0.weight"], init.state_dict()["g_s.0.weight"].half().float())
