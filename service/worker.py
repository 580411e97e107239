"""The batching worker: one thread that owns the device and runs queued jobs in batches.

Jobs are grouped by their ``key`` (operation, quality, padded shape). The worker takes the oldest
waiting job, gathers up to ``max_batch_size`` jobs with the same key, waiting at most
``max_batch_delay_s`` after the oldest job was queued for the batch to fill, then runs the batch.
Jobs whose deadline passed while queued are failed with :class:`DeadlineExceededError` without running.
Callers wait on each job's :class:`concurrent.futures.Future` (the event loop wraps it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("service.worker")


class QueueFullError(Exception):
    """The queue holds ``queue_size`` jobs already."""


class WorkerClosedError(Exception):
    """The worker is shutting down and takes no new jobs."""


class DeadlineExceededError(Exception):
    """The job's deadline passed before it could run."""


@dataclass(eq=False)
class Job:
    """One unit of work: ``payload`` goes through the batch function chosen by ``key``."""

    key: Hashable
    payload: Any
    deadline: float
    """``time.monotonic()`` value after which the job is not worth running."""
    enqueued: float = 0.0
    started: float = 0.0
    future: Future[Any] = field(default_factory=Future)


BatchFunction = Callable[[Sequence[Job]], Sequence[Any]]
"""Runs jobs that share a key and returns one result per job, in order."""


class BatchWorker:
    """A bounded job queue drained in batches by a single worker thread."""

    def __init__(
        self,
        run_batch: BatchFunction,
        *,
        max_batch_size: int,
        max_batch_delay_s: float,
        queue_size: int,
        startup: Callable[[], None] | None = None,
        on_batch: Callable[[Sequence[Job]], None] | None = None,
        name: str = "lalic-worker",
    ) -> None:
        """``startup`` runs first in the worker thread (model loading); ``on_batch`` sees each batch run."""
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_batch_delay_s = max_batch_delay_s
        self._queue_size = queue_size
        self._startup = startup
        self._on_batch = on_batch
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet running)."""
        return len(self._pending)

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closing

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def submit(self, job: Job) -> Future[Any]:
        """Queue ``job``; raises :class:`QueueFullError` or :class:`WorkerClosedError` instead of blocking."""
        with self._cond:
            if self._closing:
                raise WorkerClosedError("the service is shutting down")
            if len(self._pending) >= self._queue_size:
                self._drop_dead_jobs()
            if len(self._pending) >= self._queue_size:
                raise QueueFullError(f"{len(self._pending)} jobs are waiting already")
            job.enqueued = time.monotonic()
            self._pending.append(job)
            self._cond.notify_all()
        return job.future

    def close(self, timeout: float | None = None) -> bool:
        """Stop taking jobs, let the thread finish the queued ones, and wait for it to exit.

        Returns whether the thread exited within ``timeout``.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _drop_dead_jobs(self) -> None:
        """Free the slots of queued jobs that were cancelled or whose deadline passed (lock held)."""
        now = time.monotonic()
        alive = []
        for job in self._pending:
            if job.future.cancelled():
                continue
            if now > job.deadline:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(DeadlineExceededError("the deadline passed while queued"))
                continue
            alive.append(job)
        self._pending = alive

    def _main(self) -> None:
        """Thread body: start-up, then batches until closed and drained."""
        if self._startup is not None:
            try:
                self._startup()
            except Exception:
                logger.exception("worker start-up failed")
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._execute(batch)
            except Exception as exc:  # a bug in a callback: fail the batch, keep the thread alive
                logger.exception("batch execution failed")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _next_batch(self) -> list[Job] | None:
        """Block until a batch is due; ``None`` once closed with nothing left."""
        with self._cond:
            while not self._pending:
                if self._closing:
                    return None
                self._cond.wait()
            oldest = self._pending[0]
            due = oldest.enqueued + self._max_batch_delay_s
            while True:
                batch = [job for job in self._pending if job.key == oldest.key][: self._max_batch_size]
                remaining = due - time.monotonic()
                if len(batch) >= self._max_batch_size or remaining <= 0 or self._closing:
                    break
                self._cond.wait(remaining)
            chosen = set(map(id, batch))
            self._pending = [job for job in self._pending if id(job) not in chosen]
            return batch

    def _execute(self, batch: list[Job]) -> None:
        """Drop expired or cancelled jobs, run the rest, and resolve every future."""
        now = time.monotonic()
        live: list[Job] = []
        for job in batch:
            if now > job.deadline:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(DeadlineExceededError("the deadline passed while queued"))
            elif job.future.set_running_or_notify_cancel():
                job.started = now
                live.append(job)
        if not live:
            return
        if self._on_batch is not None:
            self._on_batch(live)
        try:
            results = self._run_batch(live)
            if len(results) != len(live):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} jobs")
        except Exception as exc:  # isolate the failing job(s)
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            logger.warning("batch of %d failed (%s); running its jobs one by one", len(live), exc)
            for job in live:
                self._execute_alone(job)
            return
        for job, result in zip(live, results, strict=True):
            job.future.set_result(result)

    def _execute_alone(self, job: Job) -> None:
        """Run one job of a failed batch on its own."""
        try:
            (result,) = self._run_batch([job])
        except Exception as exc:  # handed to the waiting request
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)
