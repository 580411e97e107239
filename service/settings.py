"""Service settings, read from ``LALIC_*`` environment variables (and CLI flags, see :mod:`service.cli`)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

QUALITY_MIN = 1.0
QUALITY_MAX = 6.0

Device = Literal["auto", "cpu", "cuda"]
Backend = Literal["torch", "torchscript", "onnxruntime"]
LogLevel = Literal["critical", "error", "warning", "info", "debug"]


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
        30.0, gt=0, description="Per-request deadline in seconds; requests that cannot meet it get 503."
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads for the worker; unset = torch's default."
    )
    entropy_workers: int | None = Field(
        None,
        ge=1,
        description="Parallel entropy-coding workers, passed to the codec if it takes them "
        "(the current codec codes sequentially: ignored with a warning).",
    )
    log_level: LogLevel = Field("info", description="Log level of the service and uvicorn.")

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
            if not float(quality).is_integer() or not QUALITY_MIN <= quality <= QUALITY_MAX:
                raise ValueError(f"quality anchors are whole numbers in [1, 6], got {quality}")
        return tuple(sorted(set(value)))

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

    @property
    def max_batch_delay_s(self) -> float:
        """The batch delay in seconds."""
        return self.max_batch_delay_ms / 1000.0

    def quality_served(self, quality: float) -> bool:
        """Whether ``quality`` lies in [1, 6] with both neighbouring anchors loaded."""
        if not QUALITY_MIN <= quality <= QUALITY_MAX:
            return False
        return float(math.floor(quality)) in self.qualities and float(math.ceil(quality)) in self.qualities
