"""``bench/codec.py``'s report: stage tables, the side-by-side ratios and the scaling exponent."""

from __future__ import annotations

import argparse
from pathlib import Path

from tests.model.bench_scripts import load_bench_script


def timings(total_s: float, **stages: float) -> dict[str, list[float]]:
    return {"total": [total_s] * 3} | {name: [seconds] * 3 for name, seconds in stages.items()}


def result(codec: str, size: str, encode_s: float, decode_s: float) -> dict:
    return {
        "codec": codec,
        "size": size,
        "encode": timings(encode_s, analysis=encode_s / 2, entropy_parameters=encode_s / 4),
        "decode": timings(decode_s, synthesis=decode_s / 2),
        "bytes": 12345,
        "maxrss_mb": 400.0,
        "other_load": 0.01,
    }


def test_report_tables(tmp_path: Path) -> None:
    bench = load_bench_script("codec")
    results = [
        result("lalic:torch", "768x512", 0.300, 0.200),
        result("lalic:torch", "1536x1024", 1.200, 0.800),  # 4x the pixels, 4x the time: exponent 1
        result("webp", "768x512", 0.060, 0.010),
        {"codec": "lalic:torch", "size": "3840x2160", "error": "out of memory"},
    ]
    args = argparse.Namespace(
        argv=["--sizes", "768x512"], quality=3.0, threads=2, runs=3, large_runs=1, slow_runs=1,
        backends=["torch"], peers=["webp"], sizes=["768x512", "1536x1024", "3840x2160"],
    )  # fmt: skip
    meta = {"date": "2026-12-06", "machine": {"cpu": "test CPU", "cores": 2, "versions": {"torch": "x"}}}
    bench.write_report(results, args, meta, tmp_path)
    report = (tmp_path / "codec.md").read_text()
    assert "| torch | encode | 150 | - | 75 | - | - | **300** / 300 | 400 | 1 % |" in report
    assert "| torch | decode | - | - | - | - | 100 | **200** / 200 | 400 | 1 % |" in report
    assert "| torch | - | - | - | - | - | - | out of memory | - | - |" in report
    assert "| webp | 768x512 | 60 | 10 | 12,345 | 0.20 | 0.05 | 400 | 1 % |" in report
    assert "| lalic:torch | 763 | 509 | 1.00 | 1.00 |" in report  # ms/MP at 1536x1024 (1.57 MP), exponents
    assert "Quietness: 3 of 3 runs had other load <= 5 %" in report


def test_rounds_pool_every_runs_times() -> None:
    """--rounds: one codec and size timed in several rounds reports all their runs together (so
    its median spans every phase the machine went through), the largest peak RSS and the mean
    other load; an error in any round is reported instead."""
    bench = load_bench_script("codec")
    first, second = (
        result("lalic:torch", "768x512", 0.300, 0.200),
        result("lalic:torch", "768x512", 0.330, 0.100),
    )
    first["runs"], second["runs"], second["maxrss_mb"], second["other_load"] = 3, 3, 450.0, 0.03
    pooled = bench.pool_rounds([first, second])
    assert pooled["decode"]["total"] == [0.2] * 3 + [0.1] * 3
    assert pooled["encode"]["analysis"] == [0.15] * 3 + [0.165] * 3
    assert (pooled["runs"], pooled["rounds"], pooled["maxrss_mb"], pooled["other_load"]) == (
        6,
        2,
        450.0,
        0.02,
    )
    assert bench.stats(pooled["decode"]["total"])[0] == 150.0
    assert bench.pool_rounds([first]) is first
    failed = {"codec": "lalic:torch", "size": "768x512", "error": "timed out"}
    assert bench.pool_rounds([first, failed]) is failed
    assert "in each of 2 rounds" in bench.rounds_note(argparse.Namespace(rounds=2))
    assert bench.rounds_note(argparse.Namespace()) == ""
