"""Portable streams (issue 38): every stream decodes to the same latents under every runtime.

The matrix encodes six Kodak images at three qualities here, with eager torch, and decodes them
in fresh processes under other backends, thread counts, a batch and the instruction sets of older
CPUs (``model.portability.DECODERS``), comparing the hash of the entropy-decoded latents ``y_hat``.
With the float32 entropy path of container version 1 most of these refused the streams; the
version-1 case below keeps that failure visible.

The committed corpus (``tests/data/portable``, written with the shipped weights on an AMD EPYC)
must decode to its recorded latents on whatever CPU runs the tests. Regenerate it only when the
shipped weights or the container version change: ``python -m model.portability corpus``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.bitstream import FORMAT_VERSION, read_header
from model.codec import Codec
from model.exact import EXACT_PATH_VERSION
from model.portability import (
    CORPUS_DIR,
    CORPUS_IMAGES,
    CORPUS_QUALITIES,
    DECODERS,
    ENCODERS,
    Decoder,
    encode_streams,
    latent_digest,
    run_encoder,
    run_matrix,
    stream_paths,
)


@pytest.fixture(scope="module")
def shipped() -> Codec:
    return Codec.from_pretrained()


def test_the_committed_corpus_decodes_to_its_latents(shipped: Codec) -> None:
    expected = json.loads((CORPUS_DIR / "expected.json").read_text())
    assert expected["weights_digest"] == shipped.weights_digest, "shipped weights changed: regenerate"
    assert expected["exact_path_version"] == EXACT_PATH_VERSION
    paths = stream_paths(CORPUS_DIR)
    assert sorted(p.name for p in paths) == sorted(expected["y_hat"])
    assert len(paths) == len(CORPUS_IMAGES) * len(CORPUS_QUALITIES)
    decoded = {}
    for path in paths:
        data = path.read_bytes()
        assert read_header(data).version == FORMAT_VERSION
        decoded[path.name] = latent_digest(shipped.decode_latents(data)[0])
    assert decoded == expected["y_hat"]


def test_fresh_streams_decode_identically_under_every_runtime(shipped: Codec, tmp_path: Path) -> None:
    reference = encode_streams(shipped, tmp_path)
    results = run_matrix(tmp_path, reference)
    assert set(results) == {d.name for d in DECODERS}
    for name, result in results.items():
        summary = result["summary"]
        assert summary["same"] == sorted(reference), f"{name}: {summary}"
    batch = results["torch, batch 8"]["report"]
    assert all(entry["pixels"] == entry["pixels_batch"] for entry in batch.values())


def test_version_1_streams_still_decode_where_they_were_made(tmp_path: Path) -> None:
    """Old streams keep decoding on the runtime that made them (and are refused, never decoded
    wrong, elsewhere: the symbol checksum)."""
    old = Codec.from_pretrained(stream_version=1)
    reference = encode_streams(old, tmp_path, images=CORPUS_IMAGES[:1], qualities=(3.0,))
    (name,) = reference
    assert read_header((tmp_path / name).read_bytes()).version == 1
    here = run_matrix(tmp_path, reference, [Decoder("torch, 2 threads")])
    assert here["torch, 2 threads"]["summary"]["same"] == [name]


def test_the_kernels_a_gpu_runs_decode_the_corpus_to_the_same_latents(shipped: Codec, monkeypatch) -> None:
    """Off the CPU the path multiplies in float64 and convolves by unfold (no int8 products, no
    oneDNN, no TF32): run those kernels here and the committed streams still decode to their
    recorded latents, so a CUDA decoder differs from a CPU one only in what IEEE-754 fixes."""
    import model.fixedpoint as fx

    expected = json.loads((CORPUS_DIR / "expected.json").read_text())["y_hat"]
    monkeypatch.setattr(fx, "use_int8_products", lambda device: False)
    for name in ("kodim04-q1.lalic", "kodim23-q6.lalic"):
        y_hat, _ = shipped.decode_latents((CORPUS_DIR / name).read_bytes())
        assert latent_digest(y_hat) == expected[name]


def test_the_portability_benchmark_counts_each_encoders_identical_streams(tmp_path: Path) -> None:
    """bench/portability.py's encoder table: TorchScript writes eager torch's bytes (the same kernels)."""
    from tests.model.bench_scripts import load_bench_script

    bench = load_bench_script("portability")
    argv = ["--images", "1", "--qualities", "3", "--versions", "2", "--skip-decoders"]
    assert bench.main([*argv, "--encoders", "torchscript", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "portability.json").read_text())
    assert report["rows"] == {}
    one = {"same_bytes": 1, "same_latents": 1}
    assert report["encoders"] == {"torchscript": {"version 2, g_a float32": one, "version 2, g_a exact": one}}
    assert "| torchscript | 1 / 1 | 1 / 1 |" in (tmp_path / "portability.md").read_text()


def test_exact_analysis_writes_the_same_bytes_on_every_runtime(tmp_path: Path) -> None:
    """Analysis precision ``exact``: every encoder runtime (other backends, 1 thread, the instruction
    sets of older CPUs), each in its own process, writes eager torch's bytes, which decode there to
    the same latents. (In float32, onnxruntime wrote other bytes for 4 of 72 Kodak streams.)"""
    args = ("exact", 2, ["kodim04"], [1.0, 3.5])  # 3.5: an interpolated gain
    reference = run_encoder(tmp_path / "reference", Decoder("torch, 2 threads"), *args)
    assert len(reference) == 2
    for runtime in ENCODERS:
        written = run_encoder(tmp_path / runtime.name.replace(" ", "_"), runtime, *args)
        assert written == reference, runtime.name
