"""Rate-distortion curves: a small common form for our results, baselines and published reference points.

Result files come in CompressAI's layout ``{"name", "description", "results": {"bpp": [...], ...}}``, with
either CompressAI's metric keys (``psnr-rgb``, ``ms-ssim-rgb``) or upstream LALIC's (``psnr``, ``ms-ssim``,
``ms-ssim-db``). A few third-party files keep the lists at the top level instead of under ``results``; those
are read too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from model.metrics import ms_ssim_db

__all__ = ["Curve", "CurveKind", "curve_from_result", "load_reference_curves"]

CurveKind = Literal["ours", "baseline", "reference"]


def _floats(values: Sequence[Any] | None) -> list[float | None] | None:
    if values is None:
        return None
    out: list[float | None] = []
    for v in values:
        out.append(float(v) if v is not None and math.isfinite(float(v)) else None)
    return out


@dataclass
class Curve:
    """One rate-distortion curve: bpp with PSNR (dB) and optionally MS-SSIM in dB, point by point."""

    label: str
    kind: CurveKind
    bpp: list[float]
    psnr: list[float | None]
    msssim_db: list[float | None] | None = None
    source: str | None = None
    notes: list[str] = field(default_factory=list)

    def points(self, metric: Literal["psnr", "msssim_db"] = "psnr") -> tuple[list[float], list[float]]:
        """(bpp, metric) of the points where the metric is known, sorted by bpp."""
        values = self.psnr if metric == "psnr" else self.msssim_db
        if values is None:
            return [], []
        pairs = sorted((r, d) for r, d in zip(self.bpp, values, strict=True) if d is not None and r > 0)
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def has(self, metric: Literal["psnr", "msssim_db"]) -> bool:
        """Whether at least two points of this curve carry the metric."""
        return len(self.points(metric)[0]) >= 2


def curve_from_result(
    data: dict[str, Any], kind: CurveKind, label: str | None = None, source: str | None = None
) -> Curve:
    """Build a :class:`Curve` from a result dict in CompressAI/upstream layout (or top-level lists)."""
    res = data.get("results", data)
    if "bpp" not in res:
        raise ValueError(f"no 'bpp' list in result {source or data.get('name')!r}")
    bpp = [float(b) for b in res["bpp"]]
    psnr = _floats(res.get("psnr-rgb", res.get("psnr")))
    if psnr is None:
        raise ValueError(f"no PSNR list in result {source or data.get('name')!r}")
    notes: list[str] = []
    db = _floats(res.get("ms-ssim-rgb-db", res.get("ms-ssim-db")))
    if db is None:
        linear = _floats(res.get("ms-ssim-rgb", res.get("ms-ssim")))
        if linear is not None:
            # Per-image dB values are not available: the dB of the mean MS-SSIM is slightly lower than
            # the mean of per-image dB values that upstream reports.
            db = [ms_ssim_db(v) if v is not None else None for v in linear]
            db = [v if v is not None and math.isfinite(v) else None for v in db]
            notes.append("MS-SSIM dB computed from the mean MS-SSIM")
    for name, values in (("psnr", psnr), ("ms-ssim dB", db)):
        if values is not None and len(values) != len(bpp):
            raise ValueError(
                f"{source or data.get('name')!r}: {len(bpp)} bpp values but {len(values)} {name}"
            )
    return Curve(
        label=label or str(data.get("name", "?")),
        kind=kind,
        bpp=bpp,
        psnr=psnr,
        msssim_db=db,
        source=source,
        notes=notes,
    )


def load_reference_curves(reference_dir: Path, dataset: str) -> list[Curve]:
    """Load the published curves of ``reference_dir`` (searched recursively) that belong to ``dataset``.

    A JSON file belongs to the dataset when one of the ``-``-separated words of its file name is the dataset
    name (``kodak-vtm91-compressai.json`` and ``official-checkpoints-kodak-reeval.json`` for ``kodak``).
    Files without rate-distortion lists are skipped. Labels are ``"<name> [<relative path>]"``.
    """
    curves: list[Curve] = []
    if not reference_dir.is_dir():
        return curves
    token = dataset.lower()
    for path in sorted(reference_dir.rglob("*.json")):
        if token not in path.stem.lower().split("-"):
            continue
        try:
            data = json.loads(path.read_text())
            rel = path.relative_to(reference_dir).with_suffix("").as_posix()
            curves.append(
                curve_from_result(
                    data, "reference", label=f"{data.get('name', rel)} [{rel}]", source=str(path)
                )
            )
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            continue
    return curves
