"""Reproducible arithmetic: results that are the same bits on every IEEE-754 machine and library.

The entropy-parameter path decides the coding distributions, so the encoder and every decoder must
compute it to the last bit (issue 38; the failure it fixes is CompressAI issues #279 and #309). A
float32 network is not reproducible: oneDNN, MKL, onnxruntime and CUDA sum in different orders and
evaluate ``exp`` with different approximations. The kernels here follow Ballé, Johnston and Minnen,
"Integer networks for data compression with latent-variable models" (ICLR 2019): exact integer
accumulation, and nonlinearities with one defined rounding. The rules:

1. **Exact products.** Every matrix product and convolution multiplies 14-bit integer mantissas
   (block floating point: one power-of-two exponent per token row or per image for activations,
   per output channel for weights; :func:`block_quantize`), each split into two signed digits of
   at most 7 bits, ``m = 128 hi + lo`` (:func:`int8_digits`), and defines the product as
   ``2**7 (2**7 hi(a) hi(w) + hi(a) lo(w) + lo(a) hi(w))``: the ``lo lo`` term, below 2**-14 of
   the largest term, is left out. The digit products are accumulated exactly: on the CPU in int32
   with ``torch._int_mm`` (VNNI where the CPU has it; 7-bit digits never reach the int16
   saturation of AVX2's ``vpmaddubsw``), elsewhere in float64. The sum in brackets is an exact
   int32, rounded once to float32.
2. **Correctly rounded steps in a fixed order.** Everything else is a sequence of IEEE-754
   operations that the standard requires to be correctly rounded (+, -, *, /, sqrt,
   round-half-even, comparisons), one PyTorch operation each (no fused kernels, so no FMA
   contraction), or exact integer arithmetic (sums, prefix sums, shifts). Activations are float32.
   The C kernels of ``model/_exact_kernels.c`` fuse these steps for the CPU without changing them
   (compiled without FMA contraction or fast-math; tests compare the bits with this reference).
3. **No library transcendentals.** ``exp`` (and with it sigmoid) is looked up in two tables built
   with Python's :mod:`decimal` (correctly rounded, pure software) on a 2**-16 grid: :func:`exp_units`.
4. **Exact scaling.** Powers of two are built from their exponent bits (:func:`pow2`); no division by
   a Python scalar (CUDA replaces it with a multiplication by the reciprocal).
"""

from __future__ import annotations

import contextlib
import copy
import decimal
import hashlib
from collections.abc import Iterator
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # fused C kernels of the same arithmetic (model/_exact_kernels.c), built by `pip install`
    from model import _exact_kernels as _native
except ImportError:  # a checkout whose extension was not compiled: the PyTorch reference, same bits
    _native = None

MANTISSA_BITS = 14
"""Signed bits of every mantissa entering a product: ``|m| <= 8192`` splits into two signed digits
``m = 128 hi + lo`` with ``|hi|, |lo| <= 64`` (:func:`int8_digits`)."""

NORM_BITS = 12
"""Signed bits of a LayerNorm input row: its deviations from the mean and their squares are then
exact in float32, and their sums exact in float64."""

MAX_FAN_IN = 4032
"""Largest fan-in of a product: ``2**7 hi hi + hi lo + lo hi`` then stays below 2**31 (int32)."""

MAX_NORM_WIDTH = 1 << 20
"""Widest LayerNorm: its sum of squared deviations (each at most 2**24) stays below 2**53."""

SIGMOID_FRAC_BITS = 10
"""The sigmoid table is indexed by its argument rounded to 2**-10 (error at most 2**-12)."""

SIGMOID_RANGE = 16
"""The sigmoid table covers [-16, 16] (sigmoid(16) is 1 - 1.1e-7); arguments are clamped to it."""

EXP_FRAC_BITS = 16
"""Arguments of :func:`exp_units` are integers in units of 2**-16."""

EXP_RANGE = 48
""":func:`exp_units` clamps its argument to [-48, 48] (e^-48 ~ 1.4e-21)."""

_EXP_LOW_BITS = 8  # the argument splits into a high part (a table of 2 * 48 * 256 + 1) and 8 low bits
_EXP_LIMIT = EXP_RANGE << EXP_FRAC_BITS
_EXP_OFFSET = EXP_RANGE << (EXP_FRAC_BITS - _EXP_LOW_BITS)
_KEY_LIMIT = 255 << EXP_FRAC_BITS  # BiWKV keys are clamped to ±255 (differences still fit int32)

PROFILE_CACHE_LIMIT = 1 << 23
"""BiWKV keeps its decay profiles for the last token count while they hold at most this many values
(32 MB each: those of the entropy path and of a 768x512 image's g_a; larger images recompute
them per call, leaving no large cache behind)."""


_native_enabled = True


def native_kernels_available() -> bool:
    """Whether the fused C kernels (``model._exact_kernels``) were built for this installation."""
    return _native is not None


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Run the PyTorch reference of every kernel inside the block (tests and benchmarks compare the two)."""
    global _native_enabled
    saved, _native_enabled = _native_enabled, False
    try:
        yield
    finally:
        _native_enabled = saved


def _use_native(*tensors: Tensor) -> bool:
    """The C kernels serve CPU tensors when built and not switched off (and the products are int8,
    :func:`use_int8_products`); CUDA runs the reference."""
    return (
        _native is not None
        and _native_enabled
        and all(t.device.type == "cpu" for t in tensors)
        and use_int8_products(tensors[0].device)
    )


def bucketize(values: Tensor, boundaries: Tensor) -> Tensor:
    """``torch.bucketize(values, boundaries)`` as int32 (the number of boundaries below each value;
    NaN above all): comparisons only, so the same on every machine. The C kernel serves float32
    CPU tensors (a branch-free binary search over two threads: the decoder's table indexes in a
    third of PyTorch's time); PyTorch's search everything else."""
    if _use_native(values, boundaries) and values.dtype == boundaries.dtype == torch.float32:
        x, bounds = values.contiguous(), boundaries.contiguous()
        out = torch.empty(x.shape, dtype=torch.int32)
        _native.bucketize(x.data_ptr(), x.numel(), bounds.data_ptr(), bounds.numel(), out.data_ptr())
        return out
    return torch.bucketize(values.contiguous(), boundaries).to(torch.int32)


@lru_cache(maxsize=1)
def _native_tables() -> None:
    """Point the C kernels at the exp and sigmoid tables once (kept alive by their caches)."""
    high, low = _exp_tables()
    _native.set_tables(
        high.data_ptr(),
        low.data_ptr(),
        _sigmoid_table().data_ptr(),
        _EXP_LIMIT,
        _EXP_OFFSET,
        _EXP_LOW_BITS,
        SIGMOID_RANGE << SIGMOID_FRAC_BITS,
        SIGMOID_FRAC_BITS,
    )


def _rows(x: Tensor) -> Tensor:
    """``x`` as (rows, last dim) with unit stride along the last dim, as a view where one exists."""
    try:
        rows = x.view(-1, x.shape[-1])
    except RuntimeError:
        rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] <= 1 else rows.contiguous()


def pow2(exponent: Tensor) -> Tensor:
    """``2.0 ** exponent`` as float32, exactly, for integer exponents in [-126, 127] (from the bits)."""
    return torch.bitwise_left_shift(exponent.to(torch.int32) + 127, 23).view(torch.float32)


def pow2_double(exponent: Tensor) -> Tensor:
    """``2.0 ** exponent`` as float64, exactly, for integer exponents in [-1022, 1023] (from the bits)."""
    return torch.bitwise_left_shift(exponent.to(torch.int64) + 1023, 52).view(torch.float64)


def block_quantize(
    x: Tensor, bits: int, dims: int | tuple[int, ...], low: int = -100
) -> tuple[Tensor, Tensor]:
    """``x ≈ q * 2**-s``: integer-valued float32 ``q`` with ``|q| <= 2**(bits-1)``, one int32 ``s`` per block.

    A block is what ``dims`` spans (``s`` keeps those dims with size 1): its largest magnitude
    times ``2**s`` lies in [2**(bits-2), 2**(bits-1)]. The maximum, ``frexp``, the power-of-two
    scaling and the round-half-even are exact, so ``q`` and ``s`` are reproducible. Blocks below
    ``2**low`` are quantised as if their maximum were ``2**low`` (mostly to zero).
    """
    amax = x.abs().amax(dim=dims, keepdim=True)
    _, exponent = torch.frexp(amax)  # amax = m * 2**e with m in [0.5, 1); e = 0 for 0
    shift = (bits - 1) - exponent.clamp_min(low)
    return torch.round(x * pow2(shift)), shift


def ceil_log2(n: int) -> int:
    """The smallest ``e`` with ``2**e >= n`` (n >= 1)."""
    return max(0, (int(n) - 1).bit_length())


def round_div(numerator: Tensor, denominator: int) -> Tensor:
    """``numerator / denominator`` rounded to the nearest integer (halves up), for integer tensors."""
    return torch.div(2 * numerator + denominator, 2 * denominator, rounding_mode="floor")


@lru_cache(maxsize=1)
def _exp_tables() -> tuple[Tensor, Tensor]:
    """float32 ``e**(j / 256)`` for j in [-48 * 256, 48 * 256] and ``e**(l / 2**16)`` for l in [0, 256).

    Computed with :mod:`decimal` at 40 significant digits (correctly rounded) and rounded to
    float32 through float64, so every machine builds the same bits (:func:`exp_table_digest`).
    """
    ctx = decimal.Context(prec=40, rounding=decimal.ROUND_HALF_EVEN)
    span = EXP_RANGE << _EXP_LOW_BITS
    step = decimal.Decimal(1) / decimal.Decimal(1 << _EXP_LOW_BITS)
    e_step = ctx.exp(step)
    value = ctx.exp(-step * span)
    # repeated multiplication at 40 digits drifts by < 1e-34 relative over 24 577 steps
    high = []
    for _ in range(2 * span + 1):
        high.append(float(value))
        value = ctx.multiply(value, e_step)
    fine = decimal.Decimal(1) / decimal.Decimal(1 << EXP_FRAC_BITS)
    low = [float(ctx.exp(fine * i)) for i in range(1 << _EXP_LOW_BITS)]
    as_f32 = lambda xs: torch.tensor(xs, dtype=torch.float64).to(torch.float32)  # noqa: E731
    return as_f32(high), as_f32(low)


@lru_cache(maxsize=8)
def _exp_tables_on(device: torch.device) -> tuple[Tensor, Tensor]:
    high, low = _exp_tables()
    return high.to(device), low.to(device)


@lru_cache(maxsize=8)
def _sigmoid_table_on(device: torch.device) -> Tensor:
    return _sigmoid_table().to(device)


def exp_table_digest() -> str:
    """A short digest of the exp and sigmoid tables (tests pin it: a change would change every stream)."""
    high, low = _exp_tables()
    data = high.numpy().tobytes() + low.numpy().tobytes() + _sigmoid_table().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def exp_units(argument: Tensor) -> Tensor:
    """``e ** (argument / 2**16)`` for an int32 ``argument`` (clamped to ±48 * 2**16), float32.

    The product of two table entries, one correctly rounded multiplication: within 1.2e-7
    relative of the true value, and the same bits everywhere.
    """
    high, low = _exp_tables_on(argument.device)
    a = argument.clamp(-_EXP_LIMIT, _EXP_LIMIT)
    upper = torch.bitwise_right_shift(a, _EXP_LOW_BITS).add_(_EXP_OFFSET).reshape(-1)
    lower = torch.bitwise_and(a, (1 << _EXP_LOW_BITS) - 1).reshape(-1)
    return high.index_select(0, upper).mul_(low.index_select(0, lower)).view(argument.shape)


def to_exp_units(x: Tensor, limit: int = _EXP_LIMIT) -> Tensor:
    """float32 ``x`` on the 2**-16 grid of :func:`exp_units` (rounded half to even), clamped to
    ``±limit`` units (at most 2**24, where float32 still holds every integer), int32."""
    return torch.round(x * float(1 << EXP_FRAC_BITS)).clamp_(-limit, limit).to(torch.int32)


@lru_cache(maxsize=1)
def _sigmoid_table() -> Tensor:
    """float32 ``sigmoid(j / 1024)`` for j in [-16 * 1024, 16 * 1024], from :mod:`decimal` like the
    exp tables."""
    ctx = decimal.Context(prec=40, rounding=decimal.ROUND_HALF_EVEN)
    span = SIGMOID_RANGE << SIGMOID_FRAC_BITS
    step = ctx.exp(decimal.Decimal(-1) / decimal.Decimal(1 << SIGMOID_FRAC_BITS))  # e^{-1/1024}
    value = ctx.exp(decimal.Decimal(SIGMOID_RANGE))  # e^{-x} at x = -16
    out = []
    for _ in range(2 * span + 1):
        out.append(float(ctx.divide(1, ctx.add(1, value))))
        value = ctx.multiply(value, step)
    return torch.tensor(out, dtype=torch.float64).to(torch.float32)


def sigmoid(x: Tensor) -> Tensor:
    """``1 / (1 + e**-x)`` looked up at ``x`` rounded to 2**-10 (clamped to ±16), float32."""
    table = _sigmoid_table_on(x.device)
    span = SIGMOID_RANGE << SIGMOID_FRAC_BITS
    index = torch.round(x * float(1 << SIGMOID_FRAC_BITS)).clamp_(-span, span).to(torch.int32).add_(span)
    return table.index_select(0, index.reshape(-1)).view(x.shape)


def gated_residual(x: Tensor, gate: Tensor, value: Tensor, gamma: Tensor | None = None) -> Tensor:
    """``x + sigmoid(gate) * value`` (times ``gamma`` per channel before the sum, if given): the
    gated residual of the Channel Mix (Eq. 4) and of the parameter networks. Shapes (..., C)."""
    same_shape = x.shape == gate.shape == value.shape and (gamma is None or gamma.shape == x.shape[-1:])
    if same_shape and _use_native(x, gate, value, *([] if gamma is None else [gamma])):
        _native_tables()
        f32 = lambda t: t.to(torch.float32)  # noqa: E731
        xs, gs, vs = f32(x).contiguous(), _rows(f32(gate)), f32(value).contiguous()
        gamma32 = None if gamma is None else f32(gamma).contiguous()  # kept alive during the call
        out = torch.empty_like(xs)
        rows, cols = gs.shape
        g = 0 if gamma32 is None else gamma32.data_ptr()
        _native.sigmoid_gate(
            gs.data_ptr(), gs.stride(0), vs.data_ptr(), g, xs.data_ptr(), rows, cols, out.data_ptr()
        )
        return out
    mixed = sigmoid(gate).mul_(value)
    return x + (mixed if gamma is None else mixed.mul_(gamma))


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel block floating point of a weight ``(out, ...)``: integer-valued float32
    mantissas of :data:`MANTISSA_BITS` bits and the float32 scales ``2**-s`` ``(out,)``."""
    w = weight.detach().to(torch.float32)
    q, shift = block_quantize(w, MANTISSA_BITS, tuple(range(1, w.dim())))
    return q, pow2(-shift).reshape(-1)


def _digit_values(q: Tensor) -> tuple[Tensor, Tensor]:
    """The digits ``hi = round(q / 128)`` and ``lo = q - 128 hi`` as values of ``q``'s dtype."""
    hi = torch.round(q * (1.0 / 128))
    return hi, torch.sub(q, hi, alpha=128.0)  # exact integers: fused or not, the same value


def int8_digits(q: Tensor) -> tuple[Tensor, Tensor]:
    """``q = 128 hi + lo`` for integer-valued ``|q| <= 8192``: int8 ``hi`` and ``lo`` in [-64, 64]."""
    hi, lo = _digit_values(q)
    return hi.to(torch.int8), lo.to(torch.int8)


def int8_digit_rows(q: Tensor) -> Tensor:
    """The digits of :func:`int8_digits` side by side: ``[hi | lo]`` (M, 2K) int8 for ``q`` (M, K)
    (written straight into one buffer: the form :class:`ExactProduct` multiplies)."""
    k = q.shape[-1]
    both = torch.empty((q.shape[0], 2 * k), dtype=torch.int8, device=q.device)
    hi, lo = _digit_values(q)
    both[:, :k].copy_(hi)
    both[:, k:].copy_(lo)
    return both


def check_fan_in(weight_mantissas: Tensor, where: str) -> None:
    """Refuse a layer whose digit products could leave int32 (the fan-in limit)."""
    fan_in = weight_mantissas[0].numel() if weight_mantissas.numel() else 0
    if fan_in > MAX_FAN_IN:
        raise ValueError(f"{where}: fan-in {fan_in} above {MAX_FAN_IN}: products would not stay exact")


def use_int8_products(device: torch.device) -> bool:
    """Whether products run as int8 digit products (``torch._int_mm``, the CPU) or in float64."""
    return device.type == "cpu"


class ExactProduct:
    """``q @ W`` for mantissas ``q (M, K)`` (as int8 digits) and a fixed ``W (K, N)``, as rule 1 defines it.

    Returns the exact int32 ``2**7 hi(q) hi(W) + [hi(q) | lo(q)] [lo(W); hi(W)]`` as float32
    (one rounding); the caller scales it by ``2**7``. On the CPU the two digit products are int8
    with int32 accumulation (``torch._int_mm``), elsewhere float64; both give the same bits.
    """

    def __init__(self, weight: Tensor) -> None:
        hi, lo = int8_digits(weight.to(torch.float32))
        self.hi, self.cross = hi.contiguous(), torch.cat([lo, hi], dim=0)

    def to(self, device: torch.device | str) -> ExactProduct:
        self.hi, self.cross = self.hi.to(device), self.cross.to(device)
        return self

    def without_leading_inputs(self, n: int) -> ExactProduct:
        """The product of inputs whose first ``n`` (of K) are zero, by the other K - n rows of W: the
        same int32 sums (the zero terms dropped), K - n columns of digits to multiply instead of K."""
        k = self.hi.shape[0]
        if not 0 <= n < k:
            raise ValueError(f"cannot drop {n} of {k} inputs")
        sliced = copy.copy(self)
        sliced.hi = self.hi[n:].contiguous()
        sliced.cross = torch.cat([self.cross[n:k], sliced.hi], dim=0)
        return sliced

    def int32_parts(self, both: Tensor) -> tuple[Tensor, Tensor]:
        """The two int32 digit products ``[hi | lo] [lo(W); hi(W)]`` and ``hi hi(W)`` (CPU)."""
        hi = both[:, : self.hi.shape[0]]
        return torch._int_mm(both, self.cross), torch._int_mm(hi, self.hi)

    def __call__(self, both: Tensor, use_int8: bool | None = None) -> Tensor:
        """The product from the int8 digits ``[hi | lo]`` (M, 2K) of the mantissas
        (:func:`int8_digit_rows`)."""
        hi = both[:, : self.hi.shape[0]]
        if use_int8 is None:
            use_int8 = use_int8_products(hi.device)
        if use_int8:
            cross, high = self.int32_parts(both)
            inner = cross.add_(high, alpha=128)
        else:
            f64 = lambda t: t.to(torch.float64)  # noqa: E731
            inner = torch.matmul(f64(both), f64(self.cross)).add_(
                torch.matmul(f64(hi), f64(self.hi)), alpha=128
            )
        return inner.to(torch.float32)


def scale_and_bias(acc: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``acc * scale + bias`` over the last dim, ``acc`` in place: ``scale`` holds powers of two, so
    the product is exact and only the addition rounds (fused into an FMA or not, the same bits)."""
    if bias is None:
        return acc.mul_(scale)
    return torch.addcmul(bias, acc, scale)


PRODUCT_ROWS = 1 << 14
"""Rows per call of the C path's products: the two int32 digit products of a chunk stay small (and
in cache for the rescale) instead of eight bytes per output of a whole image's layer."""


def native_product(
    product: ExactProduct, digits: Tensor, shifts: Tensor, scale: Tensor, bias: Tensor | None
) -> Tensor:
    """The C path of a layer: the digit products of ``digits`` (M, 2K) by :data:`PRODUCT_ROWS`
    rows, each rescaled at once to ``float32(cross + 128 high) * 2**(7 - s) * scale + bias``
    (:func:`scale_and_bias`) with ``s`` the int32 ``shifts`` (M,) of the rows. (M, N) float32."""
    rows = digits.shape[0]
    out = torch.empty((rows, product.hi.shape[1]), dtype=torch.float32)
    b = 0 if bias is None else bias.data_ptr()
    for start in range(0, rows, PRODUCT_ROWS):
        stop = min(rows, start + PRODUCT_ROWS)
        cross, high = product.int32_parts(digits[start:stop])
        _native.rescale(
            cross.data_ptr(), high.data_ptr(), stop - start, out.shape[1], shifts[start:stop].data_ptr(),
            scale.data_ptr(), b, out[start:stop].data_ptr(),
        )  # fmt: skip
    return out


class ExactLinear:
    """``y = x W^T + b`` over the last dim: one exact product (rule 1), then scaling and the bias."""

    def __init__(self, weight: Tensor, bias: Tensor | None, where: str = "linear") -> None:
        q, scale = quantize_weight(weight)
        check_fan_in(q, where)
        self.product = ExactProduct(q.t())
        self.scale = scale
        self.bias = None if bias is None else bias.detach().to(torch.float32)
        self.out_features = q.shape[0]

    def to(self, device: torch.device | str) -> ExactLinear:
        self.product.to(device)
        self.scale = self.scale.to(device)
        self.bias = None if self.bias is None else self.bias.to(device)
        return self

    def without_leading_inputs(self, n: int) -> ExactLinear:
        """This layer for inputs whose first ``n`` features are zero, called on the other features:
        the same bits (the weights keep their per-channel exponents; a row's exponent is set by its
        largest magnitude, which the zeros do not change; the products drop zero terms only)."""
        layer = copy.copy(self)
        layer.product = self.product.without_leading_inputs(n)
        return layer

    def __call__(self, x: Tensor, use_int8: bool | None = None, square_relu: bool = False) -> Tensor:
        """The layer on ``x`` (..., in), or on ``relu(x)**2`` with ``square_relu`` (Channel Mix, Eq. 4)."""
        if use_int8 is not False and _use_native(x, self.scale):
            return self._native(x, square_relu)
        if square_relu:
            x = x.relu()
            x = x.mul_(x)
        q, shift = block_quantize(x, MANTISSA_BITS, -1)
        acc = self.product(int8_digit_rows(q.reshape(-1, q.shape[-1])), use_int8)
        return scale_and_bias(acc.view(*q.shape[:-1], -1).mul_(pow2(7 - shift)), self.scale, self.bias)

    def _native(self, x: Tensor, square_relu: bool) -> Tensor:
        rows = _rows(x.to(torch.float32))
        m, k = rows.shape
        both = torch.empty((m, 2 * k), dtype=torch.int8)
        shifts = torch.empty(m, dtype=torch.int32)
        _native.quantize_rows(
            rows.data_ptr(), m, k, rows.stride(0), MANTISSA_BITS, square_relu,
            both.data_ptr(), shifts.data_ptr(),
        )  # fmt: skip
        return native_product(self.product, both, shifts, self.scale, self.bias).view(
            *x.shape[:-1], self.out_features
        )


def conv_output_size(size: int, kernel: int, pad: int, stride: int) -> int:
    """The output length of a convolution along one axis."""
    return (size + 2 * pad - kernel) // stride + 1


def gather_taps(x: Tensor, taps: list[tuple[int, int]], pad: int, kernel: int, stride: int = 1) -> Tensor:
    """im2col of a ``(B, C, H, W)`` map: ``(B H' W', len(taps) C)``, row ``(b, y, x)`` holding
    ``x[b, :, stride y + dy - pad, stride x + dx - pad]`` for each tap ``(dy, dx)`` (zero outside)."""
    b, c, h, w = x.shape
    ho, wo = conv_output_size(h, kernel, pad, stride), conv_output_size(w, kernel, pad, stride)
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, pad, pad, pad, pad))  # (B, H + 2p, W + 2p, C)
    span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    cols = torch.stack(
        [padded[:, dy : dy + span_h : stride, dx : dx + span_w : stride] for dy, dx in taps], dim=3
    )
    return cols.reshape(b * ho * wo, len(taps) * c)


class ExactConv2d:
    """A 2-D convolution (zero padding, square kernel) of mantissas quantised per image.

    One exponent per image (all channels and positions), so the result does not depend on the
    batch. ``groups`` is 1 or the channel count (depthwise). Returns a channels-last map.

    - Dense, any ``stride``: the taps whose weights are not all zero (the checkerboard convolution
      has 12 of 25) gathered from the int8 digits (:func:`gather_taps`) into one :class:`ExactProduct`.
    - Depthwise (Omni-Shift): all four digit products, per digit of the input a sum of ``k * k``
      products below 2**24: on the CPU float32 convolutions (oneDNN; exact since every partial
      sum is an integer below 2**24), elsewhere unfold and float64 sums (CUDA may use TF32).
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        padding: int,
        groups: int = 1,
        where: str = "conv",
        stride: int = 1,
    ) -> None:
        out_ch, in_per_group, kernel, kernel_w = weight.shape
        if kernel != kernel_w:
            raise ValueError(f"{where}: square kernels only, got {tuple(weight.shape)}")
        if groups not in (1, out_ch) or (groups != 1 and in_per_group != 1):
            raise ValueError(f"{where}: groups must be 1 or depthwise, got {groups}")
        if groups != 1 and (stride != 1 or 2 * padding != kernel - 1 or kernel > 5):
            # k*k products of a 7-bit digit and a 14-bit weight: exact in float32 sums up to 5x5
            raise ValueError(f"{where}: depthwise convolutions are 'same' (stride 1), at most 5x5")
        q, scale = quantize_weight(weight)
        self.kernel, self.padding, self.groups, self.stride = kernel, padding, groups, stride
        self.scale = scale
        self.bias = None if bias is None else bias.detach().to(torch.float32)
        if groups == 1:
            live = q.abs().sum(dim=(0, 1)) > 0
            self.taps = [(dy, dx) for dy in range(kernel) for dx in range(kernel) if live[dy, dx]]
            rows = torch.stack([q[:, :, dy, dx] for dy, dx in self.taps], dim=1)  # (out, taps, in)
            check_fan_in(rows, where)
            self.product = ExactProduct(rows.reshape(out_ch, -1).t())
            self._taps = torch.tensor(self.taps, dtype=torch.int32).reshape(-1)
        else:
            self.weight = q  # (C, 1, k, k) mantissas
            self._taps_weight = q.reshape(out_ch, -1).t().contiguous()  # (k k, C) float32 mantissas

    def to(self, device: torch.device | str) -> ExactConv2d:
        self.scale = self.scale.to(device)
        self.bias = None if self.bias is None else self.bias.to(device)
        if self.groups == 1:
            self.product.to(device)
            self._taps = self._taps.to(device)
        else:
            self.weight = self.weight.to(device)
            self._taps_weight = self._taps_weight.to(device)
        return self

    def _depthwise(self, digits: Tensor, native: bool) -> Tensor:
        """The exact depthwise convolution of digit maps (N, C, H, W) (float32 integers of at most
        7 bits), float32 channels-last."""
        n, c, h, w = digits.shape
        if native:
            return F.conv2d(digits, self.weight, padding=self.padding, groups=c).permute(0, 2, 3, 1)
        taps = self.kernel * self.kernel
        cols = F.unfold(digits.to(torch.float64), self.kernel, padding=self.padding).view(n, c, taps, h * w)
        acc = (cols * self.weight.to(torch.float64).view(1, c, taps, 1)).sum(2).to(torch.float32)
        return acc.view(n, c, h, w).permute(0, 2, 3, 1)

    def _fused(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """:meth:`ExactConv2d.__call__` (or :meth:`at`) with the C kernels: reads ``x`` channels-first
        or channels-last as it lies in memory (the Bi-RWKV blocks pass a permuted token map)."""
        b, c, h, w = x.shape
        if self.groups != 1:
            xl = x.permute(0, 2, 3, 1).contiguous()
            out = torch.empty((b, h, w, c), dtype=torch.float32)
            _native.depthwise(
                xl.data_ptr(), b, h, w, c, self._taps_weight.data_ptr(), self.kernel, self.padding,
                MANTISSA_BITS, self.scale.data_ptr(), out.data_ptr(),
            )  # fmt: skip
            return out if self.bias is None else out.add_(self.bias)
        channels_last = x.permute(0, 2, 3, 1).is_contiguous()
        if not channels_last:
            x = x.contiguous()
        n_taps = len(self.taps)
        ho, wo = (conv_output_size(n, self.kernel, self.padding, self.stride) for n in (h, w))
        rows = torch.empty((b * ho * wo, 2 * n_taps * c), dtype=torch.int8)
        shifts = torch.empty(b, dtype=torch.int32)
        _native.conv_rows(
            x.data_ptr(), channels_last, b, c, h, w, self._taps.data_ptr(), n_taps, self.padding,
            self.stride, ho, wo, MANTISSA_BITS, rows.data_ptr(), shifts.data_ptr(),
        )  # fmt: skip
        n = ho * wo if positions is None else positions.numel()
        if positions is not None:
            rows = rows.view(b, ho * wo, -1).index_select(1, positions).view(b * n, -1)
        acc = native_product(self.product, rows, shifts.repeat_interleave(n), self.scale, self.bias)
        return acc.view(b, ho, wo, -1) if positions is None else acc.view(b, n, -1)

    def at(self, x: Tensor, positions: Tensor) -> Tensor:
        """The convolution of ``x`` (B, C, H, W) at the raster ``positions`` (n,) of its output only:
        (B, n, out) float32, the bits of ``self(x)`` at those positions (each output is its own exact
        sum; the per-image exponent is taken over all of ``x``), for the products of n rows, not all."""
        if self.groups != 1:
            raise ValueError("outputs at chosen positions are for dense convolutions")
        if _use_native(x, self.scale):
            return self._fused(x.to(torch.float32), positions)
        b = x.shape[0]
        out = self(x)
        return out.view(b, -1, out.shape[-1]).index_select(1, positions)

    def __call__(self, x: Tensor, native: bool | None = None) -> Tensor:
        """The convolution of ``x`` (B, C, H, W) as a channels-last ``(B, H', W', out)`` float32 map."""
        if native is not False and _use_native(x, self.scale):
            return self._fused(x.to(torch.float32))
        if native is None:
            native = use_int8_products(x.device)
        b, _, h, w = x.shape
        q, shift = block_quantize(x, MANTISSA_BITS, (1, 2, 3))
        if self.groups != 1:  # the two digits as float32 maps
            hi, lo = _digit_values(q)
            acc = self._depthwise(hi, native).mul_(128.0).add_(self._depthwise(lo, native))
            return scale_and_bias(acc.mul_(pow2(-shift).view(b, 1, 1, 1)), self.scale, self.bias)
        gather = lambda d: gather_taps(d, self.taps, self.padding, self.kernel, self.stride)  # noqa: E731
        cols = torch.cat([gather(d) for d in int8_digits(q)], dim=1)
        ho, wo = (conv_output_size(n, self.kernel, self.padding, self.stride) for n in (h, w))
        acc = self.product(cols, use_int8=native).view(b, ho, wo, -1).mul_(pow2(7 - shift).view(b, 1, 1, 1))
        return scale_and_bias(acc, self.scale, self.bias)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last dim with exact moments and correctly rounded scaling.

    Each row is quantised to :data:`NORM_BITS` bits (``x = q 2**-s``); the mean is the integer
    ``m = round(sum q / C)`` and ``var = sum (q - m)**2 / C``: every deviation and square is an
    exact float32 (``|q - m| <= 2**12``) and both sums accumulate exactly in float64. The result
    ``(q - m) / sqrt(var + eps 4**s)`` is ``(x - mean) / sqrt(var_x + eps)`` in the row's units
    (the row-level terms in float64, then one float32 division per element).
    """
    width = x.shape[-1]
    if width > MAX_NORM_WIDTH:
        raise ValueError(f"layer_norm: at most {MAX_NORM_WIDTH} channels, got {width}")
    if _use_native(x, weight, bias):
        xs = x.to(torch.float32).contiguous()
        out = torch.empty_like(xs)
        _native.layer_norm(
            xs.data_ptr(), xs.numel() // max(width, 1), width, NORM_BITS,
            weight.data_ptr(), bias.data_ptr(), float(eps), out.data_ptr(),
        )  # fmt: skip
        return out
    q, shift = block_quantize(x, NORM_BITS, -1)
    widths = torch.full(q.shape[:-1] + (1,), float(width), dtype=torch.float64, device=x.device)
    mean = torch.round(q.sum(-1, keepdim=True, dtype=torch.float64) / widths)
    dev = q.sub_(mean.to(torch.float32))  # |dev| <= 2**12: exact, and so is its square
    var = torch.mul(dev, dev).sum(-1, keepdim=True, dtype=torch.float64) / widths
    denom = torch.sqrt(var.add_(pow2_double(2 * shift).mul_(eps))).to(torch.float32)
    return dev.div_(denom).mul_(weight).add_(bias)


def to_fixed_units(parameter: Tensor) -> Tensor:
    """A float parameter in units of 2**-16, int64 (decay and boost of :func:`biwkv`)."""
    return torch.round(parameter.detach().to(torch.float64) * float(1 << EXP_FRAC_BITS)).to(torch.int64)


class BiWKV:
    """Bidirectional WKV (LALIC Eq. 3) of one Spatial Mix, reproducibly.

    ``wkv_t = (sum_{i != t} e^{-(|t-i|-1) w + k_i} v_i + e^{u + k_t} v_t) / (the same without v)``
    with ``w = decay / T`` and ``u = boost / T``. With ``m`` the row's largest ``k`` (it cancels),
    the left sum is ``e^{-(t-1) w} sum_{i<t} e^{i w} e^{k_i - m} v_i`` and the right one
    ``e^{(t+1) w} sum_{i>t} e^{-i w} e^{k_i - m} v_i``. Every exponential comes from
    :func:`exp_units` with its argument rounded to 2**-16 (``i w`` as ``round(i decay / T)``);
    the terms are converted to int64 fixed point with one exponent per row (62 bits for the
    whole row sum) and summed with exact integer prefix sums. Since ``|i w| <= |decay|``, no term
    exceeds ``e^{|decay|}``. The decay profiles depend only on ``T`` and are kept for the last one
    (:meth:`_exponentials`).
    """

    def __init__(self, decay: Tensor, boost: Tensor) -> None:
        self.decay = to_fixed_units(decay)  # (C,) int64
        self.boost = to_fixed_units(boost)
        self._by_token: tuple[int, tuple[Tensor, ...]] | None = None

    def to(self, device: torch.device | str) -> BiWKV:
        self.decay, self.boost = self.decay.to(device), self.boost.to(device)
        self._by_token = None
        return self

    def _exponentials(self, t: int) -> tuple[Tensor, Tensor, Tensor]:
        """``e^{i w}`` and ``e^{-i w}`` for i = -1 .. T, (T + 2, C) each, and ``e^u`` (C,), float32:
        every profile is a row range of the first two. Kept for the last ``T`` while they are small
        (:data:`PROFILE_CACHE_LIMIT` values); recomputed otherwise, so that a large image leaves no
        large cache behind."""
        if self._by_token is not None and self._by_token[0] == t:
            return self._by_token[1]
        steps = torch.arange(-1, t + 1, device=self.decay.device, dtype=torch.int64)
        grid = lambda a: round_div(a, t).clamp_(-_EXP_LIMIT, _EXP_LIMIT).to(torch.int32)  # noqa: E731
        iw = grid(steps[:, None] * self.decay[None, :])  # i * decay / T on the 2**-16 grid
        result = (exp_units(iw), exp_units(-iw), exp_units(grid(self.boost)))
        if iw.numel() <= PROFILE_CACHE_LIMIT:
            self._by_token = (t, result)
        return result

    def profiles(self, t: int) -> tuple[Tensor, ...]:
        """``e^{i w}``, ``e^{-i w}``, ``e^{-(t-1) w}``, ``e^{(t+1) w}`` (C, T) and ``e^u`` (C, 1), float32
        (views of :meth:`_exponentials`)."""
        up, down, own = self._exponentials(t)
        return up[1:-1].t(), down[1:-1].t(), down[:-2].t(), up[2:].t(), own[:, None]

    def gated(self, kvr: Tensor) -> Tensor:
        """``sigmoid(r) * wkv(k, v)`` for a channels-last ``[k | v | r]`` (B, T, 3C) -> (B, T, C):
        the Spatial Mix's receptance gate (Eq. 2) on this module's output."""
        b, t, c3 = kvr.shape
        c = c3 // 3
        if _use_native(kvr, self.decay):
            _native_tables()
            x = kvr.to(torch.float32).contiguous()
            up, down, own = self._exponentials(t)  # rows i = -1 .. T
            row = up.stride(0) * up.element_size()  # bytes per row
            out = torch.empty((b, t, c), dtype=torch.float32)
            _native.biwkv(
                x.data_ptr(), b, t, c,
                up.data_ptr() + row, down.data_ptr() + row,  # e^{t w}, e^{-t w}
                down.data_ptr(), up.data_ptr() + 2 * row,  # e^{-(t-1) w}, e^{(t+1) w}
                own.data_ptr(), _KEY_LIMIT, 62 - ceil_log2(t), out.data_ptr(),
            )  # fmt: skip
            return out
        k, v, r = kvr.transpose(1, 2).split(c, dim=1)  # (B, C, T) each
        return sigmoid(r).mul_(self(k, v)).transpose(1, 2)

    def __call__(self, k: Tensor, v: Tensor) -> Tensor:
        """``k``, ``v``: float32 (B, C, T) -> wkv (B, C, T) float32."""
        t = k.shape[-1]
        grow, shrink, to_left, to_right, own = self.profiles(t)
        kq = to_exp_units(k, _KEY_LIMIT)
        rel = exp_units(kq - kq.amax(-1, keepdim=True))  # e^{k - m} <= 1
        left = rel * grow
        right = rel * shrink
        mine = rel * own
        # every row of the four term sequences in int64 fixed point (62 bits for a whole row sum);
        # exclusive prefix sums, and suffix sums as the row total minus the inclusive prefix
        terms = torch.empty((4, *k.shape), dtype=torch.float32, device=k.device)
        torch.mul(left, v, out=terms[0])
        terms[1].copy_(left)
        torch.mul(right, v, out=terms[2])
        terms[3].copy_(right)
        q, shift = block_quantize(terms, 62 - ceil_log2(t), -1, low=-60)
        qi = q.to(torch.int64)
        inclusive = qi.cumsum(-1)
        scales = pow2(-shift)
        before = inclusive[:2].sub_(qi[:2]).to(torch.float32).mul_(scales[:2])
        after = inclusive[2:, ..., -1:].sub(inclusive[2:]).to(torch.float32).mul_(scales[2:])
        num = before[0].mul_(to_left).add_(after[0].mul_(to_right)).add_(mine * v)
        den = before[1].mul_(to_left).add_(after[1].mul_(to_right)).add_(mine)
        return num.div_(den)


__all__ = [
    "EXP_FRAC_BITS",
    "EXP_RANGE",
    "MANTISSA_BITS",
    "MAX_FAN_IN",
    "MAX_NORM_WIDTH",
    "PRODUCT_ROWS",
    "PROFILE_CACHE_LIMIT",
    "SIGMOID_FRAC_BITS",
    "SIGMOID_RANGE",
    "NORM_BITS",
    "BiWKV",
    "ExactConv2d",
    "ExactLinear",
    "ExactProduct",
    "block_quantize",
    "ceil_log2",
    "check_fan_in",
    "exp_table_digest",
    "exp_units",
    "gated_residual",
    "conv_output_size",
    "gather_taps",
    "int8_digit_rows",
    "int8_digits",
    "layer_norm",
    "native_kernels_available",
    "pow2",
    "pow2_double",
    "quantize_weight",
    "reference_kernels",
    "native_product",
    "round_div",
    "scale_and_bias",
    "sigmoid",
    "to_exp_units",
    "to_fixed_units",
    "use_int8_products",
]
