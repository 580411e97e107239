"""Tests of the evaluation tool (model.evaluate) on two cropped Kodak images.

Our codec is stood in for by a small adapter around Pillow's WebP: it makes real bitstreams, which is what
the harness must measure. A test with the real codec lives beside the codec's own tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model import baselines as baselines_mod
from model import evaluate
from model.baselines import BASELINES, BaselineUnavailableError
from model.paths import KODAK_DIR, OFFICIAL_REFERENCE_DIR
from model.rdcurves import curve_from_result, load_reference_curves

KODAK = KODAK_DIR
REFERENCE_DIR = OFFICIAL_REFERENCE_DIR
CROP = 256
RESULT_KEYS = {"bpp", "psnr-rgb", "ms-ssim-rgb", "encoding_time", "decoding_time"}


class WebPCodec:
    """Stand-in for ``model.codec.Codec``: lossy WebP at quality 20 * q."""

    model_id = "webp-adapter"

    def compress(self, image: np.ndarray, quality: float) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="WEBP", quality=int(20 * quality), method=0)
        return buf.getvalue()

    def decompress(self, data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def kodak2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder named ``kodak`` with the top-left 256 x 256 crops of kodim01 and kodim02."""
    if not (KODAK / "kodim01.png").is_file():
        pytest.skip(f"Kodak not found at {KODAK}")
    folder = tmp_path_factory.mktemp("data") / "kodak"
    folder.mkdir()
    for name in ("kodim01.png", "kodim02.png"):
        with Image.open(KODAK / name) as im:
            im.convert("RGB").crop((0, 0, CROP, CROP)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    evaluate.add_eval_arguments(parser)
    return parser.parse_args(list(argv))


def _check_layout(result: dict, n_points: int, n_images: int) -> None:
    assert isinstance(result["name"], str) and isinstance(result["description"], str)
    assert set(result["results"]) >= RESULT_KEYS
    for key in (*RESULT_KEYS, "psnr", "ms-ssim", "ms-ssim-db"):
        assert len(result["results"][key]) == n_points, key
    assert len(result["per_image"]) == n_points * n_images
    assert len(result["meta"]["images"]) == n_images


def test_list_images(kodak2: Path) -> None:
    assert [p.name for p in evaluate.list_images(kodak2)] == ["kodim01.png", "kodim02.png"]
    assert [p.name for p in evaluate.list_images(kodak2, limit=1)] == ["kodim01.png"]
    with pytest.raises(FileNotFoundError):
        evaluate.list_images(kodak2 / "missing")


def test_evaluate_codec_measures_real_bitstreams(kodak2: Path) -> None:
    images = evaluate.list_images(kodak2)
    result = evaluate.evaluate_codec(WebPCodec(), images, [1, 4], progress=False)
    _check_layout(result, 2, 2)
    codec = WebPCodec()
    originals = {p.name: np.asarray(Image.open(p).convert("RGB")) for p in images}
    for rec in result["per_image"]:
        data = codec.compress(originals[rec["image"]], rec["quality"])
        assert rec["bytes"] == len(data)  # WebP is deterministic
        assert rec["bpp"] == pytest.approx(8 * len(data) / CROP**2)
        assert 15 < rec["psnr-rgb"] < 60
        assert 0 < rec["ms-ssim-rgb"] < 1
        assert rec["encoding_time"] >= 0 and rec["decoding_time"] >= 0
    res = result["results"]
    assert res["bpp"][0] < res["bpp"][1] and res["psnr-rgb"][0] < res["psnr-rgb"][1]
    per_q1 = [r for r in result["per_image"] if r["quality"] == 1]
    assert res["bpp"][0] == pytest.approx(np.mean([r["bpp"] for r in per_q1]))
    assert res["psnr"] == res["psnr-rgb"] and res["ms-ssim"] == res["ms-ssim-rgb"]
    assert result["meta"]["model_id"] == "webp-adapter"
    assert result["settings"] == {"name": "quality", "values": [1, 4]}


def test_evaluate_codec_rejects_a_wrong_decode(kodak2: Path) -> None:
    class Broken(WebPCodec):
        def decompress(self, data: bytes) -> np.ndarray:
            return super().decompress(data)[:-1]

    with pytest.raises(ValueError, match="expected"):
        evaluate.evaluate_codec(Broken(), evaluate.list_images(kodak2, 1), [2], progress=False)


def test_evaluate_baseline(kodak2: Path) -> None:
    result = evaluate.evaluate_baseline("jpeg", evaluate.list_images(kodak2), [20, 70])
    _check_layout(result, 2, 2)
    assert result["meta"]["options"] == {"optimize": True, "subsampling": "4:2:0"}
    assert result["meta"]["versions"]["libjpeg-turbo"]
    with pytest.raises(KeyError, match="unknown baseline"):
        evaluate.evaluate_baseline("bpg", [], [1])


@pytest.mark.parametrize("name", list(BASELINES))
def test_every_baseline_round_trips(name: str) -> None:
    baseline = BASELINES[name]
    if not baseline.available:
        pytest.skip(f"{name} unavailable: {baseline.unavailable_reason()}")
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(128, 40, (48, 64, 3)), 0, 255).astype(np.uint8)
    data = baseline.encode(img, baseline.default_settings[len(baseline.default_settings) // 2])
    decoded = baseline.decode(data)
    assert decoded.shape == img.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - img).mean() < 40


def test_unavailable_baseline_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = dataclasses.replace(BASELINES["heic"], _check=lambda: "pillow-heif is not installed")
    monkeypatch.setitem(baselines_mod.BASELINES, "heic", missing)
    assert not missing.available
    with pytest.raises(BaselineUnavailableError, match="not installed"):
        evaluate.evaluate_baseline("heic", [], None)


def test_default_arguments() -> None:
    args = _parse()
    assert args.qualities == [1, 2, 3, 4, 5, 6]
    assert args.baselines == ["jpeg", "webp", "avif444", "avif420", "jxl", "heic"]
    assert evaluate._resolve(args.images) == KODAK_DIR.resolve()
    assert _parse("--qualities", "1", "2.5").qualities == [1, 2.5]
    assert _parse("--baseline-settings", "jpeg=10,50").baseline_settings == [("jpeg", [10, 50])]
    with pytest.raises(SystemExit):
        _parse("--baseline-settings", "bpg=1")


def test_run_eval_end_to_end(kodak2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = dataclasses.replace(BASELINES["heic"], _check=lambda: "pillow-heif is not installed")
    monkeypatch.setitem(baselines_mod.BASELINES, "heic", missing)
    out = tmp_path / "out"
    args = _parse(
        "--images", str(kodak2), "--qualities", "1", "4", "--out", str(out),
        "--baselines", "jpeg", "webp", "heic",
        "--baseline-settings", "jpeg=20,70", "--baseline-settings", "webp=20,70",
        "--reference-dir", str(REFERENCE_DIR), "--baseline-cache", "", "--no-progress",
    )  # fmt: skip
    assert evaluate.run_eval(args, codec=WebPCodec()) == 0

    ours = json.loads((out / "kodak-ours.json").read_text())
    _check_layout(ours, 2, 2)
    for name in ("jpeg", "webp"):
        _check_layout(json.loads((out / f"kodak-{name}.json").read_text()), 2, 2)
    assert not (out / "kodak-heic.json").exists()

    index = json.loads((out / "eval.json").read_text())
    assert index["baselines_unavailable"] == {"heic": "pillow-heif is not installed"}
    assert index["images"] == ["kodim01.png", "kodim02.png"]

    rows = json.loads((out / "bd-rate.json").read_text())["rows"]
    anchors = {r["anchor"] for r in rows}
    assert {"JPEG (libjpeg-turbo, 4:2:0, optimize)", "WebP (libwebp, method 6)", "heic"} <= anchors
    jpeg_row = next(r for r in rows if r["anchor"].startswith("JPEG"))
    assert isinstance(jpeg_row["bd_psnr_pchip"], float) and isinstance(jpeg_row["bd_psnr_cubic"], float)
    assert any("degree 1" in n for n in jpeg_row["notes"])  # 2 points: the cubic fit degrades to a line
    heic_row = next(r for r in rows if r["anchor"] == "heic")
    assert heic_row["bd_psnr_pchip"] is None and "unavailable" in heic_row["notes"][0]
    if REFERENCE_DIR.is_dir():
        assert any(r["anchor"].startswith("VTM") for r in rows)

    markdown = (out / "bd-rate.md").read_text()
    assert "| test | anchor |" in markdown and "heic" in markdown and "unavailable" in markdown

    with Image.open(out / "rd-kodak.png") as im:
        assert im.format == "PNG" and im.width >= 800 and im.height >= 400


def test_run_eval_reuses_cached_baselines(
    kodak2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    common = ["--images", str(kodak2), "--no-ours", "--reference-dir", "", "--no-progress"]
    common += ["--baselines", "jpeg"]
    first = _parse(*common, "--out", str(cache), "--baseline-settings", "jpeg=30,60", "--baseline-cache", "")
    assert evaluate.run_eval(first) == 0

    def fail(*args: object, **kwargs: object) -> dict:
        raise AssertionError("the cached baseline should have been reused")

    monkeypatch.setattr(evaluate, "evaluate_baseline", fail)
    args = _parse(*common, "--out", str(tmp_path / "b"), "--baseline-settings", "jpeg=30,60",
                  "--baseline-cache", str(cache))  # fmt: skip
    assert evaluate.run_eval(args) == 0
    index = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert index["baselines_reused_from_cache"]["names"] == ["jpeg"]

    # other settings do not match the cache: the baseline is evaluated again
    args = _parse(*common, "--out", str(tmp_path / "c"), "--baseline-settings", "jpeg=30,61",
                  "--baseline-cache", str(cache))  # fmt: skip
    with pytest.raises(AssertionError, match="reused"):
        evaluate.run_eval(args)


def test_run_eval_without_images(tmp_path: Path) -> None:
    empty = _parse("--images", str(tmp_path), "--no-ours", "--out", str(tmp_path / "o"))
    assert evaluate.run_eval(empty) == 2
    assert evaluate.run_eval(_parse("--images", str(tmp_path / "nope"), "--no-ours")) == 2


def test_reference_curves_for_kodak() -> None:
    if not REFERENCE_DIR.is_dir():
        pytest.skip(f"reference results not found at {REFERENCE_DIR}")
    curves = load_reference_curves(REFERENCE_DIR, "kodak")
    labels = {c.label for c in curves}
    assert "LALIC [kodak-lalic]" in labels and "VTM [kodak-vtm91-compressai]" in labels
    assert not any("tecnick" in c.label or "clicproval" in c.label for c in curves)
    msssim_vtm = next(c for c in curves if c.label == "VTM [msssim/kodak-vtm91]")
    assert msssim_vtm.has("msssim_db") and msssim_vtm.msssim_db[0] == pytest.approx(22.495537412572464)
    reeval = next(c for c in curves if "reeval" in c.label)
    assert reeval.has("psnr") and reeval.has("msssim_db")  # top-level lists, dB from the mean MS-SSIM


def test_curve_from_result_rejects_missing_rates() -> None:
    with pytest.raises(ValueError, match="bpp"):
        curve_from_result({"name": "x", "results": {"psnr": [30.0]}}, "reference")


def test_run_eval_with_the_shipped_codec(kodak2: Path, tmp_path: Path) -> None:
    """``lalic eval`` end to end on our real codec (shipped weights, real bitstreams)."""
    out = tmp_path / "ours"
    args = _parse(
        "--images", str(kodak2), "--qualities", "2", "5", "--out", str(out), "--baselines", "webp",
        "--baseline-settings", "webp=20,70", "--baseline-cache", "", "--reference-dir", str(REFERENCE_DIR),
        "--no-progress",
    )  # fmt: skip
    assert evaluate.run_eval(args) == 0
    ours = json.loads((out / "kodak-ours.json").read_text())
    _check_layout(ours, 2, 2)
    bpp = ours["results"]["bpp"]
    assert 0 < bpp[0] < bpp[1]  # quality 5 spends more bits than quality 2
    rows = json.loads((out / "bd-rate.json").read_text())["rows"]
    assert any(r["anchor"].startswith("WebP") for r in rows)
    with Image.open(next(out.glob("rd-*.png"))) as im:
        assert im.size[0] > 400 and im.size[1] > 200
