"""Images to LALIC bitstreams and back: the API that the CLI and the service call.

A :class:`Codec` wraps a trained :class:`~model.lalic.LALIC` network prepared for inference.
``compress`` pads the image (edge replication, right and bottom) to a multiple of 64, runs
g_a and h_a, codes z with the factorised prior and y pass by pass with the RWKV-SCCTX model
(:meth:`~model.context.ContextModel.code`), and packs everything into one container
(:mod:`model.bitstream`). ``decompress`` reverses it, checks the CRC32 of the decoded symbols
against the one the encoder stored (a desynchronised decode is reported, never returned), and
crops the reconstruction back to the original size.

Determinism: the entropy-parameter path (h_s output onwards, which decides the coding
distributions) runs one image at a time, so a bitstream does not depend on what else was in
the batch. The torch thread count is pinned to 1 inside that path by default
(``entropy_threads``), so streams also do not depend on the caller's thread settings.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model.bitstream import BitstreamError, Header, pack, read_header, symbols_crc32, unpack
from model.coder import CoderError, decode_symbols, encode_symbols
from model.configs import get_config
from model.lalic import LALIC, PAD_MULTIPLE

STAGES = ("analysis", "hyper", "entropy_parameters", "synthesis", "entropy_coding")


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


def padded_size(height: int, width: int) -> tuple[int, int]:
    up = lambda n: -(-n // PAD_MULTIPLE) * PAD_MULTIPLE  # noqa: E731
    return up(height), up(width)


class Codec:
    """Image (uint8 RGB, H x W x 3) <-> bytes with one LALIC network."""

    def __init__(
        self,
        net: LALIC,
        *,
        device: str = "cpu",
        backend: str = "torch",
        entropy_threads: int | None = 1,
    ) -> None:
        if backend != "torch":
            raise ValueError(f"backend {backend!r} is not available (supported: torch)")
        self.device = str(device)
        self.backend = backend
        self.net = net.to(device).prepare_for_inference()
        if self.net.gaussian.y_cdfs.numel() == 0 or self.net.entropy_bottleneck.z_cdfs.numel() == 0:
            self.net.update()
        self.model_id = net.config.name
        self.digest = state_digest(self.net)
        self.entropy_threads = entropy_threads
        self._y_tables = self.net.gaussian.tables()
        self._z_tables = self.net.entropy_bottleneck.tables()

    # Construction -------------------------------------------------------------------------
    @classmethod
    def random(cls, config: str = "lalic-s", seed: int = 0, **kwargs) -> Codec:
        """A codec with randomly initialised weights (tests, benchmarks)."""
        torch.manual_seed(seed)
        return cls(LALIC(get_config(config)), **kwargs)

    @classmethod
    def from_pretrained(cls, weights: str | None = None, **kwargs) -> Codec:
        """The shipped weights (``weights=None``) or a weight file written by ``lalic`` tools."""
        from model.zoo import load_network

        return cls(load_network(weights), **kwargs)

    @property
    def weights_digest(self) -> str:
        return self.digest.hex()

    @property
    def qualities(self) -> tuple[float, ...]:
        return self.net.qualities

    @staticmethod
    def padded_shape(height: int, width: int) -> tuple[int, int]:
        return padded_size(height, width)

    def read_header(self, data: bytes, max_pixels: int = 100_000_000) -> Header:
        return read_header(data, max_pixels=max_pixels)

    def _check_quality(self, quality: float) -> float:
        q = float(quality)
        lo, hi = self.qualities[0], self.qualities[-1]
        if not (lo <= q <= hi):  # also rejects NaN
            raise ValueError(f"quality must be within [{lo:g}, {hi:g}], got {quality!r}")
        return float(np.float32(q))  # the container stores float32: use exactly that value

    # Compression ---------------------------------------------------------------------------
    def compress(self, image: np.ndarray, quality: float) -> bytes:
        return self.compress_batch([image], quality)[0]

    def decompress(self, data: bytes) -> np.ndarray:
        return self.decompress_batch([data])[0]

    def _to_tensor(self, images: list[np.ndarray]) -> torch.Tensor:
        h, w = images[0].shape[:2]
        hp, wp = padded_size(h, w)
        x = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        return F.pad(x, (0, wp - w, 0, hp - h), mode="replicate") if (hp, wp) != (h, w) else x

    @torch.inference_mode()
    def compress_batch(
        self, images: list[np.ndarray], quality: float, timings: dict[str, float] | None = None
    ) -> list[bytes]:
        """Compress images that share a padded shape; identical output to one-by-one calls."""
        q = self._check_quality(quality)
        if not images:
            return []
        for img in images:
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
                raise ValueError(f"expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
        shapes = {padded_size(*img.shape[:2]) for img in images}
        if len(shapes) != 1:
            raise ValueError(f"images in one batch must share a padded shape, got {sorted(shapes)}")
        timer = _Timer(timings)
        net = self.net
        qt = torch.full((len(images),), q, device=self.device)
        with timer("analysis"):
            y = net.analysis(self._to_tensor(images), qt)
        with timer("hyper"):
            z = net.h_a(y)
            med = net.entropy_bottleneck.medians().view(1, -1, 1, 1)
            z_sym = torch.round(z - med).to(torch.int32)
            z_hat = z_sym.float() + med
        out = []
        for i, img in enumerate(images):
            with timer("entropy_parameters"), torch_threads(self.entropy_threads):
                hyper = net.h_s(z_hat[i : i + 1])
                _, passes = net.context.code(hyper, net.gaussian.indexes, y=y[i : i + 1])
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
                )
                out.append(pack(header, streams))
        return out

    def _z_indexes(self, shape: tuple[int, ...]) -> np.ndarray:
        c = shape[0]
        return np.broadcast_to(np.arange(c, dtype=np.int32)[:, None, None], shape)

    def _encode_streams(self, z_sym: torch.Tensor, passes) -> tuple[list[bytes], list[np.ndarray]]:
        z_np = z_sym.cpu().numpy()
        arrays = [z_np]
        streams = [encode_symbols(z_np, self._z_indexes(z_np.shape), self._z_tables)]
        for symbols, indexes in passes:
            s, ix = symbols[0].cpu().numpy(), indexes[0].cpu().numpy()
            arrays.append(s)
            streams.append(encode_symbols(s, ix, self._y_tables))
        return streams, arrays

    # Decompression -------------------------------------------------------------------------
    def _parse(self, data: bytes, max_pixels: int) -> tuple[Header, list[bytes]]:
        header, streams = unpack(data, max_pixels=max_pixels)
        c = self.net.config
        if header.model_id != self.model_id or header.weights_digest != self.digest:
            raise BitstreamError(
                f"stream was made by {header.model_id}@{header.weights_digest.hex()}, "
                f"this codec is {self.model_id}@{self.weights_digest}"
            )
        self._check_quality(header.quality)
        hp, wp = padded_size(header.height, header.width)
        want_y = (c.latent, hp // 16, wp // 16)
        want_z = (c.hyper_latent, hp // 64, wp // 64)
        if header.y_shape != want_y or header.z_shape != want_z:
            raise BitstreamError(
                f"latent shapes {header.y_shape}/{header.z_shape} do not match a "
                f"{header.height}x{header.width} image ({want_y}/{want_z})"
            )
        if header.tiling != (0, 0, 0):
            raise BitstreamError(f"tiled streams are not supported by this decoder: {header.tiling}")
        if len(streams) != 1 + self.net.context.num_passes:
            raise BitstreamError(f"expected {1 + self.net.context.num_passes} streams, got {len(streams)}")
        return header, streams

    @torch.inference_mode()
    def decompress_batch(
        self,
        streams: list[bytes],
        timings: dict[str, float] | None = None,
        max_pixels: int = 100_000_000,
    ) -> list[np.ndarray]:
        """Decode streams of one padded shape and quality; raises BitstreamError on any fault."""
        if not streams:
            return []
        parsed = [self._parse(bytes(d), max_pixels) for d in streams]
        keys = {(padded_size(h.height, h.width), h.quality) for h, _ in parsed}
        if len(keys) != 1:
            raise ValueError("streams in one batch must share padded shape and quality")
        timer = _Timer(timings)
        net = self.net
        med = net.entropy_bottleneck.medians().view(-1, 1, 1)
        y_hats = []
        for header, parts in parsed:
            arrays: list[np.ndarray] = []
            try:
                with timer("entropy_coding"):
                    z_idx = self._z_indexes(header.z_shape)
                    z_sym = decode_symbols(parts[0], z_idx, self._z_tables)
                    arrays.append(z_sym)
                z_hat = torch.from_numpy(z_sym).to(self.device).float() + med

                coding = [0.0]

                def decode(i: int, indexes: torch.Tensor, parts=parts, arrays=arrays, coding=coding):
                    start = time.perf_counter()
                    sym = decode_symbols(parts[1 + i], indexes[0].cpu().numpy(), self._y_tables)
                    arrays.append(sym)
                    coding[0] += time.perf_counter() - start
                    return torch.from_numpy(sym)[None]

                start = time.perf_counter()
                with torch_threads(self.entropy_threads):
                    hyper = net.h_s(z_hat[None])
                    y_hat, _ = net.context.code(hyper, net.gaussian.indexes, decode=decode)
                if timings is not None:  # the range decoding inside the loop counts as coding
                    spent = time.perf_counter() - start
                    timings["entropy_parameters"] = timings.get("entropy_parameters", 0.0) + spent - coding[0]
                    timings["entropy_coding"] = timings.get("entropy_coding", 0.0) + coding[0]
            except CoderError as exc:
                raise BitstreamError(f"corrupt entropy-coded data: {exc}") from exc
            if symbols_crc32(arrays) != header.symbol_crc32:
                raise BitstreamError(
                    "decoded symbols do not match the encoder's checksum (corrupt stream, or a "
                    "decoder that is not bit-exact with the encoder)"
                )
            y_hats.append(y_hat)
        header = parsed[0][0]
        with timer("synthesis"):
            qt = torch.full((len(parsed),), header.quality, device=self.device)
            x_hat = net.synthesis(torch.cat(y_hats), qt)
            pixels = x_hat.clamp_(0, 1).mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [np.ascontiguousarray(pixels[i, : h.height, : h.width]) for i, (h, _) in enumerate(parsed)]

    def warmup(self, qualities: list[float] | None = None, size: tuple[int, int] = (64, 64)) -> None:
        """Run every quality once so that first requests do not pay for lazy initialisation."""
        rng = np.random.default_rng(0)
        img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        for q in qualities or self.qualities:
            self.decompress(self.compress(img, q))
