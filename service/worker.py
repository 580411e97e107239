"""The batching worker: one thread that owns the device and runs queued jobs in batches.

Jobs are grouped by their ``key`` (operation, quality, padded shape). The worker takes the oldest
waiting job, gathers up to ``max_batch_size`` jobs with the same key, waiting at most
``max_batch_delay_s`` after the oldest job was queued for the batch to fill, then runs the batch.
Jobs whose deadline passed while queued are failed with :class:`DeadlineExceededError` without running.
Callers wait on each job's :class:`concurrent.futures.Future` (the event loop wraps it).

Every job carries its estimated run time (``cost``, seconds; :mod:`service.cost`). A running batch
yields to much smaller work at each checkpoint, the callable the batch function hands to the codec,
which calls it between stages and tiles (:mod:`model.codec`; the first call comes before any work):
there the worker runs, oldest first, every waiting batch whose jobs cost at most
:data:`INTERLEAVE_SHARE` of the running batch's jobs, then resumes the running batch. So a small
request waits for one stage of a large image (at most one tile), not for the whole image. Under a
steady overload of small jobs a large one may wait until its deadline passes (it then gets a 503):
large requests yield to small ones, never the other way round. After a small batch finishes, a
checkpoint waits up to :data:`ANTICIPATION_S` for the next small job before the large batch resumes,
so that the short gap between a client's answer and its next request does not let a stage of the
large image in ahead of it.

A checkpoint also ends a batch whose every job is past its deadline: it raises
:class:`JobAbandonedError`, the codec unwinds, and the worker moves on. No batch holds the worker
for more than its jobs' deadline plus one stage (at most one tile) of work.

The queue bound counts *waiting* jobs: the batch being formed (the jobs the worker will run next,
while it waits for the batch to fill) and the batches running are not counted, so the worker holds
at most ``queue_size`` waiting jobs plus the batch it forms or runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

logger = logging.getLogger("service.worker")

INTERLEAVE_SHARE = 0.25
"""A waiting job costing at most this share of a running job's cost runs inside its checkpoints."""
ANTICIPATION_S = 0.1
"""How long a checkpoint waits for the next small job after one finished, before the large batch
resumes (anticipatory scheduling, Iyer and Druschel, SOSP 2001): a client whose small request was
just answered usually sends its next within a few tens of milliseconds, and a stage of a large
image started in that gap would hold it for up to one tile."""


class QueueFullError(Exception):
    """The queue holds ``queue_size`` waiting jobs already."""


class WorkerClosedError(Exception):
    """The worker is shutting down and takes no new jobs."""


class DeadlineExceededError(Exception):
    """The job's deadline passed before it could run or finish."""


class JobAbandonedError(DeadlineExceededError):
    """Raised by a checkpoint of a running batch whose every job is past its deadline; the batch stops."""


@dataclass(eq=False)
class Job:
    """One unit of work: ``payload`` goes through the batch function chosen by ``key``."""

    key: Hashable
    payload: Any
    deadline: float
    """``time.monotonic()`` value after which the job is not worth running."""
    cost: float = 0.0
    """Estimated run time in seconds: decides what runs inside whose checkpoints, and counts in the
    drain estimates. Jobs with equal keys must have equal costs."""
    enqueued: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    """``time.monotonic()`` values: queued, batch started, result ready (0 until then)."""
    future: Future[Any] = field(default_factory=Future)


Checkpoint = Callable[[], None]
"""Called by the batch function between stages; raises :class:`JobAbandonedError` to stop the batch."""
BatchFunction = Callable[[Sequence[Job], Checkpoint], Sequence[Any]]
"""Runs jobs that share a key, calling the checkpoint between stages; one result per job, in order."""
BatchTimeCallback = Callable[[Sequence[Job], float], None]
"""Receives a batch and the seconds it ran (interleaved short batches excluded)."""


@dataclass(eq=False)
class _Running:
    """A batch on the worker thread (several when short batches run inside a long one's checkpoint)."""

    jobs: Sequence[Job]
    started: float
    cost: float
    paused: float = 0.0
    """Seconds spent running interleaved batches inside this batch's checkpoints."""

    @property
    def job_cost(self) -> float:
        """Estimated seconds of one of its jobs."""
        return max(job.cost for job in self.jobs)

    def remaining(self, now: float) -> float:
        """Estimated seconds left (0 once past the estimate)."""
        return max(self.cost - (now - self.started - self.paused), 0.0)


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
        on_done: BatchTimeCallback | None = None,
        on_abandoned: BatchTimeCallback | None = None,
        expecting: Callable[[], bool] | None = None,
        name: str = "lalic-worker",
    ) -> None:
        """``startup`` runs first in the worker thread (model loading); ``on_batch`` sees each batch
        about to run, ``on_done`` each finished batch and its run time, ``on_abandoned`` each batch
        stopped at a checkpoint and the time it had run. ``expecting`` says whether more jobs may be
        queued soon; while it is false a batch runs at once instead of waiting ``max_batch_delay_s``
        to fill (default: always wait)."""
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_batch_delay_s = max_batch_delay_s
        self._queue_size = queue_size
        self._startup = startup
        self._on_batch = on_batch
        self._on_done = on_done
        self._on_abandoned = on_abandoned
        self._expecting = expecting or (lambda: True)
        self._pending: list[Job] = []
        self._running: list[_Running] = []
        self._last_done = (float("-inf"), 0.0)
        """``time.monotonic()`` when the last batch finished, and the cost of one of its jobs."""
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    @property
    def depth(self) -> int:
        """Jobs waiting: queued, neither running nor in the batch being formed."""
        with self._cond:
            return self._waiting()

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closing

    def drain_s(self) -> float:
        """Estimated seconds until every queued and running job is done."""
        with self._cond:
            now = time.monotonic()
            return sum(job.cost for job in self._pending) + sum(r.remaining(now) for r in self._running)

    def backlog_s(self, cost: float) -> float:
        """Estimated seconds before a job of ``cost`` submitted now would start.

        A job small enough to run inside the checkpoints of the largest job queued or running waits
        only for the jobs as small as that (queued and running); any other job waits for everything.
        """
        with self._cond:
            now = time.monotonic()
            outer = [r.job_cost for r in self._running[:1]]
            limit = INTERLEAVE_SHARE * max([*outer, *(job.cost for job in self._pending)], default=0.0)
            if cost > limit:
                limit = float("inf")
            queued = sum(job.cost for job in self._pending if job.cost <= limit)
            running = sum(r.remaining(now) for r in self._running if r.job_cost <= limit)
            return queued + running

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def submit(self, job: Job) -> Future[Any]:
        """Queue ``job``; raises :class:`QueueFullError` or :class:`WorkerClosedError` instead of blocking."""
        with self._cond:
            if self._closing:
                raise WorkerClosedError("the service is shutting down")
            if self._waiting() >= self._queue_size:
                self._drop_dead_jobs()
            waiting = self._waiting()
            if waiting >= self._queue_size:
                raise QueueFullError(f"{waiting} jobs are waiting already")
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

    # -- queue (lock held) ----------------------------------------------------------------------

    def _waiting(self) -> int:
        """Queued jobs, less the batch being formed while nothing runs."""
        forming = 0 if self._running else len(self._next_group())
        return len(self._pending) - forming

    def _next_group(self, max_cost: float = float("inf")) -> list[Job]:
        """The jobs of the next batch: the oldest job's key, at most a batch; only jobs costing at
        most ``max_cost`` are considered."""
        pool = [job for job in self._pending if job.cost <= max_cost]
        if not pool:
            return []
        key = pool[0].key
        return [job for job in pool if job.key == key][: self._max_batch_size]

    def _take(self, batch: list[Job]) -> list[Job]:
        """Remove ``batch`` from the queue and return it."""
        chosen = set(map(id, batch))
        self._pending = [job for job in self._pending if id(job) not in chosen]
        return batch

    def _drop_dead_jobs(self) -> None:
        """Free the slots of queued jobs that were cancelled or whose deadline passed."""
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

    # -- worker thread --------------------------------------------------------------------------

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
            self._execute_safely(batch, nested=False)

    def _next_batch(self) -> list[Job] | None:
        """Block until a batch is due; ``None`` once closed with nothing left."""
        with self._cond:
            while True:
                batch = self._next_group()  # again after every wait: dead jobs may have been dropped
                if not batch:
                    if self._closing:
                        return None
                    self._cond.wait()
                    continue
                remaining = batch[0].enqueued + self._max_batch_delay_s - time.monotonic()
                full = len(batch) >= self._max_batch_size
                if full or remaining <= 0 or self._closing or not self._expecting():
                    return self._take(batch)
                self._cond.wait(remaining)

    def _execute_safely(self, batch: list[Job], nested: bool) -> None:
        """:meth:`_execute`, failing the batch instead of raising if a callback has a bug."""
        try:
            self._execute(batch, nested)
        except Exception as exc:  # a bug in a callback: fail the batch, keep the thread alive
            logger.exception("batch execution failed")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)

    def _execute(self, batch: list[Job], nested: bool) -> None:
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
            results = self._run(live, nested)
        except JobAbandonedError as exc:
            for job in live:
                job.future.set_exception(exc)
            return
        except Exception as exc:  # isolate the failing job(s)
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            logger.warning("batch of %d failed (%s); running its jobs one by one", len(live), exc)
            for job in live:
                self._execute_alone(job, nested)
            return
        finished = time.monotonic()
        for job, result in zip(live, results, strict=True):
            job.finished = finished
            job.future.set_result(result)

    def _execute_alone(self, job: Job, nested: bool) -> None:
        """Run one job of a failed batch on its own."""
        try:
            (result,) = self._run([job], nested)
        except Exception as exc:  # handed to the waiting request
            job.future.set_exception(exc)
        else:
            job.finished = time.monotonic()
            job.future.set_result(result)

    def _run(self, jobs: list[Job], nested: bool) -> Sequence[Any]:
        """Call the batch function with a checkpoint, tracking the batch for the drain estimates."""
        running = _Running(jobs, time.monotonic(), sum(job.cost for job in jobs))
        interleave = not nested  # only the outermost batch lets others in
        started = time.perf_counter()
        with self._cond:
            self._running.append(running)
        try:
            results = self._run_batch(jobs, partial(self._checkpoint, running, interleave))
            if len(results) != len(jobs):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(jobs)} jobs")
        except JobAbandonedError:
            if self._on_abandoned is not None:
                self._on_abandoned(jobs, time.perf_counter() - started - running.paused)
            raise
        finally:
            with self._cond:
                self._running.remove(running)
        if self._on_done is not None:
            self._on_done(jobs, time.perf_counter() - started - running.paused)
        self._last_done = (time.monotonic(), running.job_cost)
        return results

    def _anticipate(self, limit: float, now: float) -> bool:
        """(Lock held.) If a batch of jobs costing at most ``limit`` finished less than
        :data:`ANTICIPATION_S` ago, wait for the rest of that window for another such job to be
        queued; returns whether one was."""
        finished, cost = self._last_done
        window = finished + ANTICIPATION_S - now
        if cost > limit or window <= 0 or self._closing:
            return False
        return self._cond.wait_for(lambda: bool(self._next_group(limit)) or self._closing, window)

    def _checkpoint(self, running: _Running, interleave: bool) -> None:
        """Stop ``running`` once all its jobs are past their deadline; else (if ``interleave``) run
        every waiting batch small enough (:data:`INTERLEAVE_SHARE`) before returning to it."""
        limit = INTERLEAVE_SHARE * running.job_cost
        while True:
            now = time.monotonic()
            if all(now > job.deadline for job in running.jobs):
                late = now - max(job.deadline for job in running.jobs)
                raise JobAbandonedError(f"the deadline passed {late:.3f} s ago while running; abandoned")
            if not interleave or limit <= 0:  # a job without an estimate lets nothing in
                return
            with self._cond:
                batch = self._take(self._next_group(limit))
                if not batch:
                    waited = time.perf_counter()
                    if self._anticipate(limit, now):
                        batch = self._take(self._next_group(limit))
                    running.paused += time.perf_counter() - waited  # not the batch's own time
            if not batch:
                return
            started = time.perf_counter()
            try:
                self._execute_safely(batch, nested=True)
            finally:
                running.paused += time.perf_counter() - started
