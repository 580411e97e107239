"""A short fuzzing budget in CI: the atheris targets run in subprocesses and must find no crash.

The long campaign (``fuzz/campaign.sh``) and its results are in bench/results/fuzz.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from fuzz.fuzz_decoder import CORPUS_DIR, Guard, InputTimeoutError, InvariantError, repair_crcs
from fuzz.make_corpus import check_corpus, make_codec, smooth_image
from model.bitstream import BitstreamError, unpack
from model.codec import Codec

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "fuzz" / "fuzz_decoder.py"
PARSER_RUNS = 20_000
DECODER_RUNS = 1000
BUDGET_S = 60.0
needs_atheris = pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="no atheris")


def run_fuzzer(
    tmp_path: Path, target: str, runs: int, corpus: Path = CORPUS_DIR
) -> tuple[str, dict[str, object]]:
    """Fuzz ``target`` for ``runs`` inputs from ``corpus``; returns the output and the last statistics."""
    command = [sys.executable, str(SCRIPT), "--target", target, "--runs", str(runs), "--seed", "7"]
    command += ["--corpus", str(corpus)]
    command += ["--work-dir", str(tmp_path / "work"), "--artifacts", str(tmp_path / "crashes")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=BUDGET_S * 2, env=env, cwd=REPO)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert list((tmp_path / "crashes").iterdir()) == [], output[-4000:]
    assert f"#{runs}\tDONE" in output, output[-4000:]
    assert elapsed < BUDGET_S, f"{target}: {runs} inputs took {elapsed:.0f} s"
    stats = [line.split(" ", 1)[1] for line in output.splitlines() if line.startswith("lalic-fuzz {")]
    return output, json.loads(stats[-1])


OTHER_CPUS = {
    "native": {},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "onednn-avx2": {"DNNL_MAX_CPU_ISA": "AVX2"},
    "mkl-avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
"""Settings that make this CPU compute like another one (each read when the library loads)."""


@pytest.mark.parametrize("cpu", OTHER_CPUS)
def test_seed_corpus_is_current(cpu: str) -> None:
    """Stale seeds (other weights, another format) would all stop at the first check: regenerate them.

    ``make_corpus.py --check`` compares what does not depend on the CPU (see its docstring), so it
    passes on whichever CPU wrote the seeds and on every other one: here emulated by narrowing the
    instruction sets of ATen, oneDNN and MKL, which round differently (random initialisation, which
    the corpus once came from, gave other weights under ``ATEN_CPU_CAPABILITY=default``).
    """
    result = subprocess.run(
        [sys.executable, str(REPO / "fuzz" / "make_corpus.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, **OTHER_CPUS[cpu]},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "25 seeds up to date" in result.stdout


@needs_atheris
def test_parser_target_short(tmp_path: Path) -> None:
    _, stats = run_fuzzer(tmp_path, "parser", PARSER_RUNS)
    assert stats["inputs"] == PARSER_RUNS and stats["accepted"] >= 1


def test_check_corpus_names_what_is_stale() -> None:
    committed = {path.name: path.read_bytes() for path in sorted(CORPUS_DIR.glob("*.lalic"))}
    codec = make_codec()
    assert check_corpus(committed, committed, codec) == []
    missing = dict(committed)
    del missing["q3-smooth-64x64.lalic"]
    assert check_corpus(missing, committed, codec) == ["seed names differ: ['q3-smooth-64x64.lalic']"]
    other_weights = Codec.random("lalic-s", seed=0, device="cpu", backend="torch", entropy_threads=1)
    rewritten = {**committed, "q1-smooth-1x1.lalic": other_weights.compress(smooth_image(1, 1, 3), 1.0)}
    assert check_corpus(rewritten, committed, codec) == [
        "q1-smooth-1x1.lalic: header differs (weights_digest)"
    ]
    swapped = {**committed, "q3-smooth-64x64.lalic": committed["q4-smooth-64x64.lalic"]}
    assert check_corpus(swapped, committed, codec) == ["q3-smooth-64x64.lalic: header differs (quality)"]
    mutated = {}
    for name, data in committed.items():  # every payload altered, CRCs repaired: decodes wrong or is refused
        flipped = bytearray(data)
        flipped[-5] ^= 0x5A
        mutated[name] = repair_crcs(bytes(flipped))
    problems = check_corpus(mutated, committed, codec)
    assert problems[0] == "25 of 25 payloads differ: the coding loop changed"
    # version-2 streams decode on every CPU, so a seed that is refused here is a problem too (most
    # of the altered payloads are refused; a few decode, wrongly, without an error)
    assert len(problems) > 13 and all("decoding raised BitstreamError" in p for p in problems[1:])

    class BrokenDecoder:
        def decompress(self, data: bytes) -> None:
            raise IndexError("out of range")

    one = {**committed, "q1-noise-64x64.lalic": mutated["q1-noise-64x64.lalic"]}
    assert check_corpus(one, committed, BrokenDecoder()) == [
        "q1-noise-64x64.lalic: decoding raised IndexError: out of range"
    ]


@needs_atheris
def test_decoder_target_short(tmp_path: Path) -> None:
    """Seeds written on this machine all decode here (a stream from another CPU may be refused)."""
    corpus = tmp_path / "corpus"
    made = subprocess.run(
        [sys.executable, str(REPO / "fuzz" / "make_corpus.py"), "--out", str(corpus)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    _, stats = run_fuzzer(tmp_path, "decoder", DECODER_RUNS, corpus)
    assert stats["inputs"] == DECODER_RUNS
    assert stats["accepted"] >= len(list(corpus.glob("*.lalic"))) == 25  # every seed decodes


def test_repair_crcs_reaches_past_the_checksums() -> None:
    for seed in sorted(CORPUS_DIR.glob("*.lalic")):
        data = seed.read_bytes()
        assert repair_crcs(data) == data
    data = bytearray((CORPUS_DIR / "q3-smooth-64x64.lalic").read_bytes())
    data[-5] ^= 0x5A
    with pytest.raises(BitstreamError, match="payload CRC"):
        unpack(bytes(data))
    unpack(repair_crcs(bytes(data)))  # the mutation now reaches the range decoder
    data[20] ^= 0x01  # a header byte (the quality)
    assert zlib.crc32(repair_crcs(bytes(data))) != zlib.crc32(bytes(data))
    for short in (b"", b"LALC", b"LALC\x01\x00\x07lalic-s", b"nope" * 40):
        assert repair_crcs(short) == short


def test_the_guard_turns_slow_inputs_and_stray_exceptions_into_crashes() -> None:
    def spin(_: bytes) -> str:
        end = time.process_time() + 5
        while time.process_time() < end:
            pass
        return "accepted"

    def swallow(_: bytes) -> str:  # like code that wraps every BaseException into its own error
        try:
            spin(b"")
        except BaseException:
            return "rejected"
        return "accepted"

    def wrong_error(_: bytes) -> str:
        raise IndexError("not a BitstreamError")

    for target, error in ((spin, InputTimeoutError), (swallow, InputTimeoutError), (wrong_error, IndexError)):
        guard = Guard(target, "test", time_limit_s=0.2, rss_limit_mb=1 << 20)
        with pytest.raises(error):
            guard(b"x")
    ok = Guard(lambda _: "accepted", "test", time_limit_s=0.2, rss_limit_mb=1 << 20)
    ok(b"x")
    assert ok.summary()["accepted"] == 1
    assert issubclass(InvariantError, AssertionError)


def test_the_memory_guard_counts_only_the_fuzzers_own_memory() -> None:
    """A fuzzer started by a large process (pytest after the model tests) must not inherit its peak:
    Linux keeps ``ru_maxrss`` across execve, which once failed the parser target at 7 GB."""
    ballast = bytearray(768 << 20)
    ballast[:: 1 << 12] = b"\1" * len(range(0, len(ballast), 1 << 12))  # touch every page
    code = "from fuzz.fuzz_decoder import _peak_rss_mb; print(_peak_rss_mb())"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    del ballast
    assert child.returncode == 0, child.stderr
    assert 1 < float(child.stdout) < 512
