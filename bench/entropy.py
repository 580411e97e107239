"""Entropy-coder benchmark: model.coder (constriction) vs PyPI ``range-coder`` vs CompressAI's rANS.

Synthetic but realistic latents: zero-mean Gaussian or Laplacian symbols whose scales are drawn
log-uniformly from [min_scale, max_scale]; each symbol uses the table with the largest scale not
above its own (CompressAI's scale-table convention), from ``--tables`` log-spaced 16-bit CDF tables.
All coders get the same integer CDF tables.  Times are medians over ``--runs`` runs (after one
warm-up); sizes are compared with the ideal information content ``-sum log2 p`` under the
quantised pmfs.  Prints a markdown table.

Optional coders (benchmark only, not project dependencies)::

    pip install range-coder
    pip install --no-deps compressai

Run from the repository root: ``python bench/entropy.py --help``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import ndtri
from scipy.stats import laplace, norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.coder import (
    CdfTables,
    _encode_varints,
    _zigzag,
    decode_symbols,
    encode_symbols,
)

TAIL_MASS = 1e-9


@dataclass
class Case:
    """One benchmark input: symbols, their table indexes, and the tables."""

    name: str
    symbols: np.ndarray
    indexes: np.ndarray
    tables: CdfTables


@dataclass
class Result:
    """Timings (ms, medians) and size for one coder on one case, or why it could not run."""

    coder: str
    encode_ms: float = math.nan
    decode_ms: float = math.nan
    size: int = 0
    note: str = ""


def build_case(dist: str, n: int, n_tables: int, lo: float, hi: float, seed: int) -> Case:
    """Tables for log-spaced scales and symbols with log-uniform per-symbol scales."""
    table_scales = np.exp(np.linspace(math.log(lo), math.log(hi), n_tables))
    family = norm if dist == "gaussian" else laplace
    # Half-width so that the two tails together hold TAIL_MASS (CompressAI's rule for Gaussians).
    multiplier = -ndtri(TAIL_MASS / 2) if dist == "gaussian" else math.log(1 / TAIL_MASS)
    pmfs, offsets = [], []
    for s in table_scales:
        half = math.ceil(multiplier * s)
        x = np.arange(-half, half + 1)
        pmfs.append(family.cdf(x + 0.5, scale=s) - family.cdf(x - 0.5, scale=s))
        offsets.append(-half)
    tables = CdfTables.from_pmfs(pmfs, offsets)

    rng = np.random.default_rng(seed)
    scales = np.exp(rng.uniform(math.log(lo), math.log(hi), n))
    indexes = np.clip(np.searchsorted(table_scales, scales, side="right") - 1, 0, n_tables - 1)
    draw = rng.normal if dist == "gaussian" else rng.laplace
    symbols = np.rint(draw(0.0, scales)).astype(np.int32)
    return Case(dist, symbols, indexes.astype(np.int32), tables)


def ideal_bytes(case: Case) -> float:
    """Information content of the symbols under the quantised pmfs, in bytes."""
    return case.tables.information_bits(case.symbols, case.indexes) / 8


def grouped_indices(case: Case) -> tuple[list[int], list[list[int]], bytes]:
    """Per-table lists of coded indices (overflow = pmf_len) and the escape bytes (range-coder)."""
    t = case.tables
    order = np.argsort(case.indexes.astype(np.uint16), kind="stable")
    counts = np.bincount(case.indexes, minlength=t.n_tables)
    pmf_len = np.repeat(t.cdf_lengths.astype(np.int64) - 2, counts)
    coded = case.symbols[order].astype(np.int64) - np.repeat(t.offsets.astype(np.int64), counts)
    over = (coded < 0) | (coded >= pmf_len)
    escapes = _encode_varints(_zigzag(case.symbols[np.sort(order[over])]))
    coded[over] = pmf_len[over]
    bounds = np.concatenate(([0], np.cumsum(counts)))
    groups = [coded[bounds[i] : bounds[i + 1]].tolist() for i in range(t.n_tables)]
    return counts.tolist(), groups, escapes


def time_runs(fn: Callable[[], object], runs: int) -> tuple[float, object]:
    """Median wall time in ms over ``runs`` calls (after one warm-up) and the last result."""
    out = fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def bench_constriction(case: Case, runs: int) -> Result:
    """model.coder: grouped constriction range coding plus escapes."""
    case.tables.models()  # built once per CdfTables in real use
    enc_ms, data = time_runs(lambda: encode_symbols(case.symbols, case.indexes, case.tables), runs)
    dec_ms, out = time_runs(lambda: decode_symbols(data, case.indexes, case.tables), runs)
    assert np.array_equal(out, case.symbols), "model.coder round trip failed"
    return Result("model.coder (constriction 0.5)", enc_ms, dec_ms, len(data))


def bench_range_coder(case: Case, runs: int) -> Result:
    """PyPI range-coder: file based, one cumFreq table per group, same grouping and escapes."""
    try:
        import range_coder
    except ImportError as exc:
        return Result("range-coder (PyPI)", note=f"not importable: {exc}")
    t = case.tables
    cdfs = [t.cdfs[i, : t.cdf_lengths[i]].tolist() for i in range(t.n_tables)]
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        path = os.path.join(tmp, "rc.bin")

        def encode() -> bytes:
            _, groups, escapes = grouped_indices(case)
            enc = range_coder.RangeEncoder(path)
            for i, group in enumerate(groups):
                if group:
                    enc.encode(group, cdfs[i])
            enc.close()
            return Path(path).read_bytes() + escapes

        enc_ms, data = time_runs(encode, runs)
        counts = np.bincount(case.indexes, minlength=t.n_tables).tolist()

        def decode() -> list[list[int]]:
            dec = range_coder.RangeDecoder(path)
            groups = [dec.decode(c, cdfs[i]) if c else [] for i, c in enumerate(counts)]
            dec.close()
            return groups

        dec_ms, groups = time_runs(decode, runs)
    assert groups == grouped_indices(case)[1], "range-coder round trip failed"
    note = "decode times index decoding only (no escape parsing / scatter)"
    return Result("range-coder 1.1 (PyPI)", enc_ms, dec_ms, len(data), note)


@functools.cache
def load_compressai_ans() -> tuple[types.ModuleType, str]:
    """Import compressai.ans with torchvision stubbed; returns (module, how it was loaded).

    If compressai/__init__ still fails (it imports datasets, which need e.g. ``requests``), the C
    extension is loaded through a bare stand-in ``compressai`` package that skips __init__.
    """
    sys.modules.setdefault("torchvision", types.ModuleType("torchvision"))
    try:
        import compressai.ans as ans

        return ans, "imported normally (torchvision stubbed)"
    except ImportError as exc:
        spec = importlib.util.find_spec("compressai")
        if spec is None or not spec.submodule_search_locations:
            raise
        for name in [m for m in sys.modules if m == "compressai" or m.startswith("compressai.")]:
            del sys.modules[name]
        package = types.ModuleType("compressai")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["compressai"] = package
        import compressai.ans as ans

        return ans, f"`import compressai` failed ({exc!r}), so compressai.ans was loaded without __init__"


def bench_compressai(case: Case, runs: int) -> Result:
    """CompressAI rANS (C++ via pybind11, Python lists in and out, bypass-coded escapes)."""
    try:
        ans, how = load_compressai_ans()
    except Exception as exc:  # report whatever stops the C extension from loading
        return Result("CompressAI rANS", note=f"cannot load compressai.ans: {exc!r}")
    t = case.tables
    cdfs = [t.cdfs[i, : t.cdf_lengths[i]].tolist() for i in range(t.n_tables)]
    lengths, offsets = t.cdf_lengths.tolist(), t.offsets.tolist()

    def encode() -> bytes:
        enc = ans.RansEncoder()
        return enc.encode_with_indexes(case.symbols.tolist(), case.indexes.tolist(), cdfs, lengths, offsets)

    def decode() -> np.ndarray:
        dec = ans.RansDecoder()
        out = dec.decode_with_indexes(data, case.indexes.tolist(), cdfs, lengths, offsets)
        return np.asarray(out, dtype=np.int32)

    enc_ms, data = time_runs(encode, runs)
    dec_ms, out = time_runs(decode, runs)
    assert np.array_equal(out, case.symbols), "CompressAI round trip failed"
    note = f"times include the .tolist() conversions its API needs; {how}"
    return Result("CompressAI 1.2.8 rANS", enc_ms, dec_ms, len(data), note)


CODERS: dict[str, Callable[[Case, int], Result]] = {
    "constriction": bench_constriction,
    "range-coder": bench_range_coder,
    "compressai": bench_compressai,
}


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run every coder on every distribution, print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=500_000, help="symbols per case (default 500000)")
    parser.add_argument("--tables", type=int, default=64, help="number of scale tables (default 64)")
    parser.add_argument("--min-scale", type=float, default=0.11, help="smallest scale (default 0.11)")
    parser.add_argument("--max-scale", type=float, default=20.0, help="largest scale (default 20)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per measurement (default 7)")
    parser.add_argument(
        "--dist", choices=["gaussian", "laplace", "both"], default="both", help="symbol distribution"
    )
    parser.add_argument(
        "--coders", nargs="+", choices=list(CODERS), default=list(CODERS), help="coders to run (default all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)

    dists = ["gaussian", "laplace"] if args.dist == "both" else [args.dist]
    rows = []
    notes: dict[str, str] = {}
    for dist in dists:
        case = build_case(dist, args.symbols, args.tables, args.min_scale, args.max_scale, args.seed)
        ideal = ideal_bytes(case)
        for name in args.coders:
            r = CODERS[name](case, args.runs)
            if r.note:
                notes[r.coder] = r.note
            if math.isnan(r.encode_ms):
                rows.append(f"| {dist} | {r.coder} | n/a | n/a | n/a | n/a |")
                continue
            rows.append(
                f"| {dist} | {r.coder} | {r.encode_ms:.1f} | {r.decode_ms:.1f} | {r.size:,} "
                f"| {100 * (r.size / ideal - 1):+.3f} % |"
            )
        rows.append(f"| {dist} | *ideal* (-sum log2 p) | | | {ideal:,.0f} | 0 |")
    print(
        f"{args.symbols:,} symbols, {args.tables} tables (16-bit CDFs), scales log-uniform "
        f"{args.min_scale}..{args.max_scale}, median of {args.runs} runs\n"
    )
    print("| distribution | coder | encode ms | decode ms | bytes | vs ideal |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    if notes:
        print()
    for coder, note in notes.items():
        print(f"- {coder}: {note}")


if __name__ == "__main__":
    main()
