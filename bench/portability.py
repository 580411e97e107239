"""Which decoders read which streams: the portability table of issue 38, before and after.

Run from the repository root with the venv active, e.g.::

    python bench/portability.py                                   # 24 Kodak images x q 1, 3, 6
    python bench/portability.py --images 2 --qualities 3 --out /tmp/portability

Streams of the Kodak images are encoded here with eager torch (the shipped weights) in container
version 1 (float32 entropy path) and version 2 (the reproducible path of ``model.exact``), then
decoded by every configuration of ``model.portability.DECODERS``, each in its own process. A
stream counts as decoded when its entropy-decoded latents hash like the encoder's; otherwise it
was refused (``BitstreamError``, the symbol checksum) or, which must never happen, decoded to
other latents.

The second table is about encoders: the same images coded in this process by each backend of
``--encoders`` (default torchscript and onnxruntime), counting the streams byte-identical to eager
torch's, and the streams whose latents (as the backend decodes them) hash like eager torch's. g_a
and h_a run in the backend's float32 arithmetic, so a backend that rounds differently can move a
latent across a rounding boundary; such a stream is still valid everywhere, only not the same bytes.
Results: ``--out``/``portability.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(1, str(ROOT))
from codec import machine  # noqa: E402

from model.paths import KODAK_DIR  # noqa: E402
from model.portability import DECODERS, compare, encode_streams, run_decoder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=24, help="first N Kodak images (default 24)")
    parser.add_argument("--qualities", type=float, nargs="+", default=[1.0, 3.0, 6.0])
    parser.add_argument("--versions", type=int, nargs="+", default=[1, 2], help="container versions (1 2)")
    parser.add_argument(
        "--encoders", nargs="*", default=["torchscript", "onnxruntime"], help="backends compared as encoders"
    )
    parser.add_argument("--skip-decoders", action="store_true", help="only the encoder table")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)

    from model.codec import Codec

    images = [p.stem for p in sorted(KODAK_DIR.glob("kodim*.png"))[: args.images]]
    rows: dict[str, dict[int, dict]] = {} if args.skip_decoders else {d.name: {} for d in DECODERS}
    encoders: dict[str, dict[int, dict]] = {name: {} for name in args.encoders}
    with tempfile.TemporaryDirectory() as tmp:
        for version in args.versions:
            folder = Path(tmp) / f"v{version}"
            codec = Codec.from_pretrained(stream_version=version)
            reference = encode_streams(codec, folder, images, args.qualities)
            for decoder in tqdm([] if args.skip_decoders else DECODERS, desc=f"version {version}"):
                summary = compare(reference, run_decoder(folder, decoder))
                rows[decoder.name][version] = {key: len(names) for key, names in summary.items()}
            for backend in tqdm(args.encoders, desc=f"version {version} encoders"):
                other = Codec.from_pretrained(backend=backend, stream_version=version)
                theirs = Path(tmp) / f"v{version}-{backend}"
                streams = encode_streams(other, theirs, images, args.qualities)
                same_bytes = sum((folder / n).read_bytes() == (theirs / n).read_bytes() for n in streams)
                same_latents = sum(streams[name] == reference[name] for name in streams)
                encoders[backend][version] = {"same_bytes": same_bytes, "same_latents": same_latents}
    meta = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"), **machine()}
    meta.update(images=len(images), qualities=args.qualities, streams=len(images) * len(args.qualities))
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "rows": rows, "encoders": encoders}
    (args.out / "portability.json").write_text(json.dumps(report, indent=1) + "\n")
    head = "| decoder | " + " | ".join(f"version {v}: same / refused / other latents" for v in args.versions)
    lines = [
        f"Portability, {meta['streams']} streams ({len(images)} Kodak images x q {args.qualities}), "
        f"encoded with eager torch; {meta.get('cpu', '?')}, {meta['date']}",
    ]
    if rows:
        lines += ["", head + " |", "|---" * (len(args.versions) + 1) + "|"]
    for name, by_version in rows.items():
        cells = [
            f"{r['same']} / {r['refused']} / {r['different']}" for r in (by_version[v] for v in args.versions)
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if encoders:
        head = "| encoder | " + " | ".join(f"version {v}: same bytes / same latents" for v in args.versions)
        lines += ["", "Streams coded by each backend against eager torch's:", "", head + " |"]
        lines.append("|---" * (len(args.versions) + 1) + "|")
        for name, by_version in encoders.items():
            counts = (by_version[v] for v in args.versions)
            cells = [f"{r['same_bytes']} / {r['same_latents']}" for r in counts]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (args.out / "portability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
