"""The model's subcommands of the ``lalic`` command line (:mod:`lalic.cli`): compress, decompress,
info, train, eval, import and export.

The decoder picks nothing from flags: model and quality come from the bitstream's header (a
stream made by other weights is refused with an error naming both).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.metrics import bits_per_pixel

if TYPE_CHECKING:
    from model.codec import Codec
    from model.codecset import CodecSet


def _codec(args: argparse.Namespace) -> Codec | CodecSet:
    from model.codecset import load_codec

    precision = {args.precision_of: args.precision} if getattr(args, "precision_of", None) else {}
    return load_codec(args.weights, device=args.device, **precision)


def cmd_compress(args: argparse.Namespace) -> int:
    from model.image import load_image

    image = load_image(args.input)
    codec = _codec(args)
    start = time.perf_counter()
    data = codec.compress(image, args.quality, refine_steps=args.refine_steps, orientations=args.orientations)
    elapsed = time.perf_counter() - start
    Path(args.output).write_bytes(data)
    h, w = image.shape[:2]
    print(
        f"{args.output}: {len(data)} bytes, {bits_per_pixel(len(data), h, w):.4f} bpp, {w}x{h}, "
        f"quality {args.quality:g}, {elapsed:.2f} s"
    )
    return 0


def cmd_decompress(args: argparse.Namespace) -> int:
    from model.image import save_image

    data = Path(args.input).read_bytes()
    codec = _codec(args)
    start = time.perf_counter()
    image = codec.decompress(data)
    elapsed = time.perf_counter() - start
    save_image(image, args.output)
    print(f"{args.output}: {image.shape[1]}x{image.shape[0]}, {elapsed:.2f} s")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from model.bitstream import unpack

    data = Path(args.input).read_bytes()
    header, streams = unpack(data)
    info = {
        "model_id": header.model_id,
        "weights_digest": header.weights_digest.hex(),
        "quality": header.quality,
        "height": header.height,
        "width": header.width,
        "y_shape": list(header.y_shape),
        "z_shape": list(header.z_shape),
        "tiling": list(header.tiling),
        "orientation": header.orientation,
        "symbol_crc32": f"{header.symbol_crc32:08x}",
        "stream_bytes": [len(s) for s in streams],
        "total_bytes": len(data),
        "bpp": bits_per_pixel(len(data), header.height, header.width),
    }
    print(json.dumps(info, indent=2))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the model's subcommands on the ``lalic`` parser's subcommands."""
    from model.evaluate import add_eval_arguments, add_orientations_argument, non_negative_int, run_eval
    from model.stages import ANALYSIS_PRECISIONS, PRECISIONS
    from model.train import add_train_arguments, run_train

    def codec_options(p: argparse.ArgumentParser, transform: str | None = None) -> None:
        p.add_argument("--weights", help="weight file (default: the shipped lalic-s weights)")
        p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
        if transform is None:
            return
        what = {
            "analysis": "g_a in bfloat16 moves the latents coded (valid streams for every decoder), "
            "faster on CPUs with AVX512-BF16, within 0.02 dB PSNR on Kodak (BENCHMARKS.md); exact "
            "runs g_a and h_a in the entropy path's reproducible arithmetic, so that every machine "
            "and backend writes the same bytes (slower)",
            "synthesis": "g_s in bfloat16 moves decoded pixels, never the latents; faster on CPUs "
            "with AVX512-BF16, within 0.02 dB PSNR on Kodak (BENCHMARKS.md)",
        }[transform]
        p.add_argument(
            "--precision",
            choices=ANALYSIS_PRECISIONS if transform == "analysis" else PRECISIONS,
            default="float32",
            help=f"precision of {transform} (default float32): {what}",
        )
        p.set_defaults(precision_of=f"{transform}_precision")

    p = sub.add_parser("compress", help="image file -> .lalic bitstream")
    p.add_argument("input", help="image (PNG, JPEG, WebP, AVIF, TIFF, BMP, ...)")
    p.add_argument("output", help="bitstream file to write")
    p.add_argument(
        "--quality",
        "-q",
        type=float,
        default=3.0,
        help="quality in [1, 6]; fractional values interpolate (default 3)",
    )
    p.add_argument(
        "--refine-steps",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="optimise the latents for N steps before coding: about 2 %% fewer bits at equal "
        "PSNR for 25 steps, about 1.3 s per step for a 768x512 image on 2 cores; any decoder "
        "reads the result (default 0: off)",
    )
    add_orientations_argument(p)
    codec_options(p, "analysis")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("decompress", help=".lalic bitstream -> image file")
    p.add_argument("input", help="bitstream file")
    p.add_argument("output", help="image to write; the format follows the suffix (.png, .webp, ...)")
    codec_options(p, "synthesis")
    p.set_defaults(func=cmd_decompress)

    p = sub.add_parser("info", help="print a bitstream's header as JSON")
    p.add_argument("input", help="bitstream file")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("train", help="train a LALIC model (see lalic train --help)")
    add_train_arguments(p)
    p.set_defaults(func=run_train)

    p = sub.add_parser("eval", help="rate-distortion evaluation with baselines, BD-rates and plots")
    add_eval_arguments(p)
    p.set_defaults(func=run_eval)

    from model.official import add_import_arguments, run_import

    p = sub.add_parser("import", help="import the official LALIC checkpoints into one weight file")
    add_import_arguments(p)
    p.set_defaults(func=run_import)

    p = sub.add_parser("export", help="export the networks to TorchScript / ONNX")
    add_export_arguments(p)
    p.set_defaults(func=run_export)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lalic export``."""
    parser.description = (
        "Export LALIC's networks (g_a with gain, h_a, h_s, context and parameter networks, g_s with "
        "inverse gain) to TorchScript or ONNX with dynamic batch, height and width. Entropy coding "
        "stays in Python; load the result with Codec(..., backend=..., export_dir=DIR/FORMAT). A weight "
        "set (lalic import) gets one folder per network, DIR/FORMAT/LABEL; load_codec(set, backend=..., "
        "export_dir=DIR/FORMAT) finds them."
    )
    parser.add_argument("--weights", help="weight file or weight set (default: the shipped lalic-s weights)")
    parser.add_argument("--random", metavar="CONFIG", help="export randomly initialised weights of CONFIG")
    parser.add_argument("--format", choices=["onnx", "torchscript", "all"], default="all")
    parser.add_argument("--output", "-o", default="export", help="output directory (default: ./export)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="round-trip a test image through each exported backend afterwards",
    )


def _check_against_eager(eager: Codec, exported: Codec) -> str:
    """Round-trip a test image through ``exported`` and compare with the eager codec."""
    from model.bitstream import BitstreamError

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:128] / 128
    base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1) * 80 + 128
    image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    data = exported.compress(image, 3.0)
    own = exported.decompress(data)
    same_stream = data == eager.compress(image, 3.0)
    try:
        diff = int(np.abs(eager.decompress(data).astype(int) - own.astype(int)).max())
        decoded = (
            "eager decodes it to the same pixels"
            if diff == 0
            else (f"eager decodes it within {diff} level(s)")
        )
    except BitstreamError:
        decoded = "eager refuses it (entropy parameters differ: BitstreamError)"
    stream = "same stream as eager" if same_stream else "stream differs from eager"
    return f"{len(data)} bytes, {stream}, {decoded}"


def run_export(args: argparse.Namespace) -> int:
    """``lalic export``: write the stages and a manifest per format; optionally check them."""
    from model.codec import Codec
    from model.export import export_stages, read_manifest
    from model.zoo import WeightSet, load_network

    formats: Sequence[str] = ("onnx", "torchscript") if args.format == "all" else (args.format,)
    out = Path(args.output)
    networks: list[tuple[str | None, Codec]]  # (folder within the format's folder, codec)
    if args.random:
        networks = [(None, Codec.random(args.random, seed=0))]
    else:
        loaded = load_network(args.weights)
        if isinstance(loaded, WeightSet):  # one folder per network, as CodecSet(export_dir=...) reads
            networks = [(m.label, Codec(loaded.network(m.quality))) for m in loaded.members]
        else:
            networks = [(None, Codec(loaded))]
    for fmt in formats:
        for folder, codec in networks:
            start = time.perf_counter()
            target = out / fmt / folder if folder else out / fmt
            export_stages(
                codec.net,
                target,
                fmt,
                codec.weights_digest,
                progress=lambda name, fmt=fmt: print(f"  {fmt}: {name}", flush=True),
            )
            size = sum(p.stat().st_size for p in target.iterdir())
            print(
                f"{target}: {len(read_manifest(target)['stages'])} stages, {size / 1e6:.1f} MB, "
                f"{time.perf_counter() - start:.0f} s"
            )
            if args.check:
                backend = "onnxruntime" if fmt == "onnx" else "torchscript"
                exported = Codec(codec.net, backend=backend, export_dir=str(target))
                print(f"  check {backend}: {_check_against_eager(codec, exported)}")
    return 0
