"""Classical image codecs used as rate-distortion baselines, all driven through Pillow and its plugins.

Each baseline encodes an 8-bit RGB array to a complete, standalone file (container and headers included,
no metadata copied from the source) and decodes it back with Pillow. The quality settings of each codec are
chosen to span roughly 0.1-1.5 bpp on Kodak (JPEG and JPEG XL cannot go much below 0.15 bpp) and to reach
past 38 dB PSNR, so that the PSNR range of a learned codec's curve overlaps every baseline.

Baselines and their plugins:

* ``jpeg``: libjpeg-turbo (Pillow), ``optimize=True`` (optimised Huffman tables), 4:2:0.
* ``webp``: libwebp (Pillow), lossy, ``method=6`` (slowest, best).
* ``avif444`` / ``avif420``: libavif with the libaom encoder (Pillow >= 11.3 built-in AVIF), speed 4, one
  thread, 4:4:4 or 4:2:0 chroma.
* ``jxl``: libjxl through ``pillow-jxl-plugin``, effort 7 (the libjxl default).
* ``heic``: libheif with the x265 HEVC encoder through ``pillow-heif``, 4:2:0 (x265's default).

A baseline whose plugin or encoder is missing reports why through :meth:`Baseline.unavailable_reason`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, features

__all__ = ["BASELINES", "Baseline", "BaselineUnavailableError", "get_baseline"]


class BaselineUnavailableError(RuntimeError):
    """The codec of a baseline cannot be used on this machine (missing plugin or encoder)."""


def _pkg_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def _check_pillow_feature(feature: str) -> str | None:
    if not features.check(feature):
        return f"Pillow {Image.__version__} was built without {feature} support"
    return None


@functools.cache
def _check_avif_aom() -> str | None:
    reason = _check_pillow_feature("avif")
    if reason:
        return reason
    from PIL import AvifImagePlugin

    if not AvifImagePlugin._avif.encoder_codec_available("aom"):
        return "Pillow's libavif has no libaom encoder"
    return None


@functools.cache
def _check_jxl() -> str | None:
    try:
        importlib.import_module("pillow_jxl")  # registers the JXL plugin with Pillow
    except ImportError as exc:
        return f"pillow-jxl-plugin is not installed ({exc})"
    return None


@functools.cache
def _check_heic() -> str | None:
    try:
        pillow_heif = importlib.import_module("pillow_heif")
    except ImportError as exc:
        return f"pillow-heif is not installed ({exc})"
    info = pillow_heif.libheif_info()
    if not info.get("HEIF"):
        return f"libheif {info.get('libheif')} has no HEVC encoder"
    pillow_heif.register_heif_opener()
    return None


def _versions_jpeg() -> dict[str, str | None]:
    return {"pillow": Image.__version__, "libjpeg-turbo": features.version("libjpeg_turbo")}


def _versions_webp() -> dict[str, str | None]:
    return {"pillow": Image.__version__, "libwebp": features.version("webp")}


def _versions_avif() -> dict[str, str | None]:
    from PIL import AvifImagePlugin

    return {
        "pillow": Image.__version__,
        "libavif": features.version("avif"),
        "codecs": AvifImagePlugin._avif.codec_versions(),
    }


def _versions_jxl() -> dict[str, str | None]:
    return {"pillow": Image.__version__, "pillow-jxl-plugin": _pkg_version("pillow-jxl-plugin")}


def _versions_heic() -> dict[str, str | None]:
    import pillow_heif

    info = pillow_heif.libheif_info()
    return {
        "pillow": Image.__version__,
        "pillow-heif": _pkg_version("pillow-heif"),
        "libheif": info.get("libheif"),
        "encoder": info.get("HEIF"),
    }


@dataclass(frozen=True)
class Baseline:
    """A classical codec run through Pillow: format name, fixed encoder options and a quality sweep."""

    name: str
    label: str
    pillow_format: str
    default_settings: tuple[int, ...]
    options: dict[str, Any] = field(default_factory=dict)
    setting_name: str = "quality"
    _check: Callable[[], str | None] = field(default=lambda: None, repr=False, compare=False)
    _versions: Callable[[], dict[str, Any]] = field(default=dict, repr=False, compare=False)

    def unavailable_reason(self) -> str | None:
        """``None`` when the codec can be used, else a sentence saying what is missing."""
        return self._check()

    @property
    def available(self) -> bool:
        """Whether the plugin and encoder of this baseline can be used here."""
        return self.unavailable_reason() is None

    def versions(self) -> dict[str, Any]:
        """Versions of Pillow, the plugin and the codec library, for the result's metadata."""
        return self._versions()

    def encode(self, image: np.ndarray, setting: int) -> bytes:
        """Encode an 8-bit H x W x 3 RGB array at one quality setting into a complete file."""
        reason = self.unavailable_reason()
        if reason:
            raise BaselineUnavailableError(f"{self.name}: {reason}")
        buf = io.BytesIO()
        Image.fromarray(image, mode="RGB").save(
            buf, format=self.pillow_format, **{self.setting_name: setting}, **self.options
        )
        return buf.getvalue()

    def decode(self, data: bytes) -> np.ndarray:
        """Decode a file produced by :meth:`encode` back to an 8-bit H x W x 3 RGB array."""
        reason = self.unavailable_reason()  # also registers the plugin's decoder with Pillow
        if reason:
            raise BaselineUnavailableError(f"{self.name}: {reason}")
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))

    def description(self) -> str:
        """One line for the result JSON: label and fixed encoder options (the sweep is appended)."""
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.label} via Pillow {Image.__version__} ({opts})"


BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in (
        Baseline(
            name="jpeg",
            label="JPEG (libjpeg-turbo, 4:2:0, optimize)",
            pillow_format="JPEG",
            default_settings=(5, 10, 15, 25, 35, 50, 65, 75, 85, 90),
            options={"optimize": True, "subsampling": "4:2:0"},
            _check=lambda: _check_pillow_feature("jpg"),
            _versions=_versions_jpeg,
        ),
        Baseline(
            name="webp",
            label="WebP (libwebp, method 6)",
            pillow_format="WEBP",
            default_settings=(0, 5, 15, 30, 50, 70, 80, 90),
            options={"method": 6, "lossless": False},
            _check=lambda: _check_pillow_feature("webp"),
            _versions=_versions_webp,
        ),
        Baseline(
            name="avif444",
            label="AVIF (libaom, 4:4:4, speed 4)",
            pillow_format="AVIF",
            default_settings=(8, 18, 28, 38, 48, 58, 68, 78),
            options={"codec": "aom", "subsampling": "4:4:4", "speed": 4, "max_threads": 1},
            _check=_check_avif_aom,
            _versions=_versions_avif,
        ),
        Baseline(
            name="avif420",
            label="AVIF (libaom, 4:2:0, speed 4)",
            pillow_format="AVIF",
            default_settings=(8, 18, 28, 38, 48, 58, 68, 78),
            options={"codec": "aom", "subsampling": "4:2:0", "speed": 4, "max_threads": 1},
            _check=_check_avif_aom,
            _versions=_versions_avif,
        ),
        Baseline(
            name="jxl",
            label="JPEG XL (libjxl, effort 7)",
            pillow_format="JXL",
            default_settings=(0, 10, 25, 40, 55, 70, 80, 90),
            options={"effort": 7, "num_threads": 1},
            _check=_check_jxl,
            _versions=_versions_jxl,
        ),
        Baseline(
            name="heic",
            label="HEIC (x265, 4:2:0)",
            pillow_format="HEIF",
            default_settings=(5, 12, 20, 28, 36, 44, 52, 60),
            options={"chroma": "420"},
            _check=_check_heic,
            _versions=_versions_heic,
        ),
    )
}


def get_baseline(name: str) -> Baseline:
    """Look a baseline up by name (``jpeg``, ``webp``, ``avif444``, ``avif420``, ``jxl``, ``heic``)."""
    try:
        return BASELINES[name]
    except KeyError:
        raise KeyError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}") from None
