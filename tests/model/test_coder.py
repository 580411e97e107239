"""Tests for model.coder: integer CDF tables and constriction range coding with escapes."""

from __future__ import annotations

import hashlib
import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from model.coder import (
    PRECISION,
    CdfTables,
    CoderError,
    decode_symbols,
    encode_symbols,
    pmf_to_quantized_cdf,
)

_erf = np.frompyfunc(math.erf, 1, 1)


def gaussian_pmf(scale: float, tail: float = 1e-9) -> tuple[np.ndarray, int]:
    """Discretised zero-mean Gaussian on [-L, L] (CompressAI-style bound); returns (pmf, offset)."""
    half = math.ceil(scale * 6.1)
    x = np.arange(-half, half + 1, dtype=np.float64)
    cdf = lambda v: 0.5 * (1.0 + _erf(v / (scale * math.sqrt(2.0))).astype(np.float64))  # noqa: E731
    return cdf(x + 0.5) - cdf(x - 0.5), -half


def laplace_pmf(scale: float) -> tuple[np.ndarray, int]:
    """Discretised zero-mean Laplacian on [-L, L]; returns (pmf, offset)."""
    half = math.ceil(scale * 10)
    x = np.arange(-half, half + 1, dtype=np.float64)
    cdf = lambda v: np.where(v < 0, 0.5 * np.exp(v / scale), 1 - 0.5 * np.exp(-v / scale))  # noqa: E731
    return cdf(x + 0.5) - cdf(x - 0.5), -half


def make_tables(n_tables: int = 16, lo: float = 0.11, hi: float = 20.0) -> CdfTables:
    """Gaussian tables with log-spaced scales, odd tables Laplacian for variety."""
    pmfs, offsets = [], []
    for i, s in enumerate(np.exp(np.linspace(math.log(lo), math.log(hi), n_tables))):
        pmf, off = (gaussian_pmf if i % 2 == 0 else laplace_pmf)(float(s))
        pmfs.append(pmf)
        offsets.append(off)
    return CdfTables.from_pmfs(pmfs, offsets)


TABLES = make_tables()


def sample_from_tables(tables: CdfTables, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Symbols drawn from the quantised pmfs; the overflow symbol becomes an out-of-range value."""
    idx = rng.integers(0, tables.n_tables, n)
    sym = np.empty(n, dtype=np.int32)
    for t in range(tables.n_tables):
        mask = idx == t
        pmf = tables.pmf(t)
        coded = rng.choice(pmf.size, size=int(mask.sum()), p=pmf)
        values = coded + int(tables.offsets[t])
        over = coded == pmf.size - 1
        values[over] = int(tables.offsets[t]) + pmf.size + rng.integers(0, 1000, int(over.sum()))
        sym[mask] = values
    return sym, idx


def ideal_bits(sym: np.ndarray, idx: np.ndarray, tables: CdfTables) -> float:
    """-sum log2 p over the quantised pmfs (out-of-range values cost the overflow symbol)."""
    bits = 0.0
    for t in range(tables.n_tables):
        mask = idx == t
        pmf = tables.pmf(t)
        coded = sym[mask].astype(np.int64) - int(tables.offsets[t])
        coded = np.where((coded < 0) | (coded >= pmf.size - 1), pmf.size - 1, coded)
        bits -= float(np.log2(pmf[coded]).sum())
    return bits


# --- pmf_to_quantized_cdf -------------------------------------------------------------------------


def check_cdf(cdf: np.ndarray, n: int, precision: int = PRECISION) -> None:
    assert cdf.dtype == np.int32
    assert cdf.shape == (n + 2,)
    assert cdf[0] == 0
    assert cdf[-1] == 1 << precision
    assert np.all(np.diff(cdf) >= 1)


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        st.integers(1, 300),
        elements=st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False),
    )
)
def test_quantized_cdf_invariants(pmf: np.ndarray) -> None:
    cdf = pmf_to_quantized_cdf(pmf)
    check_cdf(cdf, pmf.size)
    np.testing.assert_array_equal(cdf, pmf_to_quantized_cdf(pmf.copy()))  # deterministic


@pytest.mark.parametrize("scale", [0.11, 0.5, 3.0, 20.0, 80.0])
def test_quantized_cdf_close_to_pmf(scale: float) -> None:
    pmf, _ = gaussian_pmf(scale)
    cdf = pmf_to_quantized_cdf(pmf)
    check_cdf(cdf, pmf.size)
    freq = np.diff(cdf) / 2.0**PRECISION
    kl = float(np.sum(pmf * np.log2(pmf / freq[:-1], where=pmf > 0, out=np.zeros_like(pmf))))
    entropy = -float(np.sum(pmf * np.log2(pmf, where=pmf > 0, out=np.zeros_like(pmf))))
    assert kl < 1e-3 + 2e-3 * entropy, (kl, entropy)


def test_quantized_cdf_tail_mass_goes_to_overflow() -> None:
    cdf = pmf_to_quantized_cdf(np.array([0.25, 0.25]))
    assert np.diff(cdf).tolist() == [16384, 16384, 32768]


def test_quantized_cdf_edge_cases() -> None:
    check_cdf(pmf_to_quantized_cdf(np.zeros(5)), 5)
    check_cdf(pmf_to_quantized_cdf(np.full(10, 7.0)), 10)  # sums above one: renormalised
    check_cdf(pmf_to_quantized_cdf(np.full(65535, 1e-9)), 65535)  # everything at frequency 1
    check_cdf(pmf_to_quantized_cdf(np.array([1.0, 0.0, 0.0]), precision=4), 3, precision=4)
    for bad in (np.array([]), np.array([0.5, np.nan]), np.array([-0.1, 0.5]), np.ones(65536)):
        with pytest.raises(ValueError):
            pmf_to_quantized_cdf(bad)


# --- CdfTables ------------------------------------------------------------------------------------


def test_tables_arrays_round_trip() -> None:
    arrays = TABLES.to_arrays()
    assert set(arrays) == {"cdfs", "cdf_lengths", "offsets"}
    assert all(a.dtype == np.int32 for a in arrays.values())
    again = CdfTables.from_arrays(**arrays)
    for key, value in again.to_arrays().items():
        np.testing.assert_array_equal(value, arrays[key])
    sym, idx = sample_from_tables(TABLES, 1000, np.random.default_rng(1))
    assert encode_symbols(sym, idx, TABLES) == encode_symbols(sym, idx, again)
    assert TABLES.models() is TABLES.models()  # cached


def test_tables_reject_invalid() -> None:
    arrays = TABLES.to_arrays()
    broken = arrays["cdfs"].copy()
    broken[0, 2] = broken[0, 1]  # zero frequency
    with pytest.raises(ValueError):
        CdfTables(broken, arrays["cdf_lengths"], arrays["offsets"])
    with pytest.raises(ValueError):
        CdfTables(arrays["cdfs"], arrays["cdf_lengths"] + 1000, arrays["offsets"])
    with pytest.raises(ValueError):
        CdfTables(arrays["cdfs"], arrays["cdf_lengths"], arrays["offsets"][:-1])


# --- round trips ----------------------------------------------------------------------------------


def round_trip(sym: np.ndarray, idx: np.ndarray, tables: CdfTables = TABLES) -> bytes:
    data = encode_symbols(sym, idx, tables)
    out = decode_symbols(data, idx, tables)
    assert out.dtype == np.int32
    assert out.shape == np.shape(idx)
    np.testing.assert_array_equal(out, sym)
    return data


def test_round_trip_with_escapes() -> None:
    rng = np.random.default_rng(0)
    idx = rng.integers(0, TABLES.n_tables, (3, 40, 50))
    scales = np.exp(np.linspace(math.log(0.11), math.log(20.0), TABLES.n_tables))[idx]
    sym = np.rint(rng.normal(0.0, scales * 1.5)).astype(np.int32)  # wider than the tables
    flat = sym.reshape(-1)
    flat[rng.integers(0, flat.size, 50)] = rng.integers(-(2**31), 2**31 - 1, 50, dtype=np.int64)
    flat[:4] = [np.iinfo(np.int32).min, np.iinfo(np.int32).max, 10**6, -(10**6)]
    round_trip(sym, idx)


def test_empty_and_single_symbol() -> None:
    data = round_trip(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64))
    assert len(data) <= 2
    round_trip(np.zeros((0, 4), dtype=np.int32), np.zeros((0, 4), dtype=np.int64))
    for value in (0, 3, -(2**31), 2**31 - 1):
        round_trip(np.array([value], dtype=np.int32), np.array([5]))
    round_trip(np.array(7, dtype=np.int32), np.array(2))  # 0-d


def test_bytes_like_inputs() -> None:
    expected = decode_symbols(SAMPLE, SAMPLE_IDX, TABLES)
    np.testing.assert_array_equal(expected, SAMPLE_SYM)
    for data in (bytearray(SAMPLE), memoryview(SAMPLE)):
        np.testing.assert_array_equal(decode_symbols(data, SAMPLE_IDX, TABLES), expected)
    np.testing.assert_array_equal(decode_symbols(SAMPLE, SAMPLE_IDX.astype(np.uint8), TABLES), expected)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_tables=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 400),
    spread=st.sampled_from([0.5, 3.0, 1e4, 2e9]),
)
def test_round_trip_property(n_tables: int, seed: int, n: int, spread: float) -> None:
    rng = np.random.default_rng(seed)
    pmfs = [rng.dirichlet(np.ones(int(rng.integers(1, 40)))) * rng.uniform(0.9, 1.0) for _ in range(n_tables)]
    tables = CdfTables.from_pmfs(pmfs, rng.integers(-50, 50, n_tables))
    idx = rng.integers(0, n_tables, n)
    sym = np.clip(np.rint(rng.normal(0, spread, n)), -(2**31), 2**31 - 1).astype(np.int32)
    round_trip(sym, idx, tables)


def test_information_bits_match_the_pmfs() -> None:
    """CdfTables.information_bits against the per-table sum above, escapes included."""
    rng = np.random.default_rng(5)
    idx = rng.integers(0, TABLES.n_tables, (3, 40, 50))
    scales = np.exp(np.linspace(math.log(0.11), math.log(20.0), TABLES.n_tables))[idx]
    sym = np.rint(rng.normal(0.0, scales * 1.5)).astype(np.int32)
    sym.reshape(-1)[rng.integers(0, sym.size, 50)] = rng.integers(-(10**6), 10**6, 50)  # escapes
    low = TABLES.offsets[idx].astype(np.int64)
    escaped = np.count_nonzero((sym < low) | (sym >= low + TABLES.cdf_lengths[idx] - 2))
    assert escaped > 40
    assert TABLES.information_bits(sym, idx) == pytest.approx(ideal_bits(sym, idx, TABLES), rel=1e-12)
    with_escapes = TABLES.information_bits(sym, idx, escape_bits=16)
    assert with_escapes == pytest.approx(ideal_bits(sym, idx, TABLES) + 16 * escaped, rel=1e-12)


def test_size_close_to_ideal() -> None:
    rng = np.random.default_rng(2)
    sym, idx = sample_from_tables(TABLES, 120_000, rng)
    data = round_trip(sym, idx)
    ideal_bytes = ideal_bits(sym, idx, TABLES) / 8
    assert len(data) <= ideal_bytes * 1.01 + 16


def test_large_batch_is_fast() -> None:
    tables = make_tables(64)
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 64, 500_000)
    sym = np.rint(rng.laplace(0.0, np.exp(rng.uniform(math.log(0.11), math.log(20.0), idx.size)))).astype(
        np.int32
    )
    tables.models()
    t0 = time.perf_counter()
    data = encode_symbols(sym, idx, tables)
    t1 = time.perf_counter()
    out = decode_symbols(data, idx, tables)
    t2 = time.perf_counter()
    np.testing.assert_array_equal(out, sym)
    # Typically ~10 ms / ~20 ms; the bound is loose for a loaded CI machine.
    assert t1 - t0 < 2.0 and t2 - t1 < 2.0


# --- misuse and malformed data --------------------------------------------------------------------


def test_encode_rejects_bad_inputs() -> None:
    with pytest.raises(CoderError):
        encode_symbols(np.zeros(3, np.int32), np.zeros(4, np.int64), TABLES)
    with pytest.raises(CoderError):
        encode_symbols(np.zeros(3, np.int32), np.full(3, TABLES.n_tables), TABLES)
    with pytest.raises(CoderError):
        encode_symbols(np.array([2**40]), np.zeros(1, np.int64), TABLES)
    with pytest.raises(CoderError):
        encode_symbols(np.zeros(3, np.float32), np.zeros(3, np.int64), TABLES)


def decode_or_error(data: bytes, idx: np.ndarray) -> None:
    """Decoding garbage must either raise CoderError or return an array of the right shape."""
    try:
        out = decode_symbols(data, idx, TABLES)
    except CoderError:
        return
    assert out.shape == idx.shape and out.dtype == np.int32


SAMPLE_IDX = np.random.default_rng(4).integers(0, TABLES.n_tables, 300)
SAMPLE_SYM = np.rint(np.random.default_rng(5).normal(0, 30, 300)).astype(np.int32)  # many escapes
SAMPLE = encode_symbols(SAMPLE_SYM, SAMPLE_IDX, TABLES)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    decode_or_error(data, SAMPLE_IDX)


def test_truncation_and_trailing_bytes() -> None:
    for n in range(len(SAMPLE)):
        with pytest.raises(CoderError):
            decode_symbols(SAMPLE[:n], SAMPLE_IDX, TABLES)
    with pytest.raises(CoderError):
        decode_symbols(SAMPLE + b"\x00", SAMPLE_IDX, TABLES)


def test_bit_flips() -> None:
    for pos in range(len(SAMPLE)):
        for bit in (0, 3, 7):
            flipped = bytearray(SAMPLE)
            flipped[pos] ^= 1 << bit
            decode_or_error(bytes(flipped), SAMPLE_IDX)


def test_huge_declared_lengths_rejected_quickly() -> None:
    huge = b"\xff" * 9 + b"\x01"  # a 10-byte varint near 2**64
    for data in (huge + b"\x00", b"\x00" + huge, b"\xff" * 20, b"\x80" * 11):
        t0 = time.perf_counter()
        with pytest.raises(CoderError):
            decode_symbols(data, SAMPLE_IDX, TABLES)
        assert time.perf_counter() - t0 < 0.5


def test_escape_inside_table_range_rejected() -> None:
    tables = CdfTables.from_pmfs([np.array([0.5, 0.5])], [0])
    idx = np.zeros(1, dtype=np.int64)
    data = encode_symbols(np.array([9]), idx, tables)  # 9 is escaped as zigzag(9) = 18
    assert data.endswith(bytes([18]))
    assert decode_symbols(data, idx, tables).tolist() == [9]
    with pytest.raises(CoderError, match="inside"):
        decode_symbols(data[:-1] + bytes([2]), idx, tables)  # escape says 1, which is in range


def test_decode_rejects_non_bytes_and_bad_indexes() -> None:
    with pytest.raises(CoderError):
        decode_symbols(12345, SAMPLE_IDX, TABLES)  # type: ignore[arg-type]
    with pytest.raises(CoderError):
        decode_symbols(SAMPLE, SAMPLE_IDX - 1, TABLES)


def test_golden_stream() -> None:
    """The wire format must not drift: a changed constriction quantisation would break old streams."""
    pmfs = [np.array([2.0 ** -(abs(k) + 2) for k in range(-w, w + 1)]) for w in (1, 4, 9)]
    tables = CdfTables.from_pmfs(pmfs, [-1, -4, -9])
    assert tables.cdfs[1, : tables.cdf_lengths[1]].tolist() == [
        0, 1024, 3072, 7168, 15360, 31744, 39936, 44032, 46080, 47104, 65536,
    ]  # fmt: skip
    k = np.arange(3000)
    sym, idx = (k * 7919) % 29 - 14, k % 3
    data = round_trip(sym, idx, tables)
    assert len(data) == 3042
    digest = hashlib.sha256(data).hexdigest()
    assert digest == "99e94e403f840b307e94a391542581a5ff9aa5b99272480e137691f494538726"
