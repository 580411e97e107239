"""Write the fuzzers' seed corpus: real LALIC bitstreams of small images at every quality.

The streams come from the shipped ``lalic-s`` weights (``Codec.from_pretrained()``, the codec the
decoder target runs), so every seed decodes: the fuzzer starts from inputs that reach the range
decoder and the network. The shipped weights are the same bytes on every machine; random
initialisation is not (``torch.nn.init`` draws through SIMD kernels that round differently on an
AMD EPYC, an Intel Xeon and under ``ATEN_CPU_CAPABILITY=default``), which once made the corpus
stale on every machine but the one that wrote it. Images are at most 64x64 (one 64x64 padded
block, a few tens of milliseconds per decode) and the streams are a few KB at most. Three seeds are
coded flipped (the header's orientation bits).

    python fuzz/make_corpus.py            # rewrites fuzz/corpus/ (after the shipped weights change)
    python fuzz/make_corpus.py --check    # exit 1 if fuzz/corpus/ is missing or stale

What ``--check`` compares, and why. The coded symbols of a seed may depend on the CPU: g_a runs in
float32, and oneDNN/MKL/ATen pick different kernels (so different rounding) on different CPUs, so
one latent of a few thousand can land on the other side of a rounding edge and the encoder writes
another (equally valid) stream. The entropy parameters do not depend on the CPU (container version
2, ``model.exact``), so every stream decodes on every CPU. So ``--check`` requires:

- the same seed names, and every header field but the symbol CRC equal to the one written here
  (image size, quality, latent shapes, tiling, orientation, version, model id and weights digest:
  none of them depends on the CPU);
- most payloads byte-identical to the ones written here: a change to the coding loop without a
  format-version bump changes them all, while another CPU's g_a changes a few at most;
- every committed seed whose payload differs from the one written here decodes here (a refusal
  would mean that the entropy path is not reproducible; the identical ones are the decoder
  fuzzer's first inputs).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from model.codec import Codec

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
QUALITIES = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 2.5, 4.75)
"""Every anchor quality, and two in between (interpolated gains)."""
SIZES = ((64, 64), (1, 1), (17, 50), (64, 3))
"""(height, width): the 64x64 block, the smallest image, and padded odd shapes."""


def smooth_image(height: int, width: int, seed: int) -> np.ndarray:
    """Gradients plus a little noise, uint8 (H, W, 3): cheap to code, like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    planes = [127 + 100 * np.sin(x / (5 + 2 * c) + phase[c]) * np.cos(y / (9 + c)) for c in range(3)]
    image = np.stack(planes, axis=-1) + rng.normal(0, 6, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def noise_image(height: int, width: int, seed: int) -> np.ndarray:
    """Uniform noise, uint8 (H, W, 3): the most expensive content (many escapes, long streams)."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def seeds(codec: Codec) -> Iterator[tuple[str, bytes]]:
    """(file name, bitstream) for every seed."""
    for quality in QUALITIES:
        tag = f"q{quality:g}".replace(".", "_")
        yield f"{tag}-smooth-64x64.lalic", codec.compress(smooth_image(64, 64, 1), quality)
        yield f"{tag}-noise-64x64.lalic", codec.compress(noise_image(64, 64, 2), quality)
    for height, width in SIZES[1:]:
        for quality in (1.0, 6.0):
            image = smooth_image(height, width, 3)
            yield f"q{quality:g}-smooth-{height}x{width}.lalic", codec.compress(image, quality)
    for orientation in (1, 2, 3):  # flipped before coding: the decoder turns the image back
        image = smooth_image(*SIZES[2], 4)
        name = f"q3-smooth-{SIZES[2][0]}x{SIZES[2][1]}-orientation{orientation}.lalic"
        yield name, codec.compress(image, 3.0, orientations=(orientation,))


def make_codec() -> Codec:
    """The codec the decoder target uses and the seeds come from: the shipped weights, eager torch,
    one thread on the entropy path. Callers that want one thread overall set it themselves
    (:func:`main` does): this leaves the process's thread count as it is."""
    from model.codec import Codec

    return Codec.from_pretrained(device="cpu", backend="torch", entropy_threads=1)


def header_differences(present: bytes, wanted: bytes) -> list[str]:
    """Names of the header fields in which two streams differ, the symbol CRC left out.

    The symbol CRC is the one header field that depends on the CPU's rounding (it checks the
    coded symbols); every other field is fixed by the image, the quality and the weights.
    """
    from model.bitstream import read_header

    old, new = read_header(present), read_header(wanted)
    return [
        field.name
        for field in dataclasses.fields(old)
        if field.name != "symbol_crc32" and getattr(old, field.name) != getattr(new, field.name)
    ]


def differing_payloads(present: dict[str, bytes], wanted: dict[str, bytes]) -> list[str]:
    """Names of the seeds whose committed bytes differ from the ones written on this CPU."""
    return sorted(name for name in wanted if present.get(name) != wanted[name])


def check_corpus(present: dict[str, bytes], wanted: dict[str, bytes], codec: Codec) -> list[str]:
    """What is stale in ``present`` (committed seeds) against ``wanted`` (written here); [] if none.

    See the module docstring for why payloads may differ between CPUs.
    """
    if set(present) != set(wanted):
        return [f"seed names differ: {sorted(set(present) ^ set(wanted))}"]
    problems = []
    bad_headers = set()
    for name in sorted(wanted):
        if fields := header_differences(present[name], wanted[name]):
            problems.append(f"{name}: header differs ({', '.join(fields)})")
            bad_headers.add(name)
    differ = differing_payloads(present, wanted)
    if 2 * len(differ) > len(wanted):
        problems.append(f"{len(differ)} of {len(wanted)} payloads differ: the coding loop changed")
    for name in (n for n in differ if n not in bad_headers):
        try:
            codec.decompress(present[name])
        except Exception as error:  # a refusal too: version-2 streams decode on every CPU
            problems.append(f"{name}: decoding raised {type(error).__name__}: {error}")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Write (or ``--check``) the corpus; returns the exit code."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=CORPUS_DIR, help="corpus folder (default: fuzz/corpus)")
    parser.add_argument("--check", action="store_true", help="only check that the corpus is up to date")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # as the decoder target runs
    codec = make_codec()
    wanted = dict(seeds(codec))
    if args.check:
        present = {path.name: path.read_bytes() for path in args.out.glob("*.lalic")}
        problems = check_corpus(present, wanted, codec)
        for problem in problems:
            print(problem)
        if problems:
            print(f"{args.out} is stale; run python fuzz/make_corpus.py")
            return 1
        differ = len(differing_payloads(present, wanted))
        print(f"{args.out}: {len(wanted)} seeds up to date ({differ} payloads differ on this CPU)")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.lalic"):
        old.unlink()
    for name, data in wanted.items():
        (args.out / name).write_bytes(data)
    total = sum(len(data) for data in wanted.values())
    print(
        f"wrote {len(wanted)} seeds ({total} bytes, largest {max(map(len, wanted.values()))}) to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
