"""The codec as the service uses it: loading, warm-up, readiness, batch execution and stream headers.

Everything that touches torch runs in the batching worker's thread (see :mod:`service.worker`):
:meth:`Engine.load` is the worker's start-up step and :meth:`Engine.run_batch` its batch function.
Header parsing and shape arithmetic are cheap, pure Python, and may run anywhere.

The engine also owns the cost model (:mod:`service.cost`): warm-up ends by timing one image of each
of :data:`CALIBRATION_SIDES` per operation, and every finished batch updates the estimates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

from service.cost import CostModel
from service.metrics import Metrics
from service.settings import Settings
from service.worker import Job

if TYPE_CHECKING:
    from model.bitstream import Container, Header
    from model.codec import Codec

logger = logging.getLogger("service.engine")

COMPRESS = "compress"
DECOMPRESS = "decompress"
OPERATIONS = (COMPRESS, DECOMPRESS)
CALIBRATION_SIDES = (64, 384)
"""Sides of the square images timed at the end of warm-up to fit the cost model (two sizes: a line)."""
CALIBRATION_RUNS = 3
"""Rounds over the sizes; the fastest time of each size counts (the first of a new size pays for lazy
set-up, and a busy machine only ever adds time; live timings then move the estimates to what
requests really take)."""


class ModelState(StrEnum):
    """Life cycle of the codec inside the service."""

    LOADING = "loading"
    WARMING_UP = "warming_up"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class BatchKey:
    """Jobs with equal keys can run in one codec call."""

    operation: str
    quality: float
    padded_height: int
    padded_width: int

    @property
    def pixels(self) -> int:
        """Padded pixels of each image of the batch (what the cost model counts)."""
        return self.padded_height * self.padded_width


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Engine:
    """Owns one :class:`model.codec.Codec` and runs batches of jobs on it."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.state = ModelState.LOADING
        self.error: str | None = None
        self.codec: Codec | None = None
        self.warmed: tuple[float, ...] = ()
        """Qualities whose network is loaded and warmed up (all configured ones once ready, except in
        a lazy weight set, which loads the others on first use)."""
        self.start_qualities: tuple[float, ...] = settings.qualities
        """Qualities loaded and warmed up before the service is ready."""
        self._load_seconds = 0.0
        self.costs = CostModel()
        self._ready = threading.Event()
        for operation in OPERATIONS:
            metrics.track_cost(operation, self._cost_reader(operation))
            metrics.jobs_abandoned.labels(operation=operation)  # exposed at 0 before the first (for rate())

    @property
    def ready(self) -> bool:
        """Whether every configured quality is loaded and warmed up."""
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until ready (or ``timeout``); returns readiness."""
        return self._ready.wait(timeout)

    def describe_state(self) -> str:
        """A one-line human description of the current state."""
        if self.state is ModelState.FAILED:
            return f"model loading failed: {self.error}"
        if self.state is ModelState.WARMING_UP:
            return f"warming up ({len(self.warmed)}/{len(self.start_qualities)} qualities ready)"
        if self.state is ModelState.LOADING:
            return "loading the model"
        return "ready"

    # -- start-up (worker thread) -------------------------------------------------------------

    def load(self) -> None:
        """Create the codec and warm up every configured quality (a lazy weight set: the one the
        cost model is calibrated with); failures are recorded in ``state``."""
        started = time.perf_counter()
        try:
            self._configure_torch()
            self.codec = self._create_codec()
            missing = [q for q in self.settings.qualities if q not in self.codec.qualities]
            if missing:
                raise ValueError(f"the model has no quality {missing} (it has {self.codec.qualities})")
            if self.lazy:
                self.start_qualities = (self.calibration_quality,)
            self.state = ModelState.WARMING_UP
            for quality in self.start_qualities:
                self.codec.warmup(qualities=[quality])
                self.warmed = (*self.warmed, quality)
                self.metrics.models_loaded.set(len(self.warmed))
            self._calibrate()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self.state = ModelState.FAILED
            logger.exception("model loading failed; /readyz stays 503")
            return
        self.state = ModelState.READY
        self._ready.set()
        logger.info(
            "model %s ready on %s/%s with qualities %s in %.1f s",
            self.codec.model_id,
            self.codec.device,
            self.codec.backend,
            list(self.warmed),
            time.perf_counter() - started,
        )

    def _calibrate(self) -> None:
        """Time a compress and a decompress of one image of each calibration size; fit the cost model."""
        codec = self.require_codec()
        quality = self.calibration_quality
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for side in CALIBRATION_SIDES]
        best = {(operation, side): float("inf") for operation in OPERATIONS for side in CALIBRATION_SIDES}
        for _ in range(CALIBRATION_RUNS):  # sizes interleaved: a stall spoils one run, not one size
            for side, image in zip(CALIBRATION_SIDES, images, strict=True):
                started = time.perf_counter()
                stream = codec.compress(image, quality)
                coded = time.perf_counter()
                codec.decompress(stream)
                best[COMPRESS, side] = min(best[COMPRESS, side], coded - started)
                best[DECOMPRESS, side] = min(best[DECOMPRESS, side], time.perf_counter() - coded)
        small, large = CALIBRATION_SIDES
        for operation in OPERATIONS:
            self.costs.calibrate(
                operation, (small * small, best[operation, small]), (large * large, best[operation, large])
            )
            fixed, per_pixel = self.costs.parameters(operation)
            logger.info(
                "cost model: %s takes %.1f ms + %.3f s per megapixel per image",
                operation,
                fixed * 1e3,
                per_pixel * 1e6,
            )

    @property
    def calibration_quality(self) -> float:
        """The configured quality the cost model is calibrated with (the middle one)."""
        return self.settings.qualities[len(self.settings.qualities) // 2]

    @property
    def lazy(self) -> bool:
        """Whether networks load on first use: ``lazy_weights`` and a set of per-quality networks."""
        from model.codecset import CodecSet

        return self.settings.lazy_weights and isinstance(self.codec, CodecSet)

    def _cost_reader(self, operation: str) -> Callable[[], tuple[float, float]]:
        """``(fixed seconds, seconds per pixel)`` of ``operation``, zeros before calibration."""

        def read() -> tuple[float, float]:
            try:
                return self.costs.parameters(operation)
            except KeyError:
                return 0.0, 0.0

        return read

    def _configure_torch(self) -> None:
        """Apply the thread settings before any model work."""
        import torch

        if self.settings.torch_threads is not None:
            torch.set_num_threads(self.settings.torch_threads)

    def _create_codec(self) -> Codec:
        """Build the codec the settings ask for (a codec set for a weight set of per-quality networks)."""
        from model.codec import Codec
        from model.codecset import load_codec
        from model.stages import resolve_precision

        device = resolve_device(self.settings.device)
        backend = self.settings.backend
        precisions = {
            name: resolve_precision(getattr(self.settings, name), device, backend)
            for name in ("synthesis_precision", "analysis_precision")
        }
        logger.info("g_s in %(synthesis_precision)s, g_a in %(analysis_precision)s", precisions)
        from model import transform_kernels
        from model.fixedpoint import native_kernels_available

        if not native_kernels_available():
            logger.warning(
                "model._exact_kernels is not built: the reproducible entropy path runs its PyTorch "
                "reference (the same bits, about 1.4x slower); reinstall with a C compiler"
            )
        if not transform_kernels.available():
            logger.warning(
                "model._transform_kernels is not built: g_a and g_s run PyTorch's chunked BiWKV "
                "(g_s up to 1.4x slower, BENCHMARKS.md); reinstall with a C compiler"
            )
        options: dict[str, Any] = {
            "device": device,
            "backend": backend,
            "entropy_threads": self.settings.entropy_threads,
            **precisions,
            "stream_version": self.settings.stream_version,
        }
        if self.settings.random_weights:
            return Codec.random(config=self.settings.model, seed=0, **options)
        return load_codec(self.settings.weights, lazy=self.settings.lazy_weights, **options)

    # -- request side (any thread) ------------------------------------------------------------

    def require_codec(self) -> Codec:
        """The loaded codec; only call once :attr:`ready`."""
        if self.codec is None:
            raise RuntimeError("the codec is not loaded")
        return self.codec

    def compress_key(self, height: int, width: int, quality: float) -> BatchKey:
        """The batching key of a compress job."""
        padded_h, padded_w = self.require_codec().padded_shape(height, width)
        return BatchKey(COMPRESS, float(quality), padded_h, padded_w)

    def decompress_key(self, header: Header) -> BatchKey:
        """The batching key of a decompress job."""
        padded_h, padded_w = self.require_codec().padded_shape(header.height, header.width)
        return BatchKey(DECOMPRESS, float(header.quality), padded_h, padded_w)

    def parse(self, data: bytes) -> Container:
        """Parse a stream once (header, both CRCs) within the pixel limit and check that this model
        decodes it; the worker decodes the returned container without parsing it again.

        Raises:
            PixelLimitError: the header is well formed but declares more than ``max_pixels`` pixels.
            ModelMismatchError: another model (or other weights) made the stream.
            BitstreamError: anything else wrong with the stream.
        """
        return self.require_codec().parse(data, max_pixels=self.settings.max_pixels)

    def quality_served(self, quality: float) -> bool:
        """Whether the loaded codec codes ``quality``: a value between loaded anchors for a variable-rate
        model (``Settings.quality_served``), exactly a loaded quality for a set of fixed-rate networks."""
        codec = self.require_codec()
        from model.codecset import CodecSet

        if isinstance(codec, CodecSet):
            return float(quality) in self.settings.qualities
        return self.settings.quality_served(quality)

    def models(self) -> list[dict[str, Any]]:
        """What ``/v1/models`` lists: the codec, or every network of a set (one quality each; a
        network a lazy set has not loaded yet has no digest, which needs its weights)."""
        codec = self.require_codec()
        from model.codecset import CodecSet

        if not isinstance(codec, CodecSet):
            qualities = list(self.settings.qualities)
            return [self._model_info(codec.model_id, codec.weights_digest, qualities, codec, True)]
        infos = []
        for q in self.settings.qualities:
            model_id = codec.weights.member(q).model_id(codec.weights.config)
            loaded = codec.is_loaded(q)
            digest = codec.codec(q).weights_digest if loaded else None
            infos.append(self._model_info(model_id, digest, [q], codec, loaded))
        return infos

    @staticmethod
    def _model_info(
        model_id: str, digest: str | None, qualities: list[float], codec: Any, loaded: bool
    ) -> dict[str, Any]:
        return {
            "id": model_id,
            "weights_digest": digest,
            "qualities": qualities,
            "quality_range": [min(qualities), max(qualities)],
            "device": codec.device,
            "backend": codec.backend,
            "loaded": loaded,
        }

    # -- batch execution (worker thread) ------------------------------------------------------

    def estimate(self, key: BatchKey) -> float:
        """Estimated seconds to run one job of ``key`` (the cost model is fitted once ready)."""
        return self.costs.estimate(key.operation, key.pixels)

    def run_batch(self, jobs: Sequence[Job], checkpoint: Callable[[], None]) -> list[Any]:
        """Run jobs sharing one :class:`BatchKey`: images to streams, or streams to images.

        ``checkpoint`` goes to the codec, which calls it between stages and tiles.
        """
        codec = self.require_codec()
        key: BatchKey = jobs[0].key
        if self.lazy and key.quality not in self.warmed:
            self._load_lazily(key.quality, checkpoint)
        timings: dict[str, float] = {}
        payloads = [job.payload for job in jobs]
        results: list[Any]
        if key.operation == COMPRESS:
            results = list(
                codec.compress_batch(payloads, key.quality, timings=timings, checkpoint=checkpoint)
            )
        else:
            results = list(
                codec.decompress_batch(
                    payloads, timings=timings, max_pixels=self.settings.max_pixels, checkpoint=checkpoint
                )
            )
        self.metrics.observe_timings(key.operation, timings)
        return results

    def _load_lazily(self, quality: float, checkpoint: Callable[[], None]) -> None:
        """Load and warm up the network of ``quality`` of a lazy set (worker thread, first use).

        A batch already past its deadline stops at the checkpoint before paying for the load; the
        load's time is kept out of the cost model (it happens once, not per pixel)."""
        checkpoint()
        started = time.perf_counter()
        self.require_codec().warmup([quality])
        seconds = time.perf_counter() - started
        self._load_seconds += seconds
        self.warmed = tuple(sorted((*self.warmed, quality)))
        self.metrics.models_loaded.set(len(self.warmed))
        logger.info("loaded the network of quality %g on first use in %.1f s", quality, seconds)

    def observe_run(self, jobs: Sequence[Job], seconds: float) -> None:
        """Teach the cost model how long a finished batch took (less any network it loaded)."""
        key: BatchKey = jobs[0].key
        seconds, self._load_seconds = max(0.0, seconds - self._load_seconds), 0.0
        self.costs.observe(key.operation, key.pixels, len(jobs), seconds)

    def observe_abandoned(self, jobs: Sequence[Job], seconds: float) -> None:
        """Count a batch stopped past its deadline; if it had already run longer than estimated, the
        estimate was low, and that time (a lower bound of the true cost) teaches the cost model."""
        key: BatchKey = jobs[0].key
        seconds, self._load_seconds = max(0.0, seconds - self._load_seconds), 0.0
        self.metrics.jobs_abandoned.labels(operation=key.operation).inc(len(jobs))
        estimated = sum(job.cost for job in jobs)
        logger.warning(
            "abandoned a %s batch of %d %dx%d job(s) past its deadline after %.2f s (estimated %.2f s)",
            key.operation,
            len(jobs),
            key.padded_width,
            key.padded_height,
            seconds,
            estimated,
        )
        if seconds > estimated:
            self.costs.observe(key.operation, key.pixels, len(jobs), seconds)

    def observe_batch(self, jobs: Sequence[Job]) -> None:
        """Record the size of a batch about to run and how long its jobs waited."""
        operation = jobs[0].key.operation
        self.metrics.batch_size.labels(operation=operation).observe(len(jobs))
        wait = self.metrics.queue_wait.labels(operation=operation)
        for job in jobs:
            wait.observe(job.started - job.enqueued)
