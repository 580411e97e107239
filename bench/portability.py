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

The second table is about encoders: the same images coded by each runtime of ``--encoders`` (the
decoder table's runtimes but the batch, each in its own process), counting the streams
byte-identical to eager torch's (2 threads) and those whose latents hash like eager torch's, for
g_a and h_a in float32 and in the reproducible arithmetic (``--analysis-precisions float32 exact``).
In float32 a runtime that rounds differently can move a latent across a rounding boundary (a valid
stream everywhere, only not the same bytes); ``exact`` is meant to write the same bytes everywhere.
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

from model.bitstream import FLOAT_PATH_VERSION  # noqa: E402
from model.paths import KODAK_DIR  # noqa: E402
from model.portability import DECODERS, ENCODERS, compare, encode_streams, run_decoder, run_encoder  # noqa: E402

REFERENCE = next(e for e in ENCODERS if e.name == "torch, 2 threads")
"""The encoder every other runtime's streams are compared with."""


def column_name(version: int, precision: str) -> str:
    return f"version {version}, g_a {precision}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=24, help="first N Kodak images (default 24)")
    parser.add_argument("--qualities", type=float, nargs="+", default=[1.0, 3.0, 6.0])
    parser.add_argument("--versions", type=int, nargs="+", default=[1, 2], help="container versions (1 2)")
    parser.add_argument(
        "--encoders",
        nargs="*",
        default=[e.name for e in ENCODERS],
        help="runtimes compared as encoders, by name (default: the decoder table's but the batch)",
    )
    parser.add_argument(
        "--analysis-precisions",
        nargs="+",
        default=["float32", "exact"],
        help="g_a/h_a precisions of the encoder table (exact: version 2 only)",
    )
    parser.add_argument("--skip-decoders", action="store_true", help="only the encoder table")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)

    from model.codec import Codec

    images = [p.stem for p in sorted(KODAK_DIR.glob("kodim*.png"))[: args.images]]
    rows: dict[str, dict[int, dict]] = {} if args.skip_decoders else {d.name: {} for d in DECODERS}
    runtimes = [e for e in ENCODERS if e.name in args.encoders]
    columns = [
        (v, p)
        for v in args.versions
        for p in args.analysis_precisions
        if p != "exact" or v != FLOAT_PATH_VERSION
    ]
    encoders: dict[str, dict[str, dict]] = {e.name: {} for e in runtimes}
    with tempfile.TemporaryDirectory() as tmp:
        for version in args.versions:
            folder = Path(tmp) / f"v{version}"
            codec = Codec.from_pretrained(stream_version=version)
            reference = encode_streams(codec, folder, images, args.qualities)
            for decoder in tqdm([] if args.skip_decoders else DECODERS, desc=f"version {version}"):
                summary = compare(reference, run_decoder(folder, decoder))
                rows[decoder.name][version] = {key: len(names) for key, names in summary.items()}
        for version, precision in columns:
            # the reference: eager torch, 2 threads, then each runtime; every one in its own process
            mine = run_encoder(Path(tmp) / f"ref-v{version}-{precision}", REFERENCE, precision, version,
                               images, args.qualities)  # fmt: skip
            for runtime in tqdm(runtimes, desc=f"version {version}, g_a {precision}: encoders"):
                theirs = run_encoder(
                    Path(tmp) / f"{runtime.name}-v{version}-{precision}".replace(" ", "_").replace(",", ""),
                    runtime, precision, version, images, args.qualities,
                )  # fmt: skip
                encoders[runtime.name][column_name(version, precision)] = {
                    "same_bytes": sum(theirs[n]["bytes"] == mine[n]["bytes"] for n in mine),
                    "same_latents": sum(theirs[n]["y_hat"] == mine[n]["y_hat"] for n in mine),
                }
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
        names = [column_name(v, p) for v, p in columns]
        head = "| encoder | " + " | ".join(f"{n}: same bytes / same latents" for n in names)
        lines += ["", "Streams written by each runtime against eager torch's (2 threads):", "", head + " |"]
        lines.append("|---" * (len(names) + 1) + "|")
        for name, by_column in encoders.items():
            cells = [f"{by_column[n]['same_bytes']} / {by_column[n]['same_latents']}" for n in names]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (args.out / "portability.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
