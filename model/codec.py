"""Images to LALIC bitstreams and back: the API that the CLI and the service call.

A :class:`Codec` wraps a trained :class:`~model.lalic.LALIC` network prepared for inference.
``compress`` pads the image (edge replication, right and bottom) to a multiple of 64, runs
g_a and h_a, codes z with the factorised prior and y pass by pass with the RWKV-SCCTX model
(:meth:`~model.context.ContextModel.code`), and packs everything into one container
(:mod:`model.bitstream`). ``decompress`` reverses it, checks the CRC32 of the decoded symbols
against the one the encoder stored (a desynchronised decode is reported, never returned), and
crops the reconstruction back to the original size.

``compress(..., refine_steps=N)`` optimises the image's y and z for N steps before coding
(:mod:`model.refine`): a slower encoder that spends fewer bits for the same quality, whose
streams the ordinary decoder reads (the format does not change).

``compress(..., orientations=(0, 1, 2, 3))`` codes the image in each of these flips (mirrored
left-right, flipped top-bottom, both), decodes every candidate and keeps the one with the lowest
rate-distortion cost ``bpp + lambda * MSE`` (the training loss, lambda of the quality); the
header records the flip and the decoder turns the image back: the network codes some images
better upside down than upright.

Containers are parsed once: :meth:`Codec.parse` unpacks the bytes (header and CRCs) and checks
that this codec decodes them (its weights, a quality it serves, the latent shapes of the image),
and :meth:`Codec.decompress_batch` takes that parsed :class:`~model.bitstream.Container` as well
as bytes. The encoder builds containers and packs each stream once.

Determinism: the entropy-parameter path (h_s onwards, which decides the coding distributions)
runs in the reproducible arithmetic of :mod:`model.exact` (container version 2): its results, and
so the decoded latents, are the same bits on every CPU, thread count, batch size, backend and
device, and every decoder reads every stream. g_a and g_s run on the chosen backend with the
caller's threads: g_s may move a decoded pixel by one 8-bit level between machines, and g_a's y
(what the encoder quantises) may differ in a last bit, so two encoders can write different but
equally valid streams. Streams of version 1 (the float32 entropy path of earlier releases) still
decode on the kind of CPU and backend that coded them, with ``entropy_threads`` torch threads;
elsewhere the symbol checksum refuses them rather than return a wrong image. Every stage runs one
image at a time, so a batch decodes exactly like its members alone. BENCHMARKS.md ("Portable
streams") has what was measured.

Checkpoints: ``compress_batch`` and ``decompress_batch`` take ``checkpoint``, a callable run between
stages (before each image's analysis, entropy parameters and synthesis, and before hyper-analysis),
and so between the tiles of a large image; it may raise (any exception) to abandon the call, e.g.
when a deadline passed, or run other work in the meantime (the service interleaves small requests).
It is called outside every stage and timer: it changes neither the results nor the stage timings.

Backends (``backend=``, :mod:`model.backends`): ``"torch"`` (eager), ``"torchscript"`` (scripted
and frozen stages) and ``"onnxruntime"`` (every stage exported to ONNX, cached per weights and
code version, or loaded from ``export_dir``). Only the networks change; entropy coding and the
coding loop are the same Python code for all three, and so is the reproducible entropy path of
version-2 streams (:mod:`model.exact`, PyTorch on the codec's device for every backend): streams
of any backend decode on every other. Version-1 streams use the backend's own entropy networks.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from model.backends import Stages, check_backend, load_stages
from model.bitstream import (
    DEFAULT_MAX_PIXELS,
    FLOAT_PATH_VERSION,
    FORMAT_VERSION,
    ORIENTATIONS,
    READ_VERSIONS,
    BitstreamError,
    Container,
    Header,
    ModelMismatchError,
    PixelLimitError,
    pack,
    read_header,
    symbols_crc32,
    unpack,
)
from model.coder import CoderError, SymbolDecoder, SymbolEncoder
from model.configs import LalicConfig, get_config
from model.exact import ExactAnalysis, LatentRangeError, exact_analysis, exact_entropy_path
from model.image import flip, is_orientation
from model.lalic import LALIC, PAD_MULTIPLE
from model.metrics import bits_per_pixel, mse
from model.refine import lambda_for_quality
from model.stages import EXACT_PRECISION
from model.tiling import compress_tiled, decompress_tiled, needs_tiling

ENTROPY_THREADS = 2
"""Default torch threads of the entropy-parameter path (see the module docstring)."""


Checkpoint = Callable[[], None]
"""Called between stages and tiles; raising abandons the codec call (see the module docstring)."""


def _no_checkpoint() -> None:
    """The default checkpoint: nothing to check."""


def state_digest(net: torch.nn.Module) -> bytes:
    """8-byte digest of a network's state (names, shapes, values): identifies the weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.digest()[:8]


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class _Timer:
    timings: dict[str, float] | None

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.timings is not None:
                self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


def _check_orientations(orientations: Sequence[int]) -> tuple[int, ...]:
    """A non-empty tuple of distinct orientations from :data:`model.bitstream.ORIENTATIONS`."""
    try:
        items = tuple(orientations)
    except TypeError:
        raise ValueError(f"orientations must be a sequence of 0..3, got {orientations!r}") from None
    if not items or len(set(items)) != len(items) or any(not is_orientation(o) for o in items):
        raise ValueError(f"orientations must be distinct values of {ORIENTATIONS}, got {orientations!r}")
    return items


def padded_size(height: int, width: int) -> tuple[int, int]:
    up = lambda n: -(-n // PAD_MULTIPLE) * PAD_MULTIPLE  # noqa: E731
    return up(height), up(width)


def check_layout(container: Container, config: LalicConfig) -> None:
    """What a network of ``config`` needs of a parsed whole-image stream: the latent shapes of its
    size (y at 1/16, z at 1/64 of the padded size, Sec. 3.1) and one coded stream. Tiled containers
    pass: each tile is checked when it is decoded."""
    header, streams = container
    if header.tiling != (0, 0, 0):
        return
    hp, wp = padded_size(header.height, header.width)
    want_y = (config.latent, hp // 16, wp // 16)
    want_z = (config.hyper_latent, hp // 64, wp // 64)
    if header.y_shape != want_y or header.z_shape != want_z:
        raise BitstreamError(
            f"latent shapes {header.y_shape}/{header.z_shape} do not match a "
            f"{header.height}x{header.width} image ({want_y}/{want_z})"
        )
    if len(streams) != 1:
        raise BitstreamError(f"expected 1 coded stream, got {len(streams)}")


class Codec:
    """Image (uint8 RGB, H x W x 3) <-> bytes with one LALIC network.

    ``synthesis_precision`` and ``analysis_precision`` are g_s's and g_a's
    (:data:`model.stages.PRECISIONS`); ``bfloat16`` is faster on CPUs with AVX512-BF16. For g_s it
    moves decoded pixels (PSNR within 0.02 dB on Kodak), never the streams or the decoded latents;
    for g_a it moves the latents this encoder sends (valid streams for every decoder) within the
    rate-distortion bounds of BENCHMARKS.md, "g_s and g_a in bfloat16". ``analysis_precision="exact"``
    (:data:`model.stages.EXACT_PRECISION`) runs g_a and h_a in the reproducible arithmetic of the
    entropy path, whatever the backend: every machine then writes the same bytes for one image
    (without ``refine_steps``, which follows float32 gradients).

    ``stream_version`` is the container version the encoder writes (every version of
    :data:`model.bitstream.READ_VERSIONS` is decoded): 2, the default, codes with the reproducible
    entropy path that every decoder reproduces; 1 with the float32 one of earlier releases, for
    replicas that cannot read version 2 yet (a rolling upgrade).

    ``fused_kernels`` (default) runs the BiWKV of g_a and g_s on the fused CPU kernel of
    :mod:`model.transform_kernels` where it applies (:func:`model.backends.load_stages`); False keeps
    PyTorch's formulation (benchmarks compare the two).
    """

    def __init__(
        self,
        net: LALIC,
        *,
        device: str = "cpu",
        backend: str = "torch",
        entropy_threads: int | None = ENTROPY_THREADS,
        export_dir: str | None = None,
        threads: int | None = None,
        synthesis_precision: str = "float32",
        analysis_precision: str = "float32",
        stream_version: int = FORMAT_VERSION,
        fused_kernels: bool = True,
    ) -> None:
        if stream_version not in READ_VERSIONS:
            raise ValueError(f"stream_version must be one of {READ_VERSIONS}, got {stream_version!r}")
        self.stream_version = stream_version
        self.device = str(device)
        self.synthesis_precision = synthesis_precision
        self.analysis_precision = analysis_precision
        self.backend = check_backend(backend)
        self.net = net.to(device).prepare_for_inference()
        for model, cdfs in ((self.net.gaussian, "y_cdfs"), (self.net.entropy_bottleneck, "z_cdfs")):
            if getattr(model, cdfs).numel() == 0:  # build missing tables only: stored ones are kept
                model.update()
        self.model_id = net.config.name
        self.digest = state_digest(self.net)
        self.entropy_threads = entropy_threads
        self._y_tables = self.net.gaussian.tables()
        self._z_tables = self.net.entropy_bottleneck.tables()
        self._exact = exact_entropy_path(self.net)  # the entropy path of version-2 streams
        # the networks behind the chosen backend (model.backends); the coding loop stays Python
        self._stages = load_stages(
            self.net,
            backend,
            self.weights_digest,
            export_dir=export_dir,
            threads=threads,
            device=self.device,
            synthesis_precision=synthesis_precision,
            analysis_precision=analysis_precision,
            fused_kernels=fused_kernels,
        )
        # g_a and h_a: the backend's, or the reproducible ones for byte-identical streams everywhere
        exact = analysis_precision == EXACT_PRECISION
        self._encoder: Stages | ExactAnalysis = exact_analysis(self.net) if exact else self._stages

    # Construction -------------------------------------------------------------------------
    @classmethod
    def random(cls, config: str = "lalic-s", seed: int = 0, **kwargs) -> Codec:
        """A codec with randomly initialised weights (tests, benchmarks)."""
        torch.manual_seed(seed)
        return cls(LALIC(get_config(config)), **kwargs)

    @classmethod
    def from_pretrained(cls, weights: str | None = None, **kwargs) -> Codec:
        """The shipped weights (``weights=None``) or a weight file written by ``lalic`` tools.

        A weight set of per-quality networks (``lalic import``) is refused here: it needs one codec
        per quality, :func:`model.codecset.load_codec` (which takes either kind of file).
        """
        from model.zoo import WeightSet, load_network

        net = load_network(weights)
        if isinstance(net, WeightSet):
            raise ValueError(
                f"{weights} is a weight set (one network per quality): load it with model.codecset.load_codec"
            )
        return cls(net, **kwargs)

    @property
    def weights_digest(self) -> str:
        return self.digest.hex()

    @property
    def qualities(self) -> tuple[float, ...]:
        return self.net.qualities

    @staticmethod
    def padded_shape(height: int, width: int) -> tuple[int, int]:
        return padded_size(height, width)

    def read_header(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Header:
        return read_header(data, max_pixels=max_pixels)

    def parse(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Container:
        """Unpack a container once (header, both CRCs) and check that this codec decodes it: the
        parsed form :meth:`decompress_batch` takes, so a caller that inspects the header first
        (the service) never parses the bytes twice.

        Raises:
            PixelLimitError: the image has more than ``max_pixels`` pixels.
            ModelMismatchError: another model or other weights made the stream.
            BitstreamError: anything else wrong with the stream.
        """
        container = unpack(bytes(data), max_pixels=max_pixels)
        self.check_container(container)
        return container

    def _check_quality(self, quality: float) -> float:
        q = float(quality)
        lo, hi = self.qualities[0], self.qualities[-1]
        if not (lo <= q <= hi):  # also rejects NaN
            raise ValueError(f"quality must be within [{lo:g}, {hi:g}], got {quality!r}")
        return float(np.float32(q))  # the container stores float32: use exactly that value

    # Compression ---------------------------------------------------------------------------
    def compress(
        self,
        image: np.ndarray,
        quality: float,
        refine_steps: int = 0,
        orientations: Sequence[int] = (0,),
    ) -> bytes:
        return self.compress_batch([image], quality, refine_steps=refine_steps, orientations=orientations)[0]

    def decompress(self, data: bytes) -> np.ndarray:
        return self.decompress_batch([data])[0]

    def _to_tensor(self, images: list[np.ndarray]) -> torch.Tensor:
        h, w = images[0].shape[:2]
        hp, wp = padded_size(h, w)
        # pixels / 255 on the CPU, correctly rounded (CUDA would multiply by the reciprocal: other
        # bits, and exact analysis promises the same latents on every device)
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0).to(self.device)
        return F.pad(x, (0, wp - w, 0, hp - h), mode="replicate") if (hp, wp) != (h, w) else x

    @torch.inference_mode()
    def compress_batch(
        self,
        images: list[np.ndarray],
        quality: float,
        timings: dict[str, float] | None = None,
        refine_steps: int = 0,
        orientations: Sequence[int] = (0,),
        checkpoint: Checkpoint | None = None,
    ) -> list[bytes]:
        """Compress images that share a padded shape; identical output to one-by-one calls.

        ``refine_steps > 0`` optimises each image's latents before coding (:mod:`model.refine`):
        fewer bits for the same quality, at about one training step of compute per iteration.
        The streams decode with the ordinary decoder.

        ``orientations`` lists the flips to try (:data:`model.bitstream.ORIENTATIONS`); with more
        than one, each image is coded and decoded in every one of them and the stream of lowest
        ``bpp + lambda * MSE`` is kept (ties: the first listed).

        ``checkpoint`` runs between stages and tiles; whatever it raises abandons the call.
        """
        q = self._check_quality(quality)
        if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
            raise ValueError(f"refine_steps must be a non-negative integer, got {refine_steps!r}")
        if refine_steps and self.analysis_precision == EXACT_PRECISION:
            raise ValueError(
                "refine_steps follows float32 gradients, so its streams would differ between machines: "
                "it cannot be combined with analysis precision exact"
            )
        orientations = _check_orientations(orientations)
        if not images:
            return []
        for img in images:
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
                raise ValueError(f"expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
        check = checkpoint or _no_checkpoint
        if orientations != (0,):
            return [
                self._compress_best_orientation(img, q, timings, refine_steps, orientations, check)
                for img in images
            ]
        return [pack(*c) for c in self._compress_upright(images, q, timings, refine_steps, check)]

    def _compress_best_orientation(
        self,
        image: np.ndarray,
        quality: float,
        timings: dict[str, float] | None,
        refine_steps: int,
        orientations: tuple[int, ...],
        check: Checkpoint,
    ) -> bytes:
        """The cheapest of the image's streams in ``orientations``, by the training loss
        ``bpp + lambda * 255^2 * MSE`` measured on each candidate's real decode."""
        lmbda = lambda_for_quality(self.net.config.lambdas, quality)
        best: tuple[float, bytes] | None = None
        for orientation in orientations:
            flipped = flip(image, orientation)
            header, streams = self._compress_upright([flipped], quality, timings, refine_steps, check)[0]
            candidate = Container(replace(header, orientation=orientation), streams)
            stream = pack(*candidate)
            limit = max(header.pixels, DEFAULT_MAX_PIXELS)
            decoded = self._decompress_containers([candidate], None, limit, check)[0]
            # the training loss: lambda * 255^2 * MSE on [0, 1] pixels is lambda * MSE in 8-bit levels
            cost = bits_per_pixel(len(stream), *image.shape[:2]) + lmbda * mse(decoded, image)
            if best is None or cost < best[0]:
                best = (cost, stream)
        return best[1]  # type: ignore[index]

    def _compress_upright(
        self,
        images: list[np.ndarray],
        q: float,
        timings: dict[str, float] | None,
        refine_steps: int,
        check: Checkpoint = _no_checkpoint,
    ) -> list[Container]:
        """The images coded as they are (orientation 0); arguments already checked."""
        if any(needs_tiling(*img.shape[:2]) for img in images):  # large images: tile by tile
            return [self._compress_large(img, q, timings, refine_steps, check) for img in images]
        shapes = {padded_size(*img.shape[:2]) for img in images}
        if len(shapes) != 1:
            raise ValueError(f"images in one batch must share a padded shape, got {sorted(shapes)}")
        timer = _Timer(timings)
        net = self.net
        qt = torch.full((len(images),), q, device=self.device)
        # Every stage runs one image at a time: oneDNN and BLAS pick kernels by batch size, and a
        # last-bit difference in y would flip a rounded symbol. A batch's streams are therefore
        # exactly the streams of its images coded alone.
        xs, ys = [], []
        for img in images:
            check()
            with timer("analysis"):
                xs.append(self._to_tensor([img]))
                ys.append(self._encoder.analysis(xs[-1], qt[:1]))
        y = torch.cat(ys)
        del ys
        check()
        with timer("hyper"):
            z = torch.cat([self._encoder.hyper_analysis(y[i : i + 1]) for i in range(len(images))])
        if refine_steps:
            with timer("refinement"):
                y, z = self._refine(xs, [img.shape[:2] for img in images], q, y, z, refine_steps)
        del xs
        with timer("hyper"):
            med = net.entropy_bottleneck.medians().view(1, -1, 1, 1)
            z_sym = torch.round(z - med).to(torch.int32)
            z_hat = z_sym.float() + med
        out = []
        for i, img in enumerate(images):
            check()
            with timer("entropy_parameters"):
                try:
                    _, passes = self._entropy_parameters(
                        z_hat[i : i + 1], y[i : i + 1], version=self.stream_version
                    )
                except LatentRangeError as exc:
                    raise ValueError(f"the image's latents cannot be coded: {exc}") from exc
            with timer("entropy_coding"):
                streams, arrays = self._encode_streams(z_sym[i], passes)
                header = Header(
                    model_id=self.model_id,
                    weights_digest=self.digest,
                    quality=q,
                    height=img.shape[0],
                    width=img.shape[1],
                    y_shape=tuple(y.shape[1:]),
                    z_shape=tuple(z.shape[1:]),
                    symbol_crc32=symbols_crc32(arrays),
                    version=self.stream_version,
                )
                out.append(Container(header, streams))
        return out

    def _refine(
        self,
        xs: list[torch.Tensor],
        sizes: list[tuple[int, int]],
        quality: float,
        y: torch.Tensor,
        z: torch.Tensor,
        steps: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Refined (y, z) of every image, one image at a time (:func:`model.refine.refine_latents`);
        ``xs`` are the padded input tensors, ``sizes`` the images' (height, width)."""
        from model.refine import refine_latents

        ys, zs = [], []
        for i, (x, size) in enumerate(zip(xs, sizes, strict=True)):
            y_i, z_i = refine_latents(self.net, x, y[i : i + 1], z[i : i + 1], quality, steps, size=size)
            ys.append(y_i)
            zs.append(z_i)
        return torch.cat(ys), torch.cat(zs)

    def _entropy_parameters(
        self,
        z_hat: torch.Tensor,
        y: torch.Tensor | None = None,
        decode=None,
        indexes=None,
        version: int = FORMAT_VERSION,
    ):
        """h_s and the RWKV-SCCTX coding loop for one image, in the arithmetic of container
        ``version`` (2: :mod:`model.exact`; 1: the backend's float32 networks), with the pinned
        thread count; ``indexes`` maps predicted scales to table indexes (default: the Gaussian's)."""
        nets = self._stages if version == FLOAT_PATH_VERSION else self._exact
        with torch_threads(self.entropy_threads):
            hyper = nets.hyper_synthesis(z_hat)
            return self.net.context.code(
                hyper, indexes or self.net.gaussian.indexes, y=y, decode=decode, nets=nets
            )

    @torch.inference_mode()
    def encoder_latents(self, image: np.ndarray, quality: float) -> dict:
        """What the encoder quantises for one image: z symbols, per-pass (symbols, indexes), y_hat,
        and per pass the continuous scales the entropy model predicted (before the table lookup)."""
        q = self._check_quality(quality)
        net = self.net
        y = self._encoder.analysis(self._to_tensor([image]), torch.tensor([q], device=self.device))
        med = net.entropy_bottleneck.medians().view(1, -1, 1, 1)
        z_sym = torch.round(self._encoder.hyper_analysis(y) - med).to(torch.int32)
        scales: list[torch.Tensor] = []

        def recording_indexes(s: torch.Tensor) -> torch.Tensor:
            scales.append(s.clone())
            return net.gaussian.indexes(s)

        y_hat, passes = self._entropy_parameters(
            z_sym.float() + med, y, indexes=recording_indexes, version=self.stream_version
        )
        return {"z_symbols": z_sym[0], "passes": passes, "y_hat": y_hat, "scales": scales}

    @torch.inference_mode()
    def reconstruct(self, y_hat: torch.Tensor, quality: float) -> torch.Tensor:
        """g_s of y_hat (with the inverse gain), float in [0, 1], still padded."""
        qt = torch.full((y_hat.shape[0],), float(quality), device=self.device)
        return self._stages.synthesis(y_hat, qt).clamp_(0, 1)

    def _z_indexes(self, shape: tuple[int, ...]) -> np.ndarray:
        c = shape[0]
        return np.broadcast_to(np.arange(c, dtype=np.int32)[:, None, None], shape)

    def _encode_streams(self, z_sym: torch.Tensor, passes) -> tuple[list[bytes], list[np.ndarray]]:
        """One range-coded stream: z, then y pass by pass (the decoder's order)."""
        encoder = SymbolEncoder()
        z_np = z_sym.cpu().numpy()
        encoder.encode(z_np, self._z_indexes(z_np.shape), self._z_tables)
        arrays = [z_np]
        for symbols, indexes in passes:
            s = symbols[0].cpu().numpy()
            encoder.encode(s, indexes[0].cpu().numpy(), self._y_tables)
            arrays.append(s)
        return [encoder.finish()], arrays

    # Decompression -------------------------------------------------------------------------
    def _check_origin(self, header: Header) -> None:
        """Refuse streams made by another model or other weights (:class:`ModelMismatchError`)."""
        if header.model_id != self.model_id or header.weights_digest != self.digest:
            raise ModelMismatchError(
                f"the stream was made by {header.model_id}@{header.weights_digest.hex()}, "
                f"this codec is {self.model_id}@{self.weights_digest}"
            )

    def check_container(self, container: Container) -> None:
        """What this codec needs of a parsed stream: its own weights, a quality it serves, and, for
        a whole image, the latent shapes of its size and one coded stream (tiles are checked one
        by one when they are decoded)."""
        self._check_origin(container.header)
        self._check_quality(container.header.quality)
        check_layout(container, self.net.config)

    def _as_container(self, item: bytes | Container, max_pixels: int) -> Container:
        """A stream as a checked container: bytes are parsed, a parsed one is taken as it is."""
        if not isinstance(item, Container):
            return self.parse(item, max_pixels)
        if item.header.pixels > max_pixels:
            raise PixelLimitError(item.header, max_pixels)
        self.check_container(item)
        return item

    @torch.inference_mode()
    def decompress_batch(
        self,
        streams: Sequence[bytes | Container],
        timings: dict[str, float] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        checkpoint: Checkpoint | None = None,
    ) -> list[np.ndarray]:
        """Decode streams of one padded shape and quality; raises BitstreamError on any fault.

        Each item is the container's bytes or the :class:`~model.bitstream.Container` that
        :meth:`parse` returned (then it is not parsed again). ``checkpoint`` runs between stages
        and tiles; whatever it raises abandons the call.
        """
        containers = [self._as_container(s, max_pixels) for s in streams]
        return self._decompress_containers(containers, timings, max_pixels, checkpoint or _no_checkpoint)

    def _decompress_containers(
        self,
        containers: list[Container],
        timings: dict[str, float] | None,
        max_pixels: int,
        check: Checkpoint = _no_checkpoint,
    ) -> list[np.ndarray]:
        """Decode checked containers (tiled ones tile by tile, each tile within ``max_pixels``)."""
        if not containers:
            return []
        if any(c.header.tiling != (0, 0, 0) for c in containers):
            return [self._decompress_large(c, timings, max_pixels, check) for c in containers]
        keys = {(padded_size(h.height, h.width), h.quality) for h, _ in containers}
        if len(keys) != 1:
            raise ValueError("streams in one batch must share padded shape and quality")
        timer = _Timer(timings)
        y_hats = []
        for header, parts in containers:
            check()
            y_hats.append(self._decode_latents(header, parts, timings)[0])
        images = []
        for y_hat, (h, _) in zip(y_hats, containers, strict=True):
            check()
            with timer("synthesis"):  # per image, so a batch decodes exactly like its members alone
                x_hat = self.reconstruct(y_hat, h.quality)
                pixels = x_hat.mul_(255).round_().to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy()
                images.append(np.ascontiguousarray(flip(pixels[: h.height, : h.width], h.orientation)))
        return images

    def _compress_large(
        self, image: np.ndarray, quality: float, timings, refine_steps: int = 0, check=_no_checkpoint
    ) -> Container:
        """A whole image's container, or a tiled one for images above the tiling threshold."""

        def code(tile: np.ndarray, q: float) -> Container:
            return self._compress_upright([tile], q, timings, refine_steps, check)[0]

        if needs_tiling(*image.shape[:2]):
            return compress_tiled(image, quality, code)
        return code(image, quality)

    def _decompress_large(
        self, container: Container, timings, max_pixels: int, check: Checkpoint = _no_checkpoint
    ) -> np.ndarray:
        """One tiled (or whole) image: each tile parsed once and checked against the outer header."""
        header, parts = container
        if header.tiling == (0, 0, 0):
            return self._decompress_containers([container], timings, max_pixels, check)[0]

        def decode(tile: Container) -> np.ndarray:
            self.check_container(tile)
            return self._decompress_containers([tile], timings, max_pixels, check)[0]

        image = decompress_tiled(header, parts, decode, lambda d: unpack(d, max_pixels=max_pixels))
        return flip(image, header.orientation)

    @torch.inference_mode()
    def decode_latents(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor, list]:
        """y_hat and the decoded symbol arrays (z first, then each pass) of one whole-image stream."""
        container = self.parse(data, max_pixels)
        if container.header.tiling != (0, 0, 0):
            raise BitstreamError(f"tiled streams have no single latent: {container.header.tiling}")
        return self._decode_latents(*container, None)

    def _decode_latents(self, header: Header, parts: list[bytes], timings) -> tuple[torch.Tensor, list]:
        med = self.net.entropy_bottleneck.medians().view(-1, 1, 1)
        arrays: list[np.ndarray] = []
        coding = [0.0]
        start = time.perf_counter()
        try:
            decoder = SymbolDecoder(parts[0])

            def decode(i: int, indexes: torch.Tensor) -> torch.Tensor:
                begin = time.perf_counter()
                sym = decoder.decode(indexes[0].cpu().numpy(), self._y_tables)
                arrays.append(sym)
                coding[0] += time.perf_counter() - begin
                return torch.from_numpy(sym)[None]

            arrays.append(decoder.decode(self._z_indexes(header.z_shape), self._z_tables))
            coding[0] += time.perf_counter() - start
            z_hat = torch.from_numpy(arrays[0]).to(self.device).float() + med
            y_hat, _ = self._entropy_parameters(z_hat[None], decode=decode, version=header.version)
            decoder.finish()
        except (CoderError, LatentRangeError) as exc:
            raise BitstreamError(f"corrupt entropy-coded data: {exc}") from exc
        if timings is not None:  # range decoding inside the loop counts as coding, not parameters
            spent = time.perf_counter() - start
            timings["entropy_parameters"] = timings.get("entropy_parameters", 0.0) + spent - coding[0]
            timings["entropy_coding"] = timings.get("entropy_coding", 0.0) + coding[0]
        if symbols_crc32(arrays) != header.symbol_crc32:
            raise BitstreamError(
                "decoded symbols do not match the encoder's checksum (corrupt stream, or a "
                "decoder that is not bit-exact with the encoder)"
            )
        return y_hat, arrays

    def warmup(self, qualities: list[float] | None = None, size: tuple[int, int] = (64, 64)) -> None:
        """Run every quality once so that first requests do not pay for lazy initialisation."""
        rng = np.random.default_rng(0)
        img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        for q in qualities or self.qualities:
            self.decompress(self.compress(img, q))
