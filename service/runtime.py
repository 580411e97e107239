"""The per-app runtime: settings, metrics, engine and worker, and the event-loop side of the queue."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from service.engine import BatchKey, Engine
from service.errors import ErrorCode, ServiceError, unavailable
from service.metrics import Metrics
from service.middleware import STARTED_STATE_KEY
from service.settings import Settings
from service.worker import BatchWorker, DeadlineExceededError, Job, QueueFullError, WorkerClosedError

NOT_READY_RETRY_S = 5.0


@dataclass
class Runtime:
    """Everything a request handler needs, created once per app."""

    settings: Settings
    metrics: Metrics
    engine: Engine
    worker: BatchWorker

    @classmethod
    def create(cls, settings: Settings) -> Runtime:
        """Wire an engine to a batching worker (nothing starts yet)."""
        metrics = Metrics()
        engine = Engine(settings, metrics)
        worker = BatchWorker(
            engine.run_batch,
            max_batch_size=settings.max_batch_size,
            max_batch_delay_s=settings.max_batch_delay_s,
            queue_size=settings.queue_size,
            startup=engine.load,
            on_batch=engine.observe_batch,
        )
        metrics.track_queue_depth(lambda: worker.depth)
        metrics.queue_capacity.set(settings.queue_size)
        return cls(settings, metrics, engine, worker)

    def require_ready(self) -> Engine:
        """The engine, or 503 while the model is loading (or failed to load)."""
        if self.worker.closing:
            raise unavailable(ErrorCode.SHUTTING_DOWN, "the service is shutting down")
        if not self.engine.ready:
            raise unavailable(ErrorCode.NOT_READY, self.engine.describe_state(), NOT_READY_RETRY_S)
        return self.engine

    def _retry_after_s(self) -> float:
        """A rough time until the queue drains: one batch delay plus a slot per waiting batch."""
        batches = self.worker.depth / self.settings.max_batch_size + 1
        return batches * max(self.settings.max_batch_delay_s, 0.1)

    async def run(self, key: BatchKey, payload: Any, deadline: float) -> Any:
        """Queue a job and await its result without blocking the event loop.

        Raises:
            ServiceError: 503 when the queue is full, the worker is closing or ``deadline`` passes.
            Exception: whatever the codec raised for this job.
        """
        if time.monotonic() >= deadline:
            raise self._deadline_error()
        job = Job(key=key, payload=payload, deadline=deadline)
        try:
            future = self.worker.submit(job)
        except QueueFullError:
            raise unavailable(
                ErrorCode.QUEUE_FULL, "too many requests are waiting; retry later", self._retry_after_s()
            ) from None
        except WorkerClosedError:
            raise unavailable(ErrorCode.SHUTTING_DOWN, "the service is shutting down") from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=deadline - time.monotonic())
        except (TimeoutError, DeadlineExceededError):
            raise self._deadline_error() from None

    def _deadline_error(self) -> ServiceError:
        return unavailable(
            ErrorCode.DEADLINE_EXCEEDED,
            f"the request could not be served within {self.settings.request_timeout_s:g} s",
            self._retry_after_s(),
        )

    def deadline_of(self, request: Request) -> float:
        """The monotonic deadline of ``request``: its arrival plus ``request_timeout_s``."""
        started = request.scope.get("state", {}).get(STARTED_STATE_KEY, time.monotonic())
        return started + self.settings.request_timeout_s


def get_runtime(request: Request) -> Runtime:
    """FastAPI dependency: the runtime of the app serving ``request``."""
    return request.app.state.runtime
