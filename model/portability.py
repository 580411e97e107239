"""Do streams decode everywhere? Decode a folder of streams under many runtimes, one process each.

Each decoder configuration (:data:`DECODERS`) runs in its own Python process, because the CPU
features that oneDNN, PyTorch and MKL use are fixed when they load (``DNNL_MAX_CPU_ISA``,
``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``). The process decodes every ``*.lalic``
stream of a folder and reports, per stream, the hash of the entropy-decoded latents ``y_hat``
(:func:`latent_digest`; not of pixels, which g_s may move by one level between machines) or the
error that refused it. :func:`run_matrix` runs them all and compares each with a reference.
:func:`run_encoder` does the same for encoders (:data:`ENCODERS`): the streams each runtime writes
for the same images, by digest.

The committed corpus (``tests/data/portable``: streams of :data:`CORPUS_IMAGES` at
:data:`CORPUS_QUALITIES` written with the shipped weights, and the ``y_hat`` digest of each in
``expected.json``) is written by :func:`write_corpus`. Regenerate it only when the shipped weights
or the container version change.

Used by ``tests/model/test_portable_streams.py`` and ``bench/portability.py``; by hand::

    python -m model.portability decode STREAMS_DIR --backend torchscript --threads 1
    python -m model.portability encode OUT_DIR --backend onnxruntime --analysis-precision exact
    python -m model.portability corpus tests/data/portable
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.cpuinfo import cpuinfo_field
from model.paths import REPO_ROOT

STREAM_SUFFIX = ".lalic"

CORPUS_DIR = REPO_ROOT / "tests" / "data" / "portable"
"""The committed corpus of streams and their expected ``y_hat`` digests."""

CORPUS_IMAGES = ("kodim01", "kodim04", "kodim07", "kodim14", "kodim20", "kodim23")
"""Six Kodak images (kodim04 is the portrait one)."""

CORPUS_QUALITIES = (1.0, 3.5, 6.0)
"""The lowest, a fractional (interpolated gains) and the highest quality."""


@dataclass(frozen=True)
class Decoder:
    """One decoder configuration: a backend, torch threads, batch size and environment variables."""

    name: str
    backend: str = "torch"
    threads: int = 2
    batch: int = 1
    env: dict[str, str] = field(default_factory=dict)


DECODERS: tuple[Decoder, ...] = (
    Decoder("torch, 1 thread", threads=1),
    Decoder("torch, 2 threads", threads=2),
    Decoder("torch, batch 8", batch=8),
    Decoder("torchscript", backend="torchscript"),
    Decoder("onnxruntime", backend="onnxruntime"),
    Decoder("DNNL_MAX_CPU_ISA=AVX2", env={"DNNL_MAX_CPU_ISA": "AVX2"}),
    Decoder("DNNL_MAX_CPU_ISA=SSE41", env={"DNNL_MAX_CPU_ISA": "SSE41"}),
    Decoder("ATEN_CPU_CAPABILITY=default", env={"ATEN_CPU_CAPABILITY": "default"}),
    Decoder("MKL_ENABLE_INSTRUCTIONS=AVX2", env={"MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
)
"""What the portability matrix decodes with (issue 38): other backends, thread counts, a batch,
and the instruction sets of older x86 CPUs emulated on this one."""

ENCODERS: tuple[Decoder, ...] = tuple(d for d in DECODERS if d.batch == 1)
"""The runtimes that encode in the encoder table (a batch writes its images' streams alone: a test)."""


def latent_digest(y_hat) -> str:
    """First 16 hex digits of the sha256 of ``y_hat`` as contiguous little-endian float32 (NCHW)."""
    array = np.ascontiguousarray(y_hat.detach().cpu().float().numpy()).astype("<f4", copy=False)
    return hashlib.sha256(array.tobytes()).hexdigest()[:16]


def pixel_digest(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]


def stream_paths(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob(f"*{STREAM_SUFFIX}"))


def decode_folder(folder: Path, backend: str, threads: int, batch: int, weights: str | None = None) -> dict:
    """Decode every stream of ``folder``: ``{name: {"y_hat": digest} | {"error": message}}``.

    With ``batch > 1`` the streams are also decoded to pixels in batches of up to ``batch``
    streams of one padded shape and quality, and one by one: ``"pixels"`` and ``"pixels_batch"``
    hold both digests (they must agree: a batch decodes like its members alone).
    """
    import torch

    from model.bitstream import BitstreamError
    from model.codec import Codec

    torch.set_num_threads(threads)
    codec = Codec.from_pretrained(weights, backend=backend)
    out: dict[str, dict] = {}
    paths = stream_paths(folder)
    for path in paths:
        try:
            y_hat, _ = codec.decode_latents(path.read_bytes())
            out[path.name] = {"y_hat": latent_digest(y_hat)}
        except BitstreamError as exc:
            out[path.name] = {"error": f"{type(exc).__name__}: {exc}"}
    if batch > 1:
        decodable = [p for p in paths if "y_hat" in out[p.name]]
        groups: dict[tuple, list[Path]] = {}
        for path in decodable:
            header = codec.read_header(path.read_bytes())
            groups.setdefault((codec.padded_shape(header.height, header.width), header.quality), []).append(
                path
            )
        for members in groups.values():
            for start in range(0, len(members), batch):
                chunk = members[start : start + batch]
                images = codec.decompress_batch([p.read_bytes() for p in chunk])
                for path, image in zip(chunk, images, strict=True):
                    out[path.name]["pixels_batch"] = pixel_digest(image)
                    out[path.name]["pixels"] = pixel_digest(codec.decompress(path.read_bytes()))
    return out


def stream_name(image: str, quality: float) -> str:
    return f"{image}-q{quality:g}".replace(".", "_") + STREAM_SUFFIX


def encode_streams(
    codec, folder: Path, images: Sequence[str] = CORPUS_IMAGES, qualities: Sequence[float] = CORPUS_QUALITIES
) -> dict[str, str]:
    """Write ``folder/<image>-q<quality>.lalic`` for every Kodak image and quality with ``codec``;
    returns ``{name: y_hat digest}`` as this process decodes them (the reference)."""
    from PIL import Image

    from model.paths import KODAK_DIR

    folder.mkdir(parents=True, exist_ok=True)
    reference = {}
    for image_name in images:
        image = np.asarray(Image.open(KODAK_DIR / f"{image_name}.png").convert("RGB"))
        for quality in qualities:
            name = stream_name(image_name, quality)
            data = codec.compress(image, quality)
            (folder / name).write_bytes(data)
            reference[name] = latent_digest(codec.decode_latents(data)[0])
    return reference


def stream_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def encode_folder(
    folder: Path,
    backend: str,
    threads: int,
    analysis_precision: str,
    stream_version: int,
    images: Sequence[str],
    qualities: Sequence[float],
    weights: str | None = None,
) -> dict[str, dict[str, str]]:
    """Encode Kodak ``images`` at ``qualities`` into ``folder``; returns, per stream, the digests of its
    bytes and of its latents: ``{name: {"bytes": ..., "y_hat": ...}}``."""
    import torch

    from model.codec import Codec

    torch.set_num_threads(threads)
    codec = Codec.from_pretrained(
        weights, backend=backend, analysis_precision=analysis_precision, stream_version=stream_version
    )
    latents = encode_streams(codec, folder, images, qualities)
    return {
        name: {"bytes": stream_digest((folder / name).read_bytes()), "y_hat": digest}
        for name, digest in latents.items()
    }


def run_encoder(
    folder: Path,
    runtime: Decoder,
    analysis_precision: str,
    stream_version: int,
    images: Sequence[str],
    qualities: Sequence[float],
    timeout: float = 1800,
) -> dict[str, dict[str, str]]:
    """:func:`encode_folder` in a fresh Python process with ``runtime``'s backend, threads and environment."""
    cmd = [
        *("encode", str(folder), "--backend", runtime.backend, "--threads", str(runtime.threads)),
        *("--analysis-precision", analysis_precision, "--stream-version", str(stream_version)),
        *("--images", *images, "--qualities", *(repr(float(q)) for q in qualities)),
    ]
    return _run_module(cmd, runtime, timeout)


def _run_module(args: list[str], runtime: Decoder, timeout: float) -> dict:
    """``python -m model.portability ARGS`` with ``runtime``'s environment; its last line as JSON."""
    env = {**os.environ, **runtime.env, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "model.portability", *args]
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{runtime.name}: process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the architecture where that is not readable."""
    import platform

    return cpuinfo_field("model name") or platform.machine()


def write_corpus(folder: Path = CORPUS_DIR) -> dict:
    """(Re)write the committed corpus with the shipped weights; returns what ``expected.json`` holds."""
    import torch

    from model.codec import Codec
    from model.exact import EXACT_PATH_VERSION

    for old in stream_paths(folder):
        old.unlink()
    codec = Codec.from_pretrained()
    expected = {
        "weights_digest": codec.weights_digest,
        "exact_path_version": EXACT_PATH_VERSION,
        "written_on": f"{_cpu_model()}, torch {torch.__version__}",
        "y_hat": encode_streams(codec, folder),
    }
    (folder / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    return expected


def run_decoder(folder: Path, decoder: Decoder, weights: str | None = None, timeout: float = 1800) -> dict:
    """:func:`decode_folder` in a fresh Python process with ``decoder``'s environment."""
    cmd = ["decode", str(folder), "--backend", decoder.backend, "--threads", str(decoder.threads)]
    cmd += ["--batch", str(decoder.batch)]
    if weights:
        cmd += ["--weights", weights]
    return _run_module(cmd, decoder, timeout)


def compare(reference: dict[str, str], report: dict[str, dict]) -> dict[str, list[str]]:
    """Streams of ``reference`` ({name: y_hat digest}) that ``report`` decoded to the same latents,
    to other latents, or refused."""
    result: dict[str, list[str]] = {"same": [], "different": [], "refused": []}
    for name, digest in sorted(reference.items()):
        got = report.get(name, {})
        if "y_hat" not in got:
            result["refused"].append(name)
        else:
            result["same" if got["y_hat"] == digest else "different"].append(name)
    return result


def run_matrix(
    folder: Path,
    reference: dict[str, str],
    decoders: Sequence[Decoder] = DECODERS,
    weights: str | None = None,
) -> dict[str, dict]:
    """Every decoder of ``decoders`` on ``folder``: ``{name: {"report": ..., "summary": compare(...)}}``."""
    results = {}
    for decoder in decoders:
        report = run_decoder(folder, decoder, weights)
        results[decoder.name] = {"report": report, "summary": compare(reference, report)}
    return results


def main(argv: Sequence[str] | None = None) -> None:
    from model.stages import ANALYSIS_PRECISIONS

    parser = argparse.ArgumentParser(prog="python -m model.portability", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dec = sub.add_parser("decode", help="decode every *.lalic stream of a folder; print one JSON line")
    dec.add_argument("folder", type=Path, help="folder of *.lalic streams")
    dec.add_argument("--backend", default="torch", help="torch, torchscript or onnxruntime (default torch)")
    dec.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    dec.add_argument("--batch", type=int, default=1, help="also decode pixels in batches of this size")
    dec.add_argument("--weights", default=None, help="weight file (default: the shipped weights)")
    enc = sub.add_parser("encode", help="encode Kodak images into a folder; print one JSON line of digests")
    enc.add_argument("folder", type=Path, help="folder to write <image>-q<quality>.lalic into")
    enc.add_argument("--backend", default="torch", help="torch, torchscript or onnxruntime (default torch)")
    enc.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    enc.add_argument(
        "--analysis-precision",
        default="float32",
        choices=ANALYSIS_PRECISIONS,
        help="g_a's precision (exact: byte-identical streams on every runtime)",
    )
    enc.add_argument("--stream-version", type=int, default=2, help="container version (default 2)")
    enc.add_argument("--images", nargs="+", default=list(CORPUS_IMAGES), help="Kodak image names")
    enc.add_argument("--qualities", type=float, nargs="+", default=list(CORPUS_QUALITIES))
    enc.add_argument("--weights", default=None, help="weight file (default: the shipped weights)")
    corpus = sub.add_parser("corpus", help="rewrite the committed corpus of streams and latent digests")
    corpus.add_argument(
        "folder", type=Path, nargs="?", default=CORPUS_DIR, help="default: tests/data/portable"
    )
    args = parser.parse_args(argv)
    if args.command == "corpus":
        expected = write_corpus(args.folder)
        print(f"wrote {len(expected['y_hat'])} streams to {args.folder}")
        return
    if args.command == "encode":
        report = encode_folder(
            args.folder,
            args.backend,
            args.threads,
            args.analysis_precision,
            args.stream_version,
            args.images,
            args.qualities,
            args.weights,
        )
    else:
        report = decode_folder(args.folder, args.backend, args.threads, args.batch, args.weights)
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
