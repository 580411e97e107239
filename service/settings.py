"""Service settings, read from ``LALIC_*`` environment variables (and CLI flags, see :mod:`service.cli`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.bitstream import MAX_QUALITY, MIN_QUALITY

Device = Literal["auto", "cpu", "cuda"]
Backend = Literal["torch", "torchscript", "onnxruntime"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
LogFormat = Literal["json", "text"]


def _split_list(value: object) -> object:
    """``"a,b"`` and ``"[a, b]"`` strings become lists (empty parts dropped); other values pass."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


API_KEY_MIN_LENGTH = 16
API_KEY_MAX_LENGTH = 256


API_KEY_RULE = (
    f"each API key must have {API_KEY_MIN_LENGTH}..{API_KEY_MAX_LENGTH} visible ASCII characters "
    "(no spaces, no commas)"
)
"""The rule for API keys, as the start-up error and the documentation state it."""


def _check_key(key: str) -> None:
    """An API key is 16..256 visible ASCII characters (no spaces, no commas); the key is never echoed."""
    if not API_KEY_MIN_LENGTH <= len(key) <= API_KEY_MAX_LENGTH:
        raise ValueError(f"a key has {len(key)} characters; {API_KEY_RULE}")
    if not all("!" <= ch <= "~" and ch != "," for ch in key):
        raise ValueError(f"a key has a space, comma or non-ASCII character; {API_KEY_RULE}")


class Settings(BaseSettings):
    """Every knob of the REST service. Each field maps to ``LALIC_<NAME>`` and ``--<name>`` on the CLI."""

    model_config = SettingsConfigDict(env_prefix="LALIC_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Interface to bind the HTTP server to.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on (0 = any free port).")
    device: Device = Field(
        "auto", description="Compute device: auto (CUDA if available, else CPU), cpu, cuda."
    )
    backend: Backend = Field(
        "torchscript", description="Inference backend: torchscript, torch (eager) or onnxruntime."
    )
    weights: str | None = Field(
        None, description="Path to a weights file; unset = the shipped default weights."
    )
    lazy_weights: bool = Field(
        False,
        description="With a weight set of per-quality networks (lalic import): load and warm up one "
        "network at start and each other quality's network on its first request, in the worker "
        "(that request waits for the load); /readyz and /v1/models say which are loaded. Off: all "
        "at start. No effect on a single variable-rate network such as lalic-s.",
    )
    model: str = Field("lalic-s", description="Model configuration name (used with random_weights).")
    random_weights: bool = Field(
        False, description="Use randomly initialised weights (seed 0) instead of trained ones; for tests."
    )
    qualities: Annotated[tuple[float, ...], NoDecode] = Field(
        (1.0, 2.0, 3.0, 4.0, 5.0, 6.0),
        description="Quality anchors to load and warm up (comma-separated); requests may use any value "
        "between two loaded anchors.",
    )
    max_batch_size: int = Field(8, ge=1, le=256, description="Largest batch the worker runs at once.")
    max_batch_delay_ms: float = Field(
        5.0, ge=0, le=10_000, description="How long the worker waits for a batch to fill, in milliseconds."
    )
    queue_size: int = Field(
        64, ge=1, description="Requests waiting for the worker beyond this are refused with 503."
    )
    max_body_bytes: int = Field(50_000_000, ge=1, description="Largest accepted request body, in bytes.")
    max_pixels: int = Field(
        36_000_000, ge=1, description="Largest accepted image (width x height), in pixels."
    )
    min_side: int = Field(1, ge=1, description="Smallest accepted image width or height, in pixels.")
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Per-request deadline in seconds; a request that cannot meet it gets 503 at once "
        "(413 for an image too large to ever meet it), and work past it is abandoned.",
    )
    admission_factor: float = Field(
        1.0,
        ge=0,
        le=100,
        description="Safety factor on the cost model's estimates when admitting work: a request is "
        "refused at once when factor x (estimated wait + run time) exceeds its remaining deadline, and "
        "with 413 when factor x its run time on an idle worker exceeds request_timeout_s. Above 1 "
        "refuses earlier; below 1 admits work that may be abandoned at its deadline; 0 turns "
        "admission control off (deadlines are still enforced while running).",
    )
    max_header_bytes: int = Field(
        16384,
        ge=1024,
        le=1 << 20,
        description="Largest request line plus headers, in bytes; beyond it the server answers 431 and "
        "closes the connection.",
    )
    max_header_count: int = Field(
        100, ge=8, le=10_000, description="Most request headers; more get 431 and the connection closed."
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has to send the request line and headers, from connecting or "
        "from the end of the previous response; then 408 (or a silent close if it sent nothing).",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Seconds a client has to send the whole body once the headers arrived; then 408 "
        "and the connection is closed.",
    )
    keep_alive_timeout_s: float = Field(
        5.0, gt=0, description="Seconds an idle keep-alive connection stays open between requests."
    )
    max_connections: int = Field(
        512,
        ge=1,
        description="Most open client connections; requests on connections beyond it get 503 "
        "too_many_connections and the connection is closed.",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads for the worker; unset = torch's default."
    )
    synthesis_precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Precision of the synthesis transform g_s (decoding only): bfloat16 is faster on "
        "CPUs with AVX512-BF16 or AMX (about 0.7x g_s's time on an AMD EPYC) and changes decoded pixels "
        "slightly (PSNR within 0.02 dB on Kodak), never the bitstreams; needs backend torch or "
        "torchscript. auto: bfloat16 on such a CPU with backend torch or torchscript, else float32.",
    )
    analysis_precision: Literal["auto", "float32", "bfloat16", "exact"] = Field(
        "auto",
        description="Precision of the analysis transforms g_a and h_a (encoding only): bfloat16 is "
        "faster on CPUs with AVX512-BF16 and changes the latents this service sends (valid streams for "
        "every decoder; rate and PSNR in BENCHMARKS.md); needs backend torch or torchscript. exact: the "
        "reproducible arithmetic of the entropy path, so that every replica, CPU and backend writes the "
        "same bytes for one image (slower; BENCHMARKS.md, 'Portable streams'). auto: bfloat16 on such a "
        "CPU with backend torch or torchscript, else float32.",
    )
    stream_version: int = Field(
        2,
        ge=1,
        le=2,
        description="Container version this service writes; both are always read. 2: the portable "
        "entropy path, whose streams every decoder reproduces on any CPU, backend or device. 1: the "
        "float32 entropy path of releases before 2026-12-06, only for a rolling upgrade while some "
        "replicas cannot read version 2 (its streams decode only on the kind of CPU and backend that "
        "wrote them).",
    )
    entropy_threads: int = Field(
        2,
        ge=1,
        le=64,
        description="torch intra-op threads of the entropy-parameter path (h_s and the context "
        "networks), pinned whatever torch_threads says. Streams of format version 2 (what this "
        "service writes) decode identically with any value on any CPU; version-1 streams (older "
        "releases) only with the thread count and CPU kind that coded them.",
    )
    log_level: LogLevel = Field("info", description="Log level of the service and uvicorn.")
    log_format: LogFormat = Field(
        "json",
        description="json: one JSON object per line (a line per request, with its request id); "
        "text: human-readable lines.",
    )
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (),
        description="API keys (comma-separated), each 16..256 visible ASCII characters without spaces "
        "or commas; when any key is set (here or in api_keys_file), requests need "
        "'Authorization: Bearer <key>'. Prefer api_keys_file: flags show in ps.",
    )
    api_keys_file: Path | None = Field(
        None,
        description="File of API keys, one per line ('#' comments and blank lines ignored); "
        "read at start-up, added to api_keys.",
    )
    auth_protect_ops: bool = Field(
        False,
        description="With API keys, also require a key for /healthz, /readyz and /metrics "
        "(default: open, for probes and scrapers).",
    )
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Origins allowed by CORS (comma-separated, '*' for any); empty = CORS off.",
    )

    @field_validator("qualities", mode="before")
    @classmethod
    def _split_qualities(cls, value: object) -> object:
        """Accept ``"1,2,3"`` and ``"[1, 2, 3]"`` strings besides sequences."""
        if isinstance(value, str):
            return [part for part in value.strip().strip("[]").replace(" ", "").split(",") if part]
        return value

    @field_validator("qualities")
    @classmethod
    def _check_qualities(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        """Qualities must be whole anchors in [1, 6]; they are returned sorted and deduplicated."""
        if not value:
            raise ValueError("at least one quality is required")
        for quality in value:
            if not float(quality).is_integer() or not MIN_QUALITY <= quality <= MAX_QUALITY:
                raise ValueError(f"quality anchors are whole numbers in [1, 6], got {quality}")
        return tuple(sorted(set(value)))

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_lists(cls, value: object) -> object:
        """Accept ``"a,b"`` and ``"[a, b]"`` strings besides sequences."""
        return _split_list(value)

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        """Keys are 16..256 visible ASCII characters without spaces or commas (what fits a Bearer token)."""
        for number, key in enumerate(value, 1):
            try:
                _check_key(key.get_secret_value())
            except ValueError as exc:
                raise ValueError(f"key {number} of {len(value)}: {exc}") from None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_log_level(cls, value: object) -> object:
        """Log levels are case-insensitive."""
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_weights(self) -> Settings:
        """``weights`` and ``random_weights`` are mutually exclusive."""
        if self.random_weights and self.weights is not None:
            raise ValueError("set either weights or random_weights, not both")
        return self

    @model_validator(mode="after")
    def _check_precision(self) -> Settings:
        """bfloat16 g_s and g_a run in torch (eager or scripted), not in ONNX Runtime."""
        for name in ("synthesis_precision", "analysis_precision"):
            if getattr(self, name) == "bfloat16" and self.backend == "onnxruntime":
                raise ValueError(f"{name} {getattr(self, name)} needs backend torch or torchscript")
        return self

    def load_api_keys(self) -> tuple[str, ...]:
        """``api_keys`` plus the keys of ``api_keys_file`` (read now), deduplicated.

        Raises:
            ValueError: the file cannot be read or holds an invalid key (the service refuses to start
                rather than run open by mistake).
        """
        keys = [key.get_secret_value() for key in self.api_keys]
        if self.api_keys_file is not None:
            try:
                text = self.api_keys_file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read api_keys_file {self.api_keys_file}: {exc}") from None
            for number, line in enumerate(text.splitlines(), 1):
                key = line.split("#", 1)[0].strip()
                if key:
                    try:
                        _check_key(key)
                    except ValueError as exc:
                        raise ValueError(f"{self.api_keys_file}:{number}: {exc}") from None
                    keys.append(key)
        return tuple(dict.fromkeys(keys))

    @property
    def max_batch_delay_s(self) -> float:
        """The batch delay in seconds."""
        return self.max_batch_delay_ms / 1000.0

    def quality_served(self, quality: float) -> bool:
        """Whether ``quality`` lies in [1, 6] with both neighbouring anchors loaded."""
        if not MIN_QUALITY <= quality <= MAX_QUALITY:
            return False
        return float(math.floor(quality)) in self.qualities and float(math.ceil(quality)) in self.qualities
