"""Coverage-guided fuzzing of the LALIC bitstream decoder with atheris (libFuzzer).

Two targets:

``parser``
    :func:`model.bitstream.read_header` and :func:`model.bitstream.unpack` on the raw input (the
    header and payload CRC checks included), then again on the input with its CRCs repaired (see
    :func:`repair_crcs`), to reach the field checks behind the CRCs. Fast: pure Python on a few KB.
``decoder``
    the shipped ``lalic-s`` weights: ``read_header`` then ``decompress_batch`` (what the
    service's /decompress runs), with the pixel limit at 256x256 so that every input stays cheap.
    Both CRCs of the input are repaired first (see :func:`repair_crcs`): otherwise almost every
    mutation would stop at a CRC check, and the range decoder and the network would never see it.

The contract under test: every input either decodes, or raises
:class:`~model.bitstream.BitstreamError`. Anything else is a crash, and so is:

- an input that costs more than ``--time-limit`` seconds of process CPU time (SIGPROF timer; CPU
  rather than wall time, so that a busy machine does not make slow inputs out of fast ones), with
  libFuzzer's own wall-clock ``-timeout`` (SIGALRM, ``--hang-timeout``) as a backstop for a hang
  inside C code;
- a peak RSS above ``--rss-limit-mb`` after any input (checked per input with ``getrusage``, and
  by libFuzzer's ``-rss_limit_mb`` thread);
- an accepted input that breaks an invariant: ``pack(*unpack(data)) == data`` and ``read_header``
  agreeing with ``unpack`` (parser); a uint8 image of the declared size (decoder).

Usage::

    python fuzz/fuzz_decoder.py --target parser --runs 1000000 --work-dir /tmp/fuzz-parser
    python fuzz/fuzz_decoder.py --target decoder --runs 200
    python fuzz/fuzz_decoder.py --target decoder --replay crash-1234abcd   # re-run inputs, no atheris
    python fuzz/fuzz_decoder.py --target parser -- -max_total_time=60    # extra libFuzzer flags

Seeds come from ``fuzz/corpus/`` (``python fuzz/make_corpus.py``); new inputs go to ``--work-dir``
(a fresh temporary folder by default), crash inputs to ``--artifacts``. A JSON progress line
(inputs, accepted, rejected, slowest input, peak RSS) goes to stderr every ``--stats-every``
seconds, beside libFuzzer's own lines (``cov:`` is the number of covered Python branches).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
TARGETS = ("parser", "decoder")
ACCEPTED = "accepted"
DECODER_MAX_PIXELS = 256 * 256
"""Pixel limit of the decoder target (the service uses max_pixels the same way): a mutated header
may declare up to this, so each input costs at most ~16 decodes of a 64x64 image."""
PARSER_MAX_PIXELS = 100_000_000
"""The parser's own default limit: the parser allocates nothing from declared sizes."""
DEFAULT_TIME_LIMIT_S = 2.0
DEFAULT_RSS_LIMIT_MB = 2048
DEFAULT_HANG_TIMEOUT_S = 60
DEFAULT_MAX_LEN = 8192
INSTRUMENTED = {
    "parser": ("model.bitstream",),
    "decoder": ("model.bitstream", "model.coder", "model.codec", "model.context", "model.entropy"),
}
"""Modules imported under atheris instrumentation: their Python branches (and those of the other
``model`` modules they import) feed coverage back to the fuzzer; torch and numpy are not traced."""

_MAGIC = b"LALC"
_PREFIX_SIZE = 7  # magic, version, flags, model id length
_FIXED_SIZE = 40  # digest, quality, height, width, y_shape, z_shape, tiling, symbol CRC, n_streams
_STREAM_LIMIT = 64  # the parser's default max_streams


class InputTimeoutError(BaseException):
    """An input ran past the CPU-time limit (a BaseException: no ``except Exception`` swallows it)."""


class InputMemoryError(BaseException):
    """The process's peak RSS went past the limit while running an input."""


class InvariantError(AssertionError):
    """An accepted input broke an invariant of the decoder's output."""


def repair_crcs(data: bytes) -> bytes:
    """Recompute the payload and header CRC32 of a container, leaving every other byte as it is.

    The payload CRC is taken over everything after the header (as if the declared stream lengths
    were right; if they are not, ``unpack`` still refuses the input). Inputs too short or too odd to
    locate the CRCs (no magic, truncated header, more streams than the parser allows) are returned
    unchanged.
    """
    if len(data) < _PREFIX_SIZE or not data.startswith(_MAGIC):
        return data
    id_len = data[6]
    n_pos = _PREFIX_SIZE + id_len + _FIXED_SIZE - 2
    if len(data) < n_pos + 2:
        return data
    (n_streams,) = struct.unpack_from("<H", data, n_pos)
    crc_pos = n_pos + 2 + 4 * n_streams
    if n_streams > _STREAM_LIMIT or len(data) < crc_pos + 8:
        return data
    payload_crc = zlib.crc32(data[crc_pos + 8 :])
    fixed = bytearray(data)
    struct.pack_into("<I", fixed, crc_pos, payload_crc)
    struct.pack_into("<I", fixed, crc_pos + 4, zlib.crc32(fixed[len(_MAGIC) : crc_pos + 4]))
    return bytes(fixed)


def _reason(exc: Exception) -> str:
    """A BitstreamError's message without its numbers: the rejection's kind, for the statistics."""
    return re.sub(r"[0-9]+", "N", str(exc).split(":")[0])[:60]


def parser_target() -> Callable[[bytes], str]:
    """The container parser: returns "accepted" or why it was rejected; raises on a contract violation."""
    from model.bitstream import BitstreamError, pack, read_header, unpack

    def parse(data: bytes) -> str:
        try:
            header = read_header(data, max_pixels=PARSER_MAX_PIXELS)
        except BitstreamError:
            header = None
        try:
            unpacked, streams = unpack(data, max_pixels=PARSER_MAX_PIXELS)
        except BitstreamError as exc:
            return _reason(exc)
        if header != unpacked:
            raise InvariantError(f"read_header gave {header}, unpack gave {unpacked}")
        if pack(unpacked, streams) != data:
            raise InvariantError("pack(*unpack(data)) differs from data")
        return ACCEPTED

    def run(data: bytes) -> str:
        raw = parse(data)
        repaired = repair_crcs(data)  # also past the CRC checks, to the field checks behind them
        return parse(repaired) if repaired != data else raw

    return run


def decoder_target() -> Callable[[bytes], str]:
    """The full decoder of the shipped weights, on the input with its CRCs repaired."""
    import torch

    from fuzz.make_corpus import make_codec  # the codec that wrote the seeds
    from model.bitstream import BitstreamError

    torch.set_num_threads(1)  # one thread throughout, entropy path included: the limit is CPU time
    codec = make_codec()

    def run(data: bytes) -> str:
        stream = repair_crcs(data)
        try:
            header = codec.read_header(stream, max_pixels=DECODER_MAX_PIXELS)
            (image,) = codec.decompress_batch([stream], max_pixels=DECODER_MAX_PIXELS)
        except BitstreamError as exc:
            return _reason(exc)
        if image.dtype.name != "uint8" or image.shape != (header.height, header.width, 3):
            raise InvariantError(
                f"decoded {image.dtype} {image.shape} for a {header.width}x{header.height} header"
            )
        return ACCEPTED

    return run


def _peak_rss_mb() -> float:
    """Peak resident set size of this process's own memory so far, in MiB.

    Linux's ``VmHWM`` (/proc/self/status), not ``getrusage``'s ``ru_maxrss``: the latter survives
    ``execve``, so a fuzzer started from a large process (a pytest run that had loaded models: 7 GB)
    would start above its limit. ``ru_maxrss`` is the fallback where /proc is missing.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Guard:
    """Wraps a target with the per-input CPU-time and RSS bounds, and keeps the statistics."""

    target: Callable[[bytes], str]
    name: str
    time_limit_s: float
    rss_limit_mb: float
    stats_every_s: float = 30.0
    runs: int = -1
    """The planned number of inputs: a last report is printed after that many (libFuzzer then exits)."""
    accepted: int = 0
    rejections: dict[str, int] = field(default_factory=dict)
    """Rejected inputs by kind (the BitstreamError message without numbers)."""
    inputs: int = 0
    slowest_s: float = 0.0
    started: float = field(default_factory=time.monotonic)
    _last_report: float = field(default_factory=time.monotonic)
    _timed_out: bool = False

    def __post_init__(self) -> None:
        signal.signal(signal.SIGPROF, self._on_timer)

    def _on_timer(self, signum: int, frame: FrameType | None) -> None:
        self._timed_out = True
        raise InputTimeoutError(f"input ran past {self.time_limit_s} s of CPU time")

    def __call__(self, data: bytes) -> None:
        """Run one input: BitstreamError and success pass, anything else propagates (a crash)."""
        self.inputs += 1
        self._timed_out = False
        started = time.process_time()
        signal.setitimer(signal.ITIMER_PROF, self.time_limit_s)
        try:
            outcome = self.target(data)
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        spent = time.process_time() - started
        # The model's own code may turn the timer's exception into a BitstreamError: check again.
        if self._timed_out or spent > self.time_limit_s:
            raise InputTimeoutError(f"input took {spent:.2f} s of CPU time (limit {self.time_limit_s} s)")
        self.slowest_s = max(self.slowest_s, spent)
        if outcome == ACCEPTED:
            self.accepted += 1
        else:
            self.rejections[outcome] = self.rejections.get(outcome, 0) + 1
        if _peak_rss_mb() > self.rss_limit_mb:
            raise InputMemoryError(f"peak RSS {_peak_rss_mb():.0f} MiB is above {self.rss_limit_mb} MiB")
        now = time.monotonic()
        if now - self._last_report >= self.stats_every_s or self.inputs == self.runs:
            self._last_report = now
            self.report()

    def summary(self) -> dict[str, Any]:
        """The statistics so far."""
        elapsed = time.monotonic() - self.started
        return {
            "target": self.name,
            "inputs": self.inputs,
            "accepted": self.accepted,
            "rejected": sum(self.rejections.values()),
            "elapsed_s": round(elapsed, 1),
            "inputs_per_s": round(self.inputs / elapsed, 1) if elapsed else 0.0,
            "slowest_input_s": round(self.slowest_s, 4),
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "rejections": dict(sorted(self.rejections.items(), key=lambda item: -item[1])[:40]),
        }

    def report(self) -> None:
        """One JSON line of statistics on stderr."""
        print("lalic-fuzz " + json.dumps(self.summary()), file=sys.stderr, flush=True)


def build_target(name: str, instrument: bool) -> Callable[[bytes], str]:
    """Import the target's modules (under atheris instrumentation if asked) and build it."""
    if name == "decoder":
        import numpy  # noqa: F401  # imported outside the instrumentation: only model.* is traced
        import torch  # noqa: F401
    if instrument:
        import atheris

        with atheris.instrument_imports(include=list(INSTRUMENTED[name])):
            for module in INSTRUMENTED[name]:
                __import__(module)
    return parser_target() if name == "parser" else decoder_target()


def replay(guard: Guard, paths: list[Path]) -> int:
    """Run the guarded target on files (and the files of folders); returns 0 if none crashed."""
    files = sorted(
        p for path in paths for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()
    )
    crashes = 0
    for path in files:
        try:
            guard(path.read_bytes())
        except (Exception, InputTimeoutError, InputMemoryError) as exc:
            crashes += 1
            print(f"CRASH {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
    guard.report()
    print(f"replayed {len(files)} inputs, {crashes} crash(es)", file=sys.stderr)
    return 1 if crashes else 0


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our flags, and the libFuzzer flags after ``--``."""
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", choices=TARGETS, default="parser", help="what to fuzz (default: parser)")
    parser.add_argument("--runs", type=int, default=-1, help="inputs to run, then stop (-1 = forever)")
    parser.add_argument(
        "--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S, help="CPU seconds per input"
    )
    parser.add_argument("--rss-limit-mb", type=int, default=DEFAULT_RSS_LIMIT_MB, help="peak RSS bound, MiB")
    parser.add_argument(
        "--hang-timeout", type=int, default=DEFAULT_HANG_TIMEOUT_S, help="libFuzzer wall-clock -timeout, s"
    )
    parser.add_argument("--max-len", type=int, default=DEFAULT_MAX_LEN, help="longest input, bytes")
    parser.add_argument("--seed", type=int, default=0, help="libFuzzer random seed (0 = from the clock)")
    parser.add_argument(
        "--corpus", type=Path, action="append", help="seed folder(s), read only (default: fuzz/corpus)"
    )
    parser.add_argument(
        "--work-dir", type=Path, help="where new inputs are kept (default: a temporary folder)"
    )
    parser.add_argument("--artifacts", type=Path, default=Path("."), help="folder for crash-* inputs")
    parser.add_argument("--stats-every", type=float, default=30.0, help="seconds between JSON progress lines")
    parser.add_argument("--replay", type=Path, nargs="+", help="run these inputs once, without atheris")
    return parser.parse_args(argv), extra


def main(argv: list[str] | None = None) -> int:
    """Fuzz (or replay) one target; libFuzzer exits the process itself at the end of a campaign."""
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    if args.replay:
        target = build_target(args.target, instrument=False)
        guard = Guard(target, args.target, args.time_limit, args.rss_limit_mb, args.stats_every)
        return replay(guard, args.replay)

    import atheris

    target = build_target(args.target, instrument=True)
    guard = Guard(target, args.target, args.time_limit, args.rss_limit_mb, args.stats_every, args.runs)
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix=f"lalic-fuzz-{args.target}-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    args.artifacts.mkdir(parents=True, exist_ok=True)
    seeds = args.corpus or [CORPUS_DIR]
    libfuzzer_argv = [
        sys.argv[0],
        f"-runs={args.runs}",
        f"-rss_limit_mb={args.rss_limit_mb}",
        f"-timeout={args.hang_timeout}",
        f"-max_len={args.max_len}",
        f"-seed={args.seed}",
        f"-artifact_prefix={args.artifacts}/",
        "-print_final_stats=1",
        "-use_value_profile=1",  # comparison operands as features: keeps distinct seeds, finds magic values
        *extra,
        str(work_dir),  # libFuzzer writes new inputs to the first folder only
        *(str(path) for path in seeds),
    ]
    print(
        f"lalic-fuzz target={args.target} work_dir={work_dir} seeds={[str(s) for s in seeds]}",
        file=sys.stderr,
    )
    atheris.Setup(libfuzzer_argv, guard)
    atheris.Fuzz()
    return 0  # not reached: libFuzzer exits


if __name__ == "__main__":
    sys.exit(main())
