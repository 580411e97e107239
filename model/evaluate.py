"""``lalic eval``: rate-distortion evaluation of our codec against classical baselines and published curves.

For a folder of images and a set of qualities, every image is compressed to a real bitstream and decoded
back; bpp is counted from the bitstream's length over the original pixels, PSNR and MS-SSIM are measured on
the decoded 8-bit RGB image, and encoding and decoding are timed (wall clock, one untimed warm-up round trip
first). The same harness runs the Pillow baselines of :mod:`model.baselines`.

Outputs written to ``--out``:

* ``<dataset>-ours.json`` and ``<dataset>-<baseline>.json``: CompressAI's result layout
  ``{"name", "description", "results": {"bpp", "psnr-rgb", "ms-ssim-rgb", "encoding_time",
  "decoding_time", ...}}`` (means over images; upstream LALIC's keys ``psnr``, ``ms-ssim`` and ``ms-ssim-db``
  are written too, so the files read like the reference files), plus ``settings``, ``per_image`` (one record
  per image and setting) and ``meta`` (images with pixel hashes, encoder options, library versions).
* ``bd-rate.json`` and ``bd-rate.md``: BD-rates (PCHIP and cubic fits, PSNR; PCHIP on MS-SSIM dB) of our
  codec against every baseline and reference curve, over the overlapping quality range only.
* ``rd-<dataset>.png``: PSNR and MS-SSIM (dB) against bpp for all curves.
* ``eval.json``: an index of the above, including baselines that were unavailable and why.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from model import metrics
from model.baselines import BASELINES, BaselineUnavailableError, get_baseline
from model.bdrate import NoOverlapError, bd_rate, overlap_interval
from model.bitstream import ORIENTATIONS
from model.paths import KODAK_DIR, OFFICIAL_REFERENCE_DIR, REPO_ROOT
from model.plot import plot_rd
from model.rdcurves import Curve, curve_from_result, load_reference_curves

__all__ = [
    "CodecLike",
    "add_eval_arguments",
    "bd_rate",
    "bd_rate_table",
    "evaluate_baseline",
    "evaluate_codec",
    "list_images",
    "run_eval",
]

DEFAULT_IMAGES = os.path.relpath(KODAK_DIR, REPO_ROOT)
DEFAULT_REFERENCE_DIR = os.path.relpath(OFFICIAL_REFERENCE_DIR, REPO_ROOT)
DEFAULT_OUT = "bench/results/eval-{dataset}"
DEFAULT_BASELINE_CACHE = "bench/results/{dataset}-baselines"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp"}


class CodecLike(Protocol):
    """What :func:`evaluate_codec` needs from a codec: real bitstreams in and out."""

    model_id: str

    def compress(self, image: np.ndarray, quality: Any) -> bytes: ...

    def decompress(self, data: bytes) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------------------
# Images


def list_images(folder: Path, limit: int | None = None) -> list[Path]:
    """Image files of ``folder`` (not recursive), sorted by name, at most ``limit`` of them."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return paths[:limit] if limit is not None else paths


def _load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def _image_info(name: str, pixels: np.ndarray) -> dict[str, Any]:
    return {
        "name": name,
        "width": int(pixels.shape[1]),
        "height": int(pixels.shape[0]),
        "sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
    }


# --------------------------------------------------------------------------------------------------------
# The evaluation harness


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return float(np.mean(vals))


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _run_curve(
    encode: Callable[[np.ndarray, Any], bytes],
    decode: Callable[[bytes], np.ndarray],
    images: Sequence[Path],
    settings: Sequence[Any],
    *,
    name: str,
    description: str,
    setting_name: str,
    progress: bool,
    warmup: bool = True,
) -> dict[str, Any]:
    """Round-trip every image at every setting; return the result dict in CompressAI's layout."""
    loaded = [(p.name, _load_rgb(p)) for p in images]
    if not loaded:
        raise ValueError("no images to evaluate")
    if not settings:
        raise ValueError("no quality settings to evaluate")
    if warmup:  # one-time costs (lazy model set-up, plugin loading) are not part of the timings
        decode(encode(loaded[0][1], settings[0]))

    records: list[dict[str, Any]] = []
    bar = tqdm(
        total=len(settings) * len(loaded), desc=name, unit="img", disable=not progress, file=sys.stderr
    )
    for setting in settings:
        for img_name, original in loaded:
            t0 = time.perf_counter()
            data = encode(original, setting)
            t1 = time.perf_counter()
            decoded = decode(data)
            t2 = time.perf_counter()
            if not isinstance(data, bytes | bytearray):
                raise TypeError(f"{name}: encoder returned {type(data).__name__}, expected bytes")
            decoded = np.asarray(decoded)
            if decoded.shape != original.shape or decoded.dtype != np.uint8:
                raise ValueError(
                    f"{name}: decoding {img_name} at {setting_name}={setting} gave {decoded.shape} "
                    f"{decoded.dtype}, expected {original.shape} uint8"
                )
            h, w = original.shape[:2]
            try:
                msssim: float | None = metrics.ms_ssim(original, decoded)
            except ValueError:  # image too small for five scales
                msssim = None
            records.append(
                {
                    "image": img_name,
                    setting_name: setting,
                    "bytes": len(data),
                    "bpp": metrics.bits_per_pixel(len(data), h, w),
                    "psnr-rgb": _finite_or_none(metrics.psnr(original, decoded)),
                    "ms-ssim-rgb": msssim,
                    "ms-ssim-rgb-db": _finite_or_none(metrics.ms_ssim_db(msssim))
                    if msssim is not None
                    else None,
                    "encoding_time": t1 - t0,
                    "decoding_time": t2 - t1,
                }
            )
            bar.update(1)
    bar.close()

    keys = ("bpp", "psnr-rgb", "ms-ssim-rgb", "ms-ssim-rgb-db", "encoding_time", "decoding_time")
    means: dict[str, list[float | None]] = {k: [] for k in keys}
    for setting in settings:
        group = [r for r in records if r[setting_name] == setting]
        for k in keys:
            means[k].append(_mean([r[k] for r in group]))
    results: dict[str, Any] = {
        "bpp": means["bpp"],
        "psnr-rgb": means["psnr-rgb"],
        "ms-ssim-rgb": means["ms-ssim-rgb"],
        "encoding_time": means["encoding_time"],
        "decoding_time": means["decoding_time"],
        # upstream LALIC's key names (see shared/reference/lalic-official), same values
        "psnr": means["psnr-rgb"],
        "ms-ssim": means["ms-ssim-rgb"],
        "ms-ssim-db": means["ms-ssim-rgb-db"],
    }
    return {
        "name": name,
        "description": f"{description}, {setting_name}: {[str(s) for s in settings]}",
        "results": results,
        "settings": {"name": setting_name, "values": list(settings)},
        "per_image": records,
        "meta": {
            "images": [_image_info(n, a) for n, a in loaded],
            "num_images": len(loaded),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "metrics": "means over images; PSNR over RGB of the 8-bit images; MS-SSIM 5-scale on [0, 255] "
            "(pytorch-msssim), dB = mean over images of -10 log10(1 - MS-SSIM); times in seconds per image, "
            "after one untimed warm-up round trip",
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }


def evaluate_codec(
    codec: CodecLike,
    images: list[Path],
    qualities: list[float],
    progress: bool = True,
    refine_steps: int = 0,
    orientations: Sequence[int] = (0,),
) -> dict:
    """Evaluate our codec on real bitstreams: ``codec.compress(uint8 HxWx3, quality) -> bytes`` and back.

    ``refine_steps > 0`` encodes with latent refinement (``codec.compress(..., refine_steps=N)``,
    :mod:`model.refine`); ``orientations`` other than ``(0,)`` let the encoder pick the cheapest of
    these flips (``codec.compress(..., orientations=...)``). Returns CompressAI's result layout
    (means per quality under ``results``) plus ``per_image`` and ``meta``.
    """
    model_id = str(getattr(codec, "model_id", type(codec).__name__))
    compress = codec.compress
    label = model_id
    options: dict[str, Any] = {}
    notes = []
    if refine_steps:
        options["refine_steps"] = refine_steps
        notes.append(f"{refine_steps} refinement steps")
    if tuple(orientations) != (0,):
        options["orientations"] = tuple(orientations)
        notes.append(f"best of orientations {','.join(map(str, orientations))}")
    if options:
        compress = lambda image, q: codec.compress(image, q, **options)  # noqa: E731
        label = ", ".join([model_id, *notes])
    result = _run_curve(
        compress,
        codec.decompress,
        images,
        list(qualities),
        name=f"LALIC (ours, {label})",
        description=f"LALIC (ours), model: {label}, real bitstreams",
        setting_name="quality",
        progress=progress,
    )
    result["meta"]["model_id"] = model_id
    result["meta"]["refine_steps"] = refine_steps
    result["meta"]["orientations"] = list(orientations)
    try:
        import torch

        result["meta"]["torch"] = torch.__version__
        result["meta"]["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a hard dependency of the project
        pass
    return result


def evaluate_baseline(
    name: str, images: list[Path], settings: Sequence[int] | None = None, progress: bool = False
) -> dict:
    """Evaluate the classical codec ``name`` of :data:`model.baselines.BASELINES` at ``settings``.

    ``settings`` are the codec's quality values (``None``: the baseline's default sweep). Raises
    :class:`model.baselines.BaselineUnavailableError` when its plugin or encoder is missing.
    """
    baseline = get_baseline(name)
    reason = baseline.unavailable_reason()
    if reason:
        raise BaselineUnavailableError(f"{name}: {reason}")
    values = list(settings) if settings is not None else list(baseline.default_settings)
    result = _run_curve(
        baseline.encode,
        baseline.decode,
        images,
        values,
        name=baseline.label,
        description=baseline.description(),
        setting_name=baseline.setting_name,
        progress=progress,
    )
    result["meta"].update({"baseline": name, "options": baseline.options, "versions": baseline.versions()})
    return result


# --------------------------------------------------------------------------------------------------------
# BD-rate table


def _bd(test: Curve, anchor: Curve, metric: str, method: str) -> tuple[float | None, str | None]:
    rt, dt = test.points(metric)  # type: ignore[arg-type]
    ra, da = anchor.points(metric)  # type: ignore[arg-type]
    for which, points in (("test", rt), ("anchor", ra)):
        if not points:
            return None, f"no values in the {which} curve"
        if len(points) < 2:
            return None, f"fewer than 2 points in the {which} curve"
    try:
        return bd_rate(rt, dt, ra, da, method=method), None  # type: ignore[arg-type]
    except NoOverlapError:
        return None, "no overlap"
    except ValueError as exc:
        return None, str(exc)


def bd_rate_table(
    tests: Sequence[Curve], anchors: Sequence[Curve], unavailable: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """BD-rate rows of every test curve against every anchor curve (skipping a curve against itself).

    Each row holds ``bd_psnr_pchip``, ``bd_psnr_cubic`` and ``bd_msssim_db_pchip`` in percent (``None`` with a
    note when not computable), and the PSNR interval the BD-rate was averaged over. Unavailable baselines
    get a row that says so.
    """
    rows: list[dict[str, Any]] = []
    for test in tests:
        for anchor in anchors:
            if anchor is test:
                continue
            row: dict[str, Any] = {"test": test.label, "anchor": anchor.label, "anchor_kind": anchor.kind}
            notes: list[str] = []
            for key, metric, method in (
                ("bd_psnr_pchip", "psnr", "pchip"),
                ("bd_psnr_cubic", "psnr", "cubic"),
                ("bd_msssim_db_pchip", "msssim_db", "pchip"),
            ):
                value, note = _bd(test, anchor, metric, method)
                row[key] = value
                if note and f"{metric}: {note}" not in notes:
                    notes.append(f"{metric}: {note}")
            dt, da = test.points("psnr")[1], anchor.points("psnr")[1]
            interval = overlap_interval(dt, da) if dt and da else None
            row["psnr_overlap_db"] = list(interval) if interval else None
            n_min = min(len(dt), len(da))
            if 2 <= n_min < 4:
                notes.append(f"cubic fit of degree {n_min - 1} ({n_min} points)")
            row["notes"] = notes
            rows.append(row)
        for name, reason in (unavailable or {}).items():
            rows.append(
                {
                    "test": test.label,
                    "anchor": name,
                    "anchor_kind": "baseline",
                    "bd_psnr_pchip": None,
                    "bd_psnr_cubic": None,
                    "bd_msssim_db_pchip": None,
                    "psnr_overlap_db": None,
                    "notes": [f"unavailable: {reason}"],
                }
            )
    return rows


def _fmt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f} %"


def bd_table_markdown(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """Render BD-rate rows as a markdown table (negative = the test curve needs fewer bits)."""
    lines = [f"## {title}", ""] if title else []
    if not rows:
        return "\n".join([*lines, "No BD-rate computed: no test curve or no anchor curve.", ""])
    lines += [
        "BD-rate of the test curve against each anchor; negative = fewer bits at equal quality. "
        "Averaged over the overlapping quality range only.",
        "",
        "| test | anchor | BD-rate PSNR (PCHIP) | BD-rate PSNR (cubic) | BD-rate MS-SSIM dB (PCHIP) "
        "| PSNR overlap [dB] | notes |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        ov = r.get("psnr_overlap_db")
        ov_s = f"{ov[0]:.2f}-{ov[1]:.2f}" if ov else "none"
        cells = [
            r["test"],
            r["anchor"],
            _fmt_pct(r["bd_psnr_pchip"]),
            _fmt_pct(r["bd_psnr_cubic"]),
            _fmt_pct(r["bd_msssim_db_pchip"]),
            ov_s,
            "; ".join(r.get("notes", [])),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# Files


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented, strict JSON (non-finite floats become ``null``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")
    return path


def _load_cached_baseline(
    cache_dir: Path | None, dataset: str, name: str, images: list[dict[str, Any]], settings: list[int]
) -> dict | None:
    """A cached baseline result computed on exactly these images, settings and encoder options, or None."""
    if cache_dir is None:
        return None
    path = cache_dir / f"{dataset}-{name}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        meta = data["meta"]
        same = (
            meta["images"] == images
            and data["settings"]["values"] == settings
            and meta.get("options") == json.loads(json.dumps(BASELINES[name].options))
        )
    except (KeyError, TypeError, ValueError):
        return None
    return data if same else None


# --------------------------------------------------------------------------------------------------------
# Command line


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def add_orientations_argument(parser: argparse.ArgumentParser) -> None:
    """``--orientations``: the flips the encoder tries (:data:`model.bitstream.ORIENTATIONS`)."""
    parser.add_argument(
        "--orientations",
        type=int,
        nargs="+",
        choices=ORIENTATIONS,
        default=[0],
        metavar="O",
        help="flips to code the image in, keeping the stream of lowest rate-distortion cost: 0 as is, "
        "1 mirrored left-right, 2 flipped top-bottom, 3 both; the decoder turns the image back. "
        "'--orientations 0 1 2 3' saves about 1 %% of the bits on Kodak for four encodes and four "
        "decodes (default: 0)",
    )


def _setting_override(text: str) -> tuple[str, list[int]]:
    name, _, values = text.partition("=")
    if name not in BASELINES or not values:
        raise argparse.ArgumentTypeError(f"expected NAME=Q1,Q2,... with NAME in {', '.join(BASELINES)}")
    try:
        return name, [int(v) for v in values.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"quality values must be integers: {values!r}") from None


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``lalic eval`` to ``parser`` (defaults relative to the repo, given paths to CWD)."""
    parser.add_argument(
        "--images",
        default=DEFAULT_IMAGES,
        metavar="DIR",
        help=f"folder of images to evaluate (default: {DEFAULT_IMAGES}, relative to the repo)",
    )
    parser.add_argument(
        "--qualities",
        nargs="+",
        type=_number,
        default=[1, 2, 3, 4, 5, 6],
        metavar="Q",
        help="qualities of our codec (default: 1 2 3 4 5 6)",
    )
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N images")
    parser.add_argument(
        "--weights", default=None, metavar="PATH", help="weights of our codec (default: the shipped weights)"
    )
    parser.add_argument("--device", default=None, help="device for our codec (e.g. cpu, cuda)")
    parser.add_argument(
        "--refine-steps",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="encode with N steps of latent refinement (model.refine; about 1.3 s per step for a "
        "768x512 image on 2 cores; default 0: none)",
    )
    add_orientations_argument(parser)
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"output folder (default: {DEFAULT_OUT}, relative to the repo)",
    )
    parser.add_argument(
        "--baselines",
        nargs="+",
        choices=list(BASELINES),
        default=list(BASELINES),
        metavar="NAME",
        help=f"classical baselines to run (default: all of {' '.join(BASELINES)})",
    )
    parser.add_argument(
        "--baseline-settings",
        type=_setting_override,
        action="append",
        default=[],
        metavar="NAME=Q1,Q2,...",
        help="override the quality sweep of one baseline (repeatable)",
    )
    parser.add_argument("--no-baselines", action="store_true", help="run no classical baseline")
    parser.add_argument(
        "--no-ours", action="store_true", help="do not run our codec (baselines/references only)"
    )
    parser.add_argument(
        "--baseline-cache",
        default=DEFAULT_BASELINE_CACHE,
        metavar="DIR",
        help="reuse baseline results found here when computed on the same images, settings and "
        f"encoder options (default: {DEFAULT_BASELINE_CACHE}, relative to the repo; "
        "'' disables it)",
    )
    parser.add_argument(
        "--reference-dir",
        default=DEFAULT_REFERENCE_DIR,
        metavar="DIR",
        help="published result JSONs to add as curves; files whose name contains the dataset "
        f"name are used (default: {DEFAULT_REFERENCE_DIR}, relative to the repo)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _display_path(path: Path | str | None) -> str | None:
    """A path for result files: relative to the repository when it is beside it (``../shared/...``)."""
    if path is None:
        return None
    path = Path(path).resolve()
    if path.is_relative_to(REPO_ROOT.parent):
        return os.path.relpath(path, REPO_ROOT)
    return str(path)


def _resolve(path_text: str, dataset: str | None = None) -> Path:
    """Resolve a path option: the built-in defaults relative to the repository, user paths to the CWD.

    ``{dataset}`` in the text is replaced by the dataset name.
    """
    builtin = path_text in (DEFAULT_IMAGES, DEFAULT_REFERENCE_DIR, DEFAULT_OUT, DEFAULT_BASELINE_CACHE)
    text = path_text.format(dataset=dataset) if dataset is not None else path_text
    path = Path(text).expanduser()
    if path.is_absolute():
        return path
    return ((REPO_ROOT if builtin else Path.cwd()) / path).resolve()


def _load_codec(args: argparse.Namespace) -> CodecLike:
    """The codec of ``--weights`` (one network or a weight set) on ``--device``."""
    from model.codecset import load_codec  # imported lazily: the evaluation of baselines needs no model

    return load_codec(args.weights, **({} if args.device is None else {"device": args.device}))


@dataclass
class BaselineRuns:
    """The baselines' curves of one evaluation, and which were unavailable or reused from the cache."""

    curves: list[Curve] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)


def evaluate_ours(
    args: argparse.Namespace, codec: CodecLike | None, images: list[Path], out_dir: Path, dataset: str
) -> Curve:
    """Our codec's curve (real bitstreams), written to ``<dataset>-ours.json``."""
    result = evaluate_codec(
        codec if codec is not None else _load_codec(args),
        images,
        list(args.qualities),
        progress=not getattr(args, "no_progress", False),
        refine_steps=getattr(args, "refine_steps", 0),
        orientations=getattr(args, "orientations", (0,)),
    )
    path = write_json(out_dir / f"{dataset}-ours.json", result)
    return curve_from_result(result, "ours", source=str(path))


def evaluate_baselines(
    args: argparse.Namespace, images: list[Path], out_dir: Path, dataset: str, cache_dir: Path | None
) -> BaselineRuns:
    """Every available baseline's curve, each written to ``<dataset>-<name>.json``; results in
    ``cache_dir`` for the same images and settings are reused instead of coding again."""
    runs = BaselineRuns()
    overrides = dict(getattr(args, "baseline_settings", []) or [])
    image_infos = [_image_info(p.name, _load_rgb(p)) for p in images] if cache_dir else []
    for name in args.baselines:
        baseline = get_baseline(name)
        reason = baseline.unavailable_reason()
        if reason:
            runs.unavailable[name] = reason
            print(f"warning: baseline {name} unavailable: {reason}", file=sys.stderr)
            continue
        settings = overrides.get(name, list(baseline.default_settings))
        result = _load_cached_baseline(cache_dir, dataset, name, image_infos, settings)
        if result is not None:
            runs.reused.append(name)
        else:
            progress = not getattr(args, "no_progress", False)
            result = evaluate_baseline(name, images, settings, progress=progress)
        path = write_json(out_dir / f"{dataset}-{name}.json", result)
        curve = curve_from_result(result, "baseline", source=str(path))
        runs.curves.append(curve)
        runs.files[curve.label] = path.name
    return runs


def bd_rate_rows(
    curves: list[Curve], ours: Curve | None, references: list[Curve], unavailable: dict[str, str]
) -> list[dict]:
    """BD-rate rows of our curve against every other one; without ours, of each baseline against
    the VTM references (unavailable baselines are then not listed)."""
    if ours is not None:
        return bd_rate_table([ours], [c for c in curves if c is not ours], unavailable)
    baselines = [c for c in curves if c.kind == "baseline"]
    vtm = [c for c in references if c.label.upper().startswith("VTM")]
    return bd_rate_table(baselines, vtm, {})


def run_eval(args: argparse.Namespace, codec: CodecLike | None = None) -> int:
    """Run ``lalic eval`` with parsed ``args``; ``codec`` replaces the one loaded from ``--weights``.

    Returns the process exit status (0 on success, 2 when there is nothing to evaluate).
    """
    images_dir = _resolve(args.images)
    dataset = images_dir.name.lower()
    try:
        images = list_images(images_dir, args.limit)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not images:
        print(f"error: no images in {images_dir}", file=sys.stderr)
        return 2
    out_dir = _resolve(args.out or DEFAULT_OUT, dataset)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_text = getattr(args, "baseline_cache", "")
    cache_dir = _resolve(cache_text, dataset) if cache_text else None
    print(f"Evaluating on {len(images)} image(s) of {images_dir} -> {out_dir}", file=sys.stderr)

    ours = None if args.no_ours else evaluate_ours(args, codec, images, out_dir, dataset)
    curves = [ours] if ours is not None else []
    files = {ours.label: Path(ours.source).name} if ours is not None else {}
    baselines = BaselineRuns()
    if not args.no_baselines:
        baselines = evaluate_baselines(args, images, out_dir, dataset, cache_dir)
    curves += baselines.curves
    files |= baselines.files
    references = load_reference_curves(_resolve(args.reference_dir), dataset) if args.reference_dir else []
    curves += references

    title = f"BD-rate on {dataset} ({len(images)} images)"
    rows = bd_rate_rows(curves, ours, references, baselines.unavailable)
    markdown = bd_table_markdown(rows, title)
    if baselines.unavailable:
        unavailable = "; ".join(f"{k} ({v})" for k, v in baselines.unavailable.items())
        markdown += f"\nUnavailable baselines: {unavailable}\n"
    write_json(out_dir / "bd-rate.json", {"dataset": dataset, "num_images": len(images), "rows": rows})
    (out_dir / "bd-rate.md").write_text(markdown)
    print(markdown)

    plot_path = plot_rd(curves, out_dir / f"rd-{dataset}.png", title=f"{dataset}, {len(images)} images")
    write_json(
        out_dir / "eval.json",
        {
            "dataset": dataset,
            "images_dir": _display_path(images_dir),
            "images": [p.name for p in images],
            "curves": {
                c.label: {"kind": c.kind, "file": files.get(c.label, _display_path(c.source))} for c in curves
            },
            "baselines_unavailable": baselines.unavailable,
            "baselines_reused_from_cache": {"dir": _display_path(cache_dir), "names": baselines.reused},
            "bd_rate": {"json": "bd-rate.json", "markdown": "bd-rate.md"},
            "plot": plot_path.name,
        },
    )
    print(f"Wrote results, BD-rate table and {plot_path.name} to {out_dir}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m model.evaluate [options]``."""
    parser = argparse.ArgumentParser(prog="lalic eval", description=__doc__.split("\n\n")[0])
    add_eval_arguments(parser)
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
