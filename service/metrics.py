"""Prometheus metrics of one app instance, in a dedicated registry (names are a contract with dashboards)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.125,
    0.15,
    0.175,
    0.2,
    0.25,
    0.3,
    0.4,
    0.6,
    1,
    2.5,
    5,
)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, *LATENCY_BUCKETS)
"""Request stages can take well under a millisecond (a parse, a hand-off)."""
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)
BYTE_BUCKETS = (1e3, 1e4, 3e4, 1e5, 3e5, 1e6, 3e6, 1e7, 5e7)
BPP_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 4)

ENDPOINTS = ("compress", "decompress", "models", "healthz", "readyz", "metrics", "other")
_PATH_ENDPOINTS = {
    "/compress": "compress",
    "/decompress": "decompress",
    "/v1/models": "models",
    "/healthz": "healthz",
    "/readyz": "readyz",
    "/metrics": "metrics",
}
MODEL_STAGES = ("analysis", "hyper", "entropy_parameters", "synthesis")
NO_QUALITY = "none"


def endpoint_label(path: str) -> str:
    """The bounded ``endpoint`` label of a request path."""
    return _PATH_ENDPOINTS.get(path.rstrip("/") or "/", "other")


def quality_label(quality: float | None) -> str:
    """The bounded ``quality`` label: ``round(q)`` clamped to "1".."6", or "none"."""
    if quality is None or quality != quality:  # None or NaN
        return NO_QUALITY
    return str(min(6, max(1, round(quality))))


def status_class(status: int) -> str:
    """``2xx``, ``4xx`` or ``5xx`` (1xx/3xx are counted with 2xx: neither is an error)."""
    if status >= 500:
        return "5xx"
    if status >= 400:
        return "4xx"
    return "2xx"


class Metrics:
    """All ``lalic_*`` metrics, registered in a registry owned by this object."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "lalic_request_duration_seconds",
            "Time from request start to response end.",
            ["endpoint", "quality"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_stage = Histogram(
            "lalic_request_stage_seconds",
            "Consecutive stages of a successful request, arrival to response end (they add up to "
            "lalic_request_duration_seconds): read_body, decode_image or parse, queue, codec, handoff, "
            "encode_image, respond.",
            ["endpoint", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "lalic_queue_wait_seconds",
            "Time a job waited in the batching queue before running.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_compute = Histogram(
            "lalic_model_compute_seconds",
            "Neural network time per batch, by model stage.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.entropy_coding = Histogram(
            "lalic_entropy_coding_seconds",
            "Entropy coding time per batch.",
            ["operation"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "lalic_batch_size",
            "Number of jobs run together in one batch.",
            ["operation"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.request_body_bytes = Histogram(
            "lalic_request_body_bytes",
            "Size of request bodies read.",
            ["endpoint"],
            buckets=BYTE_BUCKETS,
            registry=r,
        )
        self.response_body_bytes = Histogram(
            "lalic_response_body_bytes",
            "Size of response bodies sent.",
            ["endpoint"],
            buckets=BYTE_BUCKETS,
            registry=r,
        )
        self.bits_per_pixel = Histogram(
            "lalic_bits_per_pixel",
            "Bits per pixel of produced bitstreams.",
            ["quality"],
            buckets=BPP_BUCKETS,
            registry=r,
        )
        self.requests_total = Counter(
            "lalic_requests_total",
            "Requests answered, by endpoint and status class.",
            ["endpoint", "status_class"],
            registry=r,
        )
        self.errors_total = Counter(
            "lalic_errors_total",
            "Error responses, by JSON error code.",
            ["code"],
            registry=r,
        )
        self.queue_depth = Gauge("lalic_queue_depth", "Jobs waiting for the batching worker.", registry=r)
        self.queue_capacity = Gauge(
            "lalic_queue_capacity", "Jobs the batching queue holds before refusing with 503.", registry=r
        )
        self.in_flight = Gauge("lalic_in_flight_requests", "Requests being handled.", registry=r)
        self.models_loaded = Gauge("lalic_models_loaded", "Quality models loaded and warmed up.", registry=r)
        self.jobs_abandoned = Counter(
            "lalic_jobs_abandoned_total",
            "Jobs stopped while running because their deadline passed.",
            ["operation"],
            registry=r,
        )
        self.queue_drain = Gauge(
            "lalic_queue_drain_seconds",
            "Estimated seconds until every queued and running job is done (the cost model's view).",
            registry=r,
        )
        self.request_timeout = Gauge(
            "lalic_request_timeout_seconds",
            "The per-request deadline (setting request_timeout_s), for comparison with the drain time.",
            registry=r,
        )
        self.cost_fixed = Gauge(
            "lalic_cost_fixed_seconds",
            "Cost model: estimated overhead per image, by operation.",
            ["operation"],
            registry=r,
        )
        self.cost_per_megapixel = Gauge(
            "lalic_cost_seconds_per_megapixel",
            "Cost model: estimated seconds per megapixel (padded), by operation.",
            ["operation"],
            registry=r,
        )

    def track_queue_depth(self, depth: Callable[[], int]) -> None:
        """Make ``lalic_queue_depth`` read ``depth()`` at every scrape."""
        self.queue_depth.set_function(depth)

    def track_queue_drain(self, drain_s: Callable[[], float]) -> None:
        """Make ``lalic_queue_drain_seconds`` read ``drain_s()`` at every scrape."""
        self.queue_drain.set_function(drain_s)

    def track_cost(self, operation: str, parameters: Callable[[], tuple[float, float]]) -> None:
        """Make the cost gauges of ``operation`` read ``parameters()`` = (fixed s, s per pixel) at scrape."""
        self.cost_fixed.labels(operation=operation).set_function(lambda: parameters()[0])
        self.cost_per_megapixel.labels(operation=operation).set_function(lambda: parameters()[1] * 1e6)

    def observe_timings(self, operation: str, timings: dict[str, float]) -> None:
        """Record a batch's per-stage timings as reported by the codec."""
        for stage in MODEL_STAGES:
            if stage in timings:
                self.model_compute.labels(stage=stage).observe(timings[stage])
        if "entropy_coding" in timings:
            coding = "encode" if operation == "compress" else "decode"
            self.entropy_coding.labels(operation=coding).observe(timings["entropy_coding"])
