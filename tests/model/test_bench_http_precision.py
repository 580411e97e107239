"""The issue-39 benchmark scripts run end to end at their smallest settings and report what they say."""

from __future__ import annotations

import json
from pathlib import Path

from tests.model.bench_scripts import load_bench_script


def test_precision_reports_psnr_changes_and_timings(tmp_path: Path) -> None:
    precision = load_bench_script("precision")
    args = ["--limit", "1", "--qualities", "6", "--runs", "1", "--out", str(tmp_path)]
    assert precision.main(args) == 0
    raw = json.loads((tmp_path / "precision.json").read_text())
    (row,) = raw["rows"]
    assert row["quality"] == 6 and row["images"] == 1
    assert -0.1 < row["mean_dpsnr_db"] < 0.1 and 0 < row["max_pixel_diff"] <= 8
    assert set(raw["timing"]) == {"float32", "bfloat16"}
    assert set(raw["encode_timing"]) == {"float32", "float32 fused", "bfloat16", "exact"}
    for encoder in row["encoders"].values():
        assert abs(encoder["rate_change_pct"]) < 3 and abs(encoder["mean_dpsnr_db"]) < 0.1
    assert "| 6 | 1 |" in (tmp_path / "precision.md").read_text()


def test_png_reports_every_encoder(tmp_path: Path) -> None:
    png = load_bench_script("png")
    assert png.main(["--limit", "1", "--runs", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "png.json").read_text())["rows"]
    assert [row["encoder"] for row in rows] == list(png.ENCODERS)
    assert all(row["exact"] and row["ms"] > 0 and row["mb"] > 0.3 for row in rows)


def test_http_path_reports_the_servers_stages(tmp_path: Path) -> None:
    http_path = load_bench_script("http_path")
    args = ["--backend", "torch", "--requests", "1", "--rounds", "1", "--warmup", "0", "--out", str(tmp_path)]
    assert http_path.main(args) == 0
    rows = {row["operation"]: row for row in json.loads((tmp_path / "http_path.json").read_text())["rows"]}
    assert set(rows["decompress"]["stages_ms"]) == {
        "read_body",
        "parse",
        "queue",
        "codec",
        "handoff",
        "encode_image",
        "respond",
    }
    assert set(rows["compress"]["stages_ms"]) == {
        "read_body",
        "decode_image",
        "queue",
        "codec",
        "handoff",
        "respond",
    }
    assert rows["decompress"]["http_p50_ms"] > rows["decompress"]["stages_ms"]["codec"] > 0


def test_entropy_weight_bits_reports_rate_changes(tmp_path: Path) -> None:
    """Fewer weight bits cost rate (the rounded path is still decodable), and the 14-bit path is
    left as it was for the codecs built afterwards."""
    from model import fixedpoint as fx

    bench = load_bench_script("entropy_weight_bits")
    before = fx.quantize_weight
    assert bench.main(["--bits", "4", "--qualities", "6", "--limit", "1", "--out", str(tmp_path)]) == 0
    assert fx.quantize_weight is before
    (row,) = json.loads((tmp_path / "entropy_weight_bits.json").read_text())["rows"]
    assert row["bits"] == 4 and row["bytes"] > row["bytes_14"] > 0 and row["rate_change_pct"] > 1
    assert "| 4 | 6 |" in (tmp_path / "entropy_weight_bits.md").read_text()
