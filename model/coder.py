"""Range coding of integer symbols with integer CDF tables (CompressAI layout) via ``constriction``.

Every table is an integer CDF with ``PRECISION`` bits of total mass; table ``i`` codes the values
``offsets[i] .. offsets[i] + pmf_len - 1`` as indices ``0 .. pmf_len - 1`` and has one extra
*overflow* symbol (index ``pmf_len``).  A value outside the table's range is coded as the overflow
symbol and its exact value is appended to a separate escape stream (zigzag LEB128 varints).

Symbols are grouped by table (stable order within a group) and every group is range coded with one
fixed categorical model, so there is no per-symbol Python work.  The model probabilities are the
exact floats ``freq / 2**PRECISION`` taken from the integer CDF, so encoder and decoder always build
bit-identical models.

Wire format of :func:`encode_symbols` (all integers little-endian)::

    varint  n_words        number of 32-bit range-coder words
    varint  n_escape       number of bytes in the escape stream
    u32[n_words]           range-coder words
    u8[n_escape]           escaped values, zigzag LEB128 varints, in C order of their positions

The byte string is exactly this long: trailing bytes are an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import constriction
import numpy as np

__all__ = [
    "PRECISION",
    "CdfTables",
    "CoderError",
    "SymbolDecoder",
    "SymbolEncoder",
    "decode_symbols",
    "encode_symbols",
    "pmf_to_quantized_cdf",
]

PRECISION = 16
"""CDF tables are integers summing to ``2**PRECISION``."""

_MAX_VARINT_BYTES = 10
_MAX_ESCAPE_BYTES = 5  # a zigzagged int32 needs at most 5 LEB128 bytes


class CoderError(ValueError):
    """Raised for malformed coded data (or tables/indexes that cannot be used)."""


def pmf_to_quantized_cdf(pmf: np.ndarray, precision: int = PRECISION) -> np.ndarray:
    """Quantise a float pmf to an integer CDF with an extra overflow symbol.

    Args:
        pmf: non-negative finite probabilities of the ``n`` in-range symbols.  They may sum to
            less than one: the missing tail mass ``1 - sum(pmf)`` goes to the overflow symbol.
        precision: number of bits of the total mass.

    Returns:
        int32 array of length ``n + 2``: ``cdf[0] == 0``, ``cdf[-1] == 2**precision`` and every
        symbol (the overflow symbol at index ``n`` included) has frequency ``>= 1``.

    After the initial rounding of ``pmf * 2**precision`` everything is integer arithmetic, so the
    result is deterministic.
    """
    p = np.asarray(pmf, dtype=np.float64).reshape(-1)
    n = p.size
    if not 1 <= precision <= 30:
        raise ValueError(f"precision must be in 1..30, got {precision}")
    total = 1 << precision
    if n < 1 or n + 1 > total:
        raise ValueError(f"pmf length must be in 1..{total - 1} for precision {precision}, got {n}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("pmf must be finite and non-negative")
    mass = float(p.sum())
    if mass > 1.0:
        p = p / mass
    tail = max(0.0, 1.0 - mass)
    freq = np.rint(np.append(p, tail) * total).astype(np.int64)
    np.maximum(freq, 1, out=freq)
    freq = _renormalize(freq, total)
    cdf = np.zeros(n + 2, dtype=np.int64)
    np.cumsum(freq, out=cdf[1:])
    return cdf.astype(np.int32)


def _renormalize(freq: np.ndarray, total: int) -> np.ndarray:
    """Rescale frequencies (each >= 1) with integer arithmetic so they sum to ``total`` exactly.

    The spare mass ``freq - 1`` of every symbol is scaled by ``target / spare_sum`` (floor), and
    the few units lost to flooring go one each to the symbols with the largest spare mass.
    """
    spare = freq - 1
    spare_sum = int(spare.sum())
    target = total - freq.size
    if spare_sum == target:
        return freq
    if spare_sum == 0:
        spare[-1] = target  # only reachable when almost every symbol has frequency 1
        return spare + 1
    scaled = (spare * target) // spare_sum
    missing = target - int(scaled.sum())  # 0 <= missing < freq.size
    scaled[np.argsort(-spare, kind="stable")[:missing]] += 1
    return scaled + 1


class CdfTables:
    """A set of integer CDF tables in CompressAI layout.

    Attributes:
        cdfs: int32 ``(n_tables, max_len)``; row ``i`` is valid up to ``cdf_lengths[i]``, the rest is 0.
        cdf_lengths: int32 ``(n_tables,)``, ``pmf_len + 2`` for each table.
        offsets: int32 ``(n_tables,)``; value ``v`` is coded as index ``v - offsets[i]`` in table ``i``.
    """

    cdfs: np.ndarray
    cdf_lengths: np.ndarray
    offsets: np.ndarray

    def __init__(self, cdfs: Any, cdf_lengths: Any, offsets: Any) -> None:
        """Validate and store the arrays (anything ``np.asarray`` accepts, e.g. CPU tensors)."""
        cdfs_a = np.array(cdfs, dtype=np.int64, copy=True)
        lengths = np.array(cdf_lengths, dtype=np.int64, copy=True).reshape(-1)
        offs = np.array(offsets, dtype=np.int64, copy=True).reshape(-1)
        _validate_tables(cdfs_a, lengths, offs)
        self.cdfs = cdfs_a.astype(np.int32)
        self.cdf_lengths = lengths.astype(np.int32)
        self.offsets = offs.astype(np.int32)
        self._pmf_lengths = self.cdf_lengths.astype(np.int64) - 2
        self._models: list[Any] | None = None
        for arr in (self.cdfs, self.cdf_lengths, self.offsets):
            arr.flags.writeable = False

    @classmethod
    def from_pmfs(cls, pmfs: Sequence[np.ndarray], offsets: Any) -> CdfTables:
        """Build tables from float pmfs (see :func:`pmf_to_quantized_cdf`) and integer offsets."""
        cdf_rows = [pmf_to_quantized_cdf(p, PRECISION) for p in pmfs]
        lengths = np.array([row.size for row in cdf_rows], dtype=np.int64)
        cdfs = np.zeros((len(cdf_rows), int(lengths.max(initial=0))), dtype=np.int64)
        for i, row in enumerate(cdf_rows):
            cdfs[i, : row.size] = row
        return cls(cdfs, lengths, offsets)

    @classmethod
    def from_arrays(cls, cdfs: Any, cdf_lengths: Any, offsets: Any) -> CdfTables:
        """Rebuild tables from the arrays of :meth:`to_arrays` (numpy arrays or CPU int tensors)."""
        return cls(cdfs, cdf_lengths, offsets)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Return ``{"cdfs", "cdf_lengths", "offsets"}`` as int32 numpy copies (for a state dict)."""
        return {
            "cdfs": self.cdfs.copy(),
            "cdf_lengths": self.cdf_lengths.copy(),
            "offsets": self.offsets.copy(),
        }

    @property
    def n_tables(self) -> int:
        """Number of tables."""
        return int(self.cdf_lengths.size)

    def pmf(self, i: int) -> np.ndarray:
        """Exact float64 probabilities of table ``i`` (``pmf_len + 1`` entries, overflow last)."""
        row = self.cdfs[i, : self.cdf_lengths[i]].astype(np.int64)
        return np.diff(row).astype(np.float64) / float(1 << PRECISION)

    def information_bits(self, symbols: np.ndarray, indexes: np.ndarray, escape_bits: float = 0.0) -> float:
        """``-sum log2 p`` of ``symbols`` under the tables ``indexes`` pick (what the range coder spends).

        A value outside its table costs the overflow symbol plus ``escape_bits`` (its escape varint,
        which the range coder does not code; 0 by default).
        """
        idx = _flat_indexes(np.asarray(indexes), self)
        coded = np.asarray(symbols).reshape(-1).astype(np.int64) - self.offsets[idx]
        outside = (coded < 0) | (coded >= self._pmf_lengths[idx])
        coded = np.where(outside, self._pmf_lengths[idx], coded)  # the overflow symbol
        freq = self.cdfs[idx, coded + 1].astype(np.int64) - self.cdfs[idx, coded]
        return float(np.sum(PRECISION - np.log2(freq)) + escape_bits * np.count_nonzero(outside))

    def models(self) -> list[Any]:
        """Constriction categorical models, one per table, built on first use and cached."""
        if self._models is None:
            self._models = [
                constriction.stream.model.Categorical(self.pmf(i), perfect=False)
                for i in range(self.n_tables)
            ]
        return self._models

    def __repr__(self) -> str:
        return f"CdfTables(n_tables={self.n_tables}, max_len={self.cdfs.shape[1]})"


def _validate_tables(cdfs: np.ndarray, lengths: np.ndarray, offsets: np.ndarray) -> None:
    if cdfs.ndim != 2:
        raise ValueError(f"cdfs must be 2-D, got shape {cdfs.shape}")
    n_tables, max_len = cdfs.shape
    if lengths.size != n_tables or offsets.size != n_tables:
        raise ValueError(
            f"need one cdf_length and one offset per table: {n_tables} tables, "
            f"{lengths.size} lengths, {offsets.size} offsets"
        )
    if n_tables and (lengths.min() < 3 or lengths.max() > max_len):
        raise ValueError(f"cdf_lengths must be in 3..{max_len}")
    if np.any(offsets < np.iinfo(np.int32).min) or np.any(offsets > np.iinfo(np.int32).max):
        raise ValueError("offsets must fit in int32")
    if np.any(offsets + lengths - 3 > np.iinfo(np.int32).max):
        raise ValueError("table ranges must fit in int32")
    for i in range(n_tables):
        row = cdfs[i, : lengths[i]]
        if row[0] != 0 or row[-1] != 1 << PRECISION or np.any(np.diff(row) < 1):
            raise ValueError(
                f"table {i} is not a valid CDF (must start at 0, end at 2**{PRECISION}, every frequency >= 1)"
            )


def _check_symbols(symbols: np.ndarray, indexes: np.ndarray) -> np.ndarray:
    sym = np.asarray(symbols)
    if sym.shape != np.asarray(indexes).shape:
        raise CoderError(f"symbols shape {sym.shape} != indexes shape {np.asarray(indexes).shape}")
    if sym.size and not np.issubdtype(sym.dtype, np.integer):
        raise CoderError(f"symbols must be integers, got {sym.dtype}")
    values = sym.reshape(-1).astype(np.int64)
    if values.size and (values.min() < np.iinfo(np.int32).min or values.max() > np.iinfo(np.int32).max):
        raise CoderError("symbols must fit in int32")
    return values


class SymbolEncoder:
    """Range codes several arrays one after another into one byte string.

    One range coder and one escape stream serve every :meth:`encode` call, so coding an image's
    passes together costs no per-pass padding or length fields. :class:`SymbolDecoder` must then
    decode the same arrays, with the same indexes and tables, in the same order.
    """

    def __init__(self) -> None:
        self._coder = constriction.stream.queue.RangeEncoder()
        self._escapes: list[np.ndarray] = []

    def encode(self, symbols: np.ndarray, indexes: np.ndarray, tables: CdfTables) -> None:
        """Queue ``symbols`` (any shape, C order) coded with the tables picked by ``indexes``."""
        values = _check_symbols(symbols, indexes)
        idx = _flat_indexes(np.asarray(indexes), tables)
        order, counts = _group(idx, tables.n_tables)
        coded = values[order] - np.repeat(tables.offsets.astype(np.int64), counts)
        pmf_len = np.repeat(tables._pmf_lengths, counts)
        overflow = (coded < 0) | (coded >= pmf_len)
        self._escapes.append(values[np.sort(order[overflow])])  # escapes in C order of positions
        coded[overflow] = pmf_len[overflow]
        coded32 = coded.astype(np.int32)
        models = tables.models()
        start = 0
        for t in np.flatnonzero(counts):
            stop = start + int(counts[t])
            self._coder.encode(coded32[start:stop], models[t])
            start = stop

    def finish(self) -> bytes:
        """The coded bytes (see the module docstring for the format)."""
        words = self._coder.get_compressed().astype("<u4", copy=False)
        escaped = np.concatenate(self._escapes) if self._escapes else np.zeros(0, np.int64)
        escapes = _encode_varints(_zigzag(escaped))
        return b"".join((_varint(words.size), _varint(len(escapes)), words.tobytes(), escapes))


class SymbolDecoder:
    """Decodes, call by call, what a :class:`SymbolEncoder` coded.

    Raises:
        CoderError: malformed data (bad or inconsistent lengths, truncated or trailing bytes, bad
            escapes, a constriction error) or indexes that do not fit the tables. Garbage may
            also decode without error into wrong values; callers verify a checksum.
    """

    def __init__(self, data: bytes) -> None:
        try:
            buf = memoryview(data).cast("B")
        except TypeError as exc:
            raise CoderError(f"data must be a bytes-like object, got {type(data).__name__}") from exc
        n_words, pos = _read_varint(buf, 0)
        n_escape, pos = _read_varint(buf, pos)
        if n_words * 4 + n_escape != len(buf) - pos:
            raise CoderError(
                f"declared sizes ({n_words} words + {n_escape} escape bytes) do not match the "
                f"{len(buf) - pos} bytes present"
            )
        words = np.frombuffer(buf, dtype="<u4", count=n_words, offset=pos).astype(np.uint32)
        escape_bytes = np.frombuffer(buf, dtype=np.uint8, count=n_escape, offset=pos + 4 * n_words)
        count = int(np.count_nonzero(escape_bytes < 0x80))
        self._escapes = _unzigzag(_decode_varints(escape_bytes, count))
        self._next_escape = 0
        try:
            self._coder = constriction.stream.queue.RangeDecoder(words)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # a Rust panic is a BaseException
            raise CoderError(f"range decoder failed: {exc!r}") from exc

    def decode(self, indexes: np.ndarray, tables: CdfTables) -> np.ndarray:
        """The next array: int32 values shaped like ``indexes``."""
        idx_in = np.asarray(indexes)
        idx = _flat_indexes(idx_in, tables)
        order, counts = _group(idx, tables.n_tables)
        grouped = np.empty(idx.size, dtype=np.int32)
        models = tables.models()
        try:
            start = 0
            for t in np.flatnonzero(counts):
                stop = start + int(counts[t])
                grouped[start:stop] = self._coder.decode(models[t], stop - start)
                start = stop
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # assorted errors on invalid data; a Rust panic is a BaseException
            raise CoderError(f"range decoder failed: {exc!r}") from exc
        pmf_len = np.repeat(tables._pmf_lengths.astype(np.int32), counts)
        if np.any((grouped < 0) | (grouped > pmf_len)):
            raise CoderError("range decoder produced a symbol outside its table")
        overflow = grouped == pmf_len
        values = np.empty(idx.size, dtype=np.int32)
        # int32 throughout (grouped and the tables' offsets): a scatter that converts costs 9x
        values[order] = grouped + np.repeat(tables.offsets, counts)
        if overflow.any():
            positions = np.sort(order[overflow])  # escapes are stored in C order of their positions
            first, self._next_escape = self._next_escape, self._next_escape + positions.size
            if self._next_escape > self._escapes.size:
                raise CoderError("more escaped symbols than escape values")
            escaped = self._escapes[first : self._next_escape]
            low = tables.offsets[idx[positions]].astype(np.int64)
            if np.any((escaped >= low) & (escaped < low + tables._pmf_lengths[idx[positions]])):
                raise CoderError("escaped value lies inside its table's range")
            values[positions] = escaped
        return values.reshape(idx_in.shape)

    def finish(self) -> None:
        """Check that every escape value was used (trailing data is an error)."""
        if self._next_escape != self._escapes.size:
            raise CoderError(f"{self._escapes.size - self._next_escape} unused escape values")


def encode_symbols(symbols: np.ndarray, indexes: np.ndarray, tables: CdfTables) -> bytes:
    """Range code signed integer ``symbols`` with the tables chosen by ``indexes`` (one array).

    Args:
        symbols: integer array (values must fit in int32), any shape, read in C order.
        indexes: integer array of the same shape; ``indexes[k]`` is the table for ``symbols[k]``.
        tables: the CDF tables.

    Returns:
        Self-contained coded bytes (see the module docstring for the format).
    """
    encoder = SymbolEncoder()
    encoder.encode(symbols, indexes, tables)
    return encoder.finish()


def decode_symbols(data: bytes, indexes: np.ndarray, tables: CdfTables) -> np.ndarray:
    """Decode the output of :func:`encode_symbols`; returns int32 values shaped like ``indexes``.

    Raises:
        CoderError: as :class:`SymbolDecoder`.
    """
    decoder = SymbolDecoder(data)
    values = decoder.decode(indexes, tables)
    decoder.finish()
    return values


def _flat_indexes(indexes: np.ndarray, tables: CdfTables) -> np.ndarray:
    """Flatten and check table indexes; returns int64."""
    if indexes.size and not np.issubdtype(indexes.dtype, np.integer):
        raise CoderError(f"indexes must be integers, got {indexes.dtype}")
    idx = indexes.reshape(-1).astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= tables.n_tables):
        raise CoderError(f"indexes must be in 0..{tables.n_tables - 1}")
    return idx


def _group(idx: np.ndarray, n_tables: int) -> tuple[np.ndarray, np.ndarray]:
    """Stable permutation grouping positions by table, and the size of each group."""
    key = idx.astype(np.uint16) if n_tables <= 1 << 16 else idx  # uint16 sorts by radix sort
    order = np.argsort(key, kind="stable")
    return order, np.bincount(idx, minlength=n_tables)


def _zigzag(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.int64)
    return ((v << 1) ^ (v >> 63)).astype(np.uint64)


def _unzigzag(u: np.ndarray) -> np.ndarray:
    u = u.astype(np.int64)
    return (u >> 1) ^ -(u & 1)


def _encode_varints(u: np.ndarray) -> bytes:
    """LEB128-encode non-negative integers (< 2**35) in order, vectorised."""
    if u.size == 0:
        return b""
    nbytes = 1 + sum((u >= (1 << (7 * k))).astype(np.int64) for k in range(1, _MAX_ESCAPE_BYTES))
    k = np.arange(_MAX_ESCAPE_BYTES, dtype=np.uint64)
    groups = (u[:, None] >> (np.uint64(7) * k)) & np.uint64(0x7F)
    more = k[None, :] < (nbytes[:, None] - 1).astype(np.uint64)
    out = (groups | (more.astype(np.uint64) << np.uint64(7))).astype(np.uint8)
    return out[k[None, :] < nbytes[:, None].astype(np.uint64)].tobytes()


def _decode_varints(buf: np.ndarray, count: int) -> np.ndarray:
    """Decode exactly ``count`` LEB128 varints (each a zigzagged int32) filling ``buf`` exactly."""
    ends = np.flatnonzero(buf < 0x80)
    if ends.size != count or (count and ends[-1] != buf.size - 1) or (not count and buf.size):
        raise CoderError(
            f"escape stream holds {ends.size} complete values in {buf.size} bytes, expected {count}"
        )
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > _MAX_ESCAPE_BYTES:
        raise CoderError("escape value longer than 5 bytes")
    out = np.zeros(count, dtype=np.uint64)
    for k in range(_MAX_ESCAPE_BYTES):
        has = lengths > k
        chunk = (buf[starts[has] + k] & 0x7F).astype(np.uint64)
        out[has] |= chunk << np.uint64(7 * k)
    if out.max() > 0xFFFFFFFF:
        raise CoderError("escape value does not fit in int32")
    return out


def _varint(n: int) -> bytes:
    """LEB128 encoding of one non-negative Python int."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """Read one LEB128 varint at ``pos``; returns (value, new position)."""
    value = 0
    for k in range(_MAX_VARINT_BYTES):
        if pos + k >= len(buf):
            raise CoderError("truncated length field")
        byte = buf[pos + k]
        value |= (byte & 0x7F) << (7 * k)
        if byte < 0x80:
            return value, pos + k + 1
    raise CoderError("length field longer than 10 bytes")
