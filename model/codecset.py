"""A set of fixed-rate networks, one per quality, behind the API of :class:`model.codec.Codec`.

The paper's models are fixed rate: the official LALIC release is six separately trained networks,
one per lambda (``lalic import``, :mod:`model.official`, writes them into one weight set,
:class:`model.zoo.WeightSet`). A :class:`CodecSet` holds one :class:`~model.codec.Codec` per quality:
``compress`` codes with the network of the requested quality, whose model id (``lalic-q3``) and
weights digest go into the stream's header; ``decompress`` picks the network by the header's quality,
and that network refuses the stream unless model id and digest are its own. Only the qualities in
the set are served: a fractional quality would need a variable-rate network (``lalic-s``).

The networks are built when the set is (default) or, with ``lazy=True``, on first use of a quality;
the weight file is memory-mapped, so a lazy set holds only what it has used.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.bitstream import DEFAULT_MAX_PIXELS, Container, Header, ModelMismatchError, read_header, unpack
from model.codec import Checkpoint, Codec, check_layout, padded_size
from model.zoo import WeightSet, load_network, read_weight_set


def load_codec(weights: str | Path | None = None, **options: Any) -> Codec | CodecSet:
    """The codec of any weight file: a :class:`~model.codec.Codec` for one network (default: the
    shipped weights), a :class:`CodecSet` for a weight set of per-quality networks (``lalic import``).

    ``options`` go to every codec (device, backend, entropy_threads, ...; ``lazy`` to a set only).
    """
    net = load_network(weights)
    if isinstance(net, WeightSet):
        return CodecSet(net, **options)
    options.pop("lazy", None)
    return Codec(net, **options)


def _codec_default(name: str) -> Any:
    """The default of one of :class:`~model.codec.Codec`'s keyword arguments."""
    return inspect.signature(Codec).parameters[name].default


class CodecSet:
    """Images (uint8 RGB, H x W x 3) <-> bytes with one fixed-rate LALIC network per quality.

    Args:
        weights: the per-quality networks (:func:`model.zoo.read_weight_set`).
        lazy: build each quality's codec on first use instead of now.
        **options: passed to every :class:`~model.codec.Codec` (device, backend, entropy_threads, ...);
            ``export_dir`` names the folder ``lalic export`` wrote for the set, which holds one
            folder per network, named by its label.
    """

    def __init__(self, weights: WeightSet, *, lazy: bool = False, **options: Any) -> None:
        self.weights = weights
        self.options = options
        self.model_id = weights.config.name
        self.device = str(options.get("device", _codec_default("device")))
        self.backend = str(options.get("backend", _codec_default("backend")))
        self._codecs: dict[float, Codec] = {}
        if not lazy:
            for quality in self.qualities:
                self.codec(quality)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> CodecSet:
        """The set in a weight-set file (``lalic import``)."""
        return cls(read_weight_set(path), **kwargs)

    # Identity ---------------------------------------------------------------------------------
    @property
    def qualities(self) -> tuple[float, ...]:
        return self.weights.qualities

    @property
    def weights_digest(self) -> str:
        """Identifies the set (configuration, members and their source files' sha256); every stream
        carries the digest of its own network instead (:attr:`digests`)."""
        members = [(m.quality, m.label, m.lmbda) for m in self.weights.members]
        identity = [self.weights.config.to_dict(), members, self.weights.manifest.get("members")]
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def digests(self) -> dict[float, str]:
        """The weights digest of every quality's network (builds the codecs not built yet)."""
        return {q: self.codec(q).weights_digest for q in self.qualities}

    @property
    def loaded(self) -> tuple[float, ...]:
        """Qualities whose codec is built."""
        return tuple(sorted(self._codecs))

    def is_loaded(self, quality: float) -> bool:
        """Whether the codec of ``quality`` is built (a served quality of a lazy set may not be)."""
        return float(quality) in self._codecs

    def _served(self, quality: float) -> float:
        """``quality`` as a float when the set has a network for it; ValueError otherwise."""
        q = float(quality)
        if q in self.qualities:
            return q
        served = ", ".join(f"{s:g}" for s in self.qualities)
        why = (
            "import a checkpoint trained for it"
            if q.is_integer()
            else "fractional qualities need a variable-rate model such as lalic-s"
        )
        raise ValueError(
            f"quality {quality!r} is not served: this set has one fixed-rate network per quality "
            f"({served}); {why}"
        )

    def codec(self, quality: float) -> Codec:
        """The codec of exactly ``quality`` (built on first use)."""
        q = self._served(quality)
        if q not in self._codecs:
            options = dict(self.options)
            if options.get("export_dir") is not None:  # one folder per network (lalic export)
                options["export_dir"] = str(Path(options["export_dir"]) / self.weights.member(q).label)
            self._codecs[q] = Codec(self.weights.network(q), **options)
        return self._codecs[q]

    # The Codec API ----------------------------------------------------------------------------
    padded_shape = staticmethod(padded_size)

    def read_header(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Header:
        return read_header(data, max_pixels=max_pixels)

    def parse(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Container:
        """Unpack a container once and check it against the network of its quality (the parsed
        form :meth:`decompress_batch` takes; see :meth:`model.codec.Codec.parse`)."""
        container = unpack(bytes(data), max_pixels=max_pixels)
        self.check_container(container)
        return container

    def check_container(self, container: Container) -> None:
        """Check a parsed stream against the network of its quality without building one: a built
        network checks everything (:meth:`model.codec.Codec.check_container`); for one not built yet
        (a lazy set) the model id and the latent layout are checked here, and the weights digest
        when the stream is decoded, which builds the network."""
        quality = self._decoder_quality(container.header)
        if quality in self._codecs:
            self._codecs[quality].check_container(container)
            return
        header = container.header
        model_id = self.weights.member(quality).model_id(self.weights.config)
        if header.model_id != model_id:
            raise ModelMismatchError(
                f"the stream was made by {header.model_id}@{header.weights_digest.hex()}, "
                f"this set serves quality {quality:g} with {model_id}"
            )
        check_layout(container, self.weights.config)

    def compress(
        self, image: np.ndarray, quality: float, refine_steps: int = 0, orientations: Sequence[int] = (0,)
    ) -> bytes:
        return self.codec(quality).compress(
            image, quality, refine_steps=refine_steps, orientations=orientations
        )

    def compress_batch(
        self,
        images: list[np.ndarray],
        quality: float,
        timings: dict[str, float] | None = None,
        refine_steps: int = 0,
        orientations: Sequence[int] = (0,),
        checkpoint: Checkpoint | None = None,
    ) -> list[bytes]:
        """Compress with the network of ``quality`` (see :meth:`model.codec.Codec.compress_batch`)."""
        codec = self.codec(quality)
        return codec.compress_batch(
            images,
            quality,
            timings,
            refine_steps=refine_steps,
            orientations=orientations,
            checkpoint=checkpoint,
        )

    def decompress(self, data: bytes) -> np.ndarray:
        return self.decompress_batch([data])[0]

    def decompress_batch(
        self,
        streams: Sequence[bytes | Container],
        timings: dict[str, float] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        checkpoint: Checkpoint | None = None,
    ) -> list[np.ndarray]:
        """Decode each stream (bytes, or what :meth:`parse` returned) with the network of its
        header's quality; raises BitstreamError on any fault, including a stream no network of the
        set made."""
        containers = [s if isinstance(s, Container) else self.parse(s, max_pixels) for s in streams]
        groups: dict[float, list[int]] = {}
        for i, container in enumerate(containers):
            groups.setdefault(self._decoder_quality(container.header), []).append(i)
        images: list[np.ndarray | None] = [None] * len(streams)
        for quality, indexes in groups.items():
            batch = [containers[i] for i in indexes]
            decoded = self.codec(quality).decompress_batch(batch, timings, max_pixels, checkpoint)
            for i, image in zip(indexes, decoded, strict=True):
                images[i] = image
        return images  # type: ignore[return-value]

    def _decoder_quality(self, header: Header) -> float:
        if header.quality in self.qualities:
            return header.quality
        served = ", ".join(f"{self.weights.member(q).model_id(self.weights.config)}" for q in self.qualities)
        raise ModelMismatchError(
            f"the stream was made by {header.model_id}@{header.weights_digest.hex()} at quality "
            f"{header.quality:g}; this set serves {served}"
        )

    def warmup(self, qualities: list[float] | None = None, size: tuple[int, int] = (64, 64)) -> None:
        """Run every quality once (building its codec if needed)."""
        for quality in qualities or self.qualities:
            self.codec(quality).warmup([quality], size)
