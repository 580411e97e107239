"""The per-app runtime: settings, metrics, engine and worker, and the event-loop side of the queue.

Admission control: before a job is queued, the cost model (:mod:`service.cost`) estimates its run
time and the worker the time before it would start (:meth:`service.worker.BatchWorker.backlog_s`).
With ``admission_factor`` f, a job that needs f x its run time > ``request_timeout_s`` even on an
idle worker is refused with 413 (the message names the largest image this deployment serves), and
one that needs f x (wait + run time) > the time left to its deadline with 503 ``deadline_exceeded``
at once; Retry-After says when a fresh request would fit (from the estimated drain time), never a
constant. Work that is admitted and still runs late is stopped at its deadline by the worker.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from service.engine import COMPRESS, BatchKey, Engine
from service.errors import ErrorCode, ServiceError, unavailable
from service.metrics import Metrics
from service.middleware import request_started
from service.settings import Settings
from service.timeline import CODEC, HANDOFF, QUEUE, Timeline
from service.worker import BatchWorker, DeadlineExceededError, Job, QueueFullError, WorkerClosedError

NOT_READY_RETRY_S = 5.0


@dataclass
class Runtime:
    """Everything a request handler needs, created once per app."""

    settings: Settings
    metrics: Metrics
    engine: Engine
    worker: BatchWorker
    preparing_count: int = 0
    """/compress and /decompress requests on their way to the worker: reading the body, decoding the
    image or parsing the stream (changed on the event loop only; the worker thread reads it)."""

    @classmethod
    def create(cls, settings: Settings) -> Runtime:
        """Wire an engine to a batching worker (nothing starts yet)."""
        metrics = Metrics()
        engine = Engine(settings, metrics)
        runtime: Runtime | None = None

        def expecting() -> bool:  # a job may come soon: worth waiting for a batch to fill
            return runtime is not None and runtime.preparing_count > 0

        worker = BatchWorker(
            engine.run_batch,
            expecting=expecting,
            max_batch_size=settings.max_batch_size,
            max_batch_delay_s=settings.max_batch_delay_s,
            queue_size=settings.queue_size,
            startup=engine.load,
            on_batch=engine.observe_batch,
            on_done=engine.observe_run,
            on_abandoned=engine.observe_abandoned,
        )
        metrics.track_queue_depth(lambda: worker.depth)
        metrics.track_queue_drain(worker.drain_s)
        metrics.queue_capacity.set(settings.queue_size)
        metrics.request_timeout.set(settings.request_timeout_s)
        runtime = cls(settings, metrics, engine, worker)
        return runtime

    @contextmanager
    def preparing(self) -> Iterator[Callable[[], None]]:
        """Count a request as on its way to the worker until it calls the yielded function (just
        before its job is queued) or ends: the worker waits up to ``max_batch_delay_ms`` for a batch
        to fill only while some request is on its way, so a lone request never waits for it."""
        pending = True

        def submitting() -> None:
            nonlocal pending
            if pending:
                pending = False
                self.preparing_count -= 1

        self.preparing_count += 1
        try:
            yield submitting
        finally:
            submitting()

    def require_ready(self) -> Engine:
        """The engine, or 503 while the model is loading (or failed to load)."""
        if self.worker.closing:
            raise unavailable(ErrorCode.SHUTTING_DOWN, "the service is shutting down")
        if not self.engine.ready:
            raise unavailable(ErrorCode.NOT_READY, self.engine.describe_state(), NOT_READY_RETRY_S)
        return self.engine

    def admit(self, key: BatchKey, height: int, width: int, deadline: float) -> float:
        """The estimated run time of a job of ``key`` for a ``width`` x ``height`` image, if it may run.

        Raises:
            ServiceError: 413 when it cannot finish within ``request_timeout_s`` even on an idle worker,
                503 ``deadline_exceeded`` when it cannot finish before ``deadline`` behind the queue.
        """
        cost = self.engine.estimate(key)
        factor = self.settings.admission_factor
        if factor == 0:
            return cost
        timeout = self.settings.request_timeout_s
        if factor * cost > timeout:
            raise ServiceError(413, ErrorCode.TOO_MANY_PIXELS, self._too_slow(key, height, width, cost))
        backlog = self.worker.backlog_s(cost)
        left = deadline - time.monotonic()
        if factor * (backlog + cost) > left:
            # a fresh request fits once the backlog has shrunk to timeout / factor - cost
            wait = backlog - (timeout / factor - cost)
            raise unavailable(
                ErrorCode.DEADLINE_EXCEEDED,
                f"{_verb(key)} {width}x{height} takes about {cost:.1f} s behind about {backlog:.1f} s "
                f"of queued work, more than the {max(left, 0):.1f} s left of the "
                f"{timeout:g} s request timeout",
                wait,
            )
        return cost

    def _too_slow(self, key: BatchKey, height: int, width: int, cost: float) -> str:
        """The 413 detail: the estimate, and the largest image served within the request timeout."""
        timeout = self.settings.request_timeout_s
        budget = timeout / self.settings.admission_factor
        pixels = min(self.engine.costs.largest_pixels(key.operation, budget), self.settings.max_pixels)
        side = math.isqrt(pixels) // 64 * 64
        largest = (
            f"the largest image this deployment serves for {key.operation} is about "
            f"{pixels / 1e6:.2f} megapixels (e.g. {side}x{side})"
            if side
            else f"no image fits the {timeout:g} s request timeout here"
        )
        return (
            f"{_verb(key)} {width}x{height} would take about {cost:.1f} s here, more than the "
            f"{timeout:g} s request timeout allows; {largest}"
        )

    def retry_after_s(self) -> float:
        """When to retry after a refusal: the estimated time until the queue has drained."""
        return self.worker.drain_s()

    async def run(
        self,
        key: BatchKey,
        payload: Any,
        deadline: float,
        height: int,
        width: int,
        timeline: Timeline | None = None,
        submitting: Callable[[], None] | None = None,
    ) -> Any:
        """Admit a job (:meth:`admit`), queue it and await its result without blocking the event loop;
        ``timeline`` gets the stages queue, codec and handoff of a job that succeeded; ``submitting``
        (from :meth:`preparing`) is called just before the job is queued.

        Raises:
            ServiceError: 413 or 503 from admission, 503 when the queue is full, the worker is closing
                or ``deadline`` passes.
            Exception: whatever the codec raised for this job.
        """
        if time.monotonic() >= deadline:
            raise self._deadline_error()
        cost = self.admit(key, height, width, deadline)
        job = Job(key=key, payload=payload, deadline=deadline, cost=cost)
        if submitting is not None:
            submitting()  # before submit: the worker then sees whether anything else is on its way
        try:
            future = self.worker.submit(job)
        except QueueFullError:
            raise unavailable(
                ErrorCode.QUEUE_FULL, "too many requests are waiting; retry later", self.retry_after_s()
            ) from None
        except WorkerClosedError:
            raise unavailable(ErrorCode.SHUTTING_DOWN, "the service is shutting down") from None
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), timeout=deadline - time.monotonic())
        except (TimeoutError, DeadlineExceededError):
            raise self._deadline_error() from None
        if timeline is not None:
            timeline.until(QUEUE, job.started)
            timeline.until(CODEC, job.finished)
            timeline.mark(HANDOFF)  # back on the event loop
        return result

    def _deadline_error(self) -> ServiceError:
        return unavailable(
            ErrorCode.DEADLINE_EXCEEDED,
            f"the request could not be served within {self.settings.request_timeout_s:g} s",
            self.retry_after_s(),
        )

    def deadline_of(self, request: Request) -> float:
        """The monotonic deadline of ``request``: its arrival plus ``request_timeout_s``."""
        return request_started(request.scope) + self.settings.request_timeout_s


def _verb(key: BatchKey) -> str:
    """How a 413/503 detail names the job: "compressing" or "decompressing" (to) a size."""
    return "compressing" if key.operation == COMPRESS else "decompressing to"


def get_runtime(request: Request) -> Runtime:
    """FastAPI dependency: the runtime of the app serving ``request``."""
    return request.app.state.runtime
