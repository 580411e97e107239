"""The batching worker on its own: grouping, batch size and delay, queue bound, deadlines, drain."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from service.worker import BatchWorker, DeadlineExceededError, Job, QueueFullError, WorkerClosedError


class Recorder:
    """A batch function that records the batches it ran and echoes payloads."""

    def __init__(self, delay_s: float = 0.0, fail_on: object = None) -> None:
        self.batches: list[list[object]] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.fail_on = fail_on

    def __call__(self, jobs: Sequence[Job]) -> list[object]:
        payloads = [job.payload for job in jobs]
        self.batches.append(payloads)
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in payloads:
            raise ValueError("bad payload")
        return [("done", payload) for payload in payloads]


def make_worker(recorder: Recorder, **options: float) -> BatchWorker:
    params = {"max_batch_size": 4, "max_batch_delay_s": 0.0, "queue_size": 64, **options}
    return BatchWorker(recorder, **params)  # type: ignore[arg-type]


def job(key: str, payload: object, deadline_s: float = 30.0) -> Job:
    return Job(key=key, payload=payload, deadline=time.monotonic() + deadline_s)


def test_groups_by_key_oldest_first_and_caps_batch_size() -> None:
    recorder = Recorder()
    worker = make_worker(recorder)
    jobs = [job(k, i) for i, k in enumerate("AABAABA")]
    futures = [worker.submit(j) for j in jobs]  # queued before the thread starts
    worker.start()
    assert [f.result(timeout=5) for f in futures] == [("done", i) for i in range(7)]
    assert recorder.batches == [[0, 1, 3, 4], [2, 5], [6]]
    assert recorder.threads == {"lalic-worker"}
    assert worker.close(timeout=5)


def test_waits_for_a_batch_to_fill_but_not_longer_than_the_delay() -> None:
    recorder = Recorder()
    worker = make_worker(recorder, max_batch_size=2, max_batch_delay_s=0.3)
    worker.start()
    first = worker.submit(job("A", 1))
    time.sleep(0.05)
    second = worker.submit(job("A", 2))
    assert first.result(timeout=5) and second.result(timeout=5)
    assert recorder.batches == [[1, 2]]
    started = time.monotonic()
    assert worker.submit(job("A", 3)).result(timeout=5)
    assert 0.25 <= time.monotonic() - started < 2.0  # waited for the delay, then ran alone
    assert recorder.batches[-1] == [3]
    worker.close(timeout=5)


def test_queue_is_bounded() -> None:
    worker = make_worker(Recorder(), queue_size=2)
    worker.submit(job("A", 1))
    worker.submit(job("A", 2))
    assert worker.depth == 2
    with pytest.raises(QueueFullError):
        worker.submit(job("A", 3))
    worker.start()
    assert worker.close(timeout=5)


def test_dead_jobs_free_their_queue_slots() -> None:
    worker = make_worker(Recorder(), queue_size=2)
    expired = worker.submit(job("A", 1, deadline_s=-1.0))
    cancelled = worker.submit(job("A", 2))
    assert cancelled.cancel()
    alive = worker.submit(job("A", 3))  # the queue was full of dead jobs
    assert worker.depth == 1
    with pytest.raises(DeadlineExceededError):
        expired.result(timeout=0)
    worker.start()
    assert alive.result(timeout=5) == ("done", 3)
    assert worker.close(timeout=5)


def test_expired_and_cancelled_jobs_do_not_run() -> None:
    recorder = Recorder()
    worker = make_worker(recorder)
    expired = worker.submit(job("A", "late", deadline_s=-1.0))
    cancelled = worker.submit(job("A", "cancelled"))
    assert cancelled.cancel()
    alive = worker.submit(job("A", "ok"))
    worker.start()
    assert alive.result(timeout=5) == ("done", "ok")
    with pytest.raises(DeadlineExceededError):
        expired.result(timeout=5)
    assert recorder.batches == [["ok"]]
    worker.close(timeout=5)


def test_a_failing_job_does_not_fail_its_batch_mates() -> None:
    recorder = Recorder(fail_on="bad")
    worker = make_worker(recorder)
    good = worker.submit(job("A", "good"))
    bad = worker.submit(job("A", "bad"))
    worker.start()
    assert good.result(timeout=5) == ("done", "good")
    with pytest.raises(ValueError, match="bad payload"):
        bad.result(timeout=5)
    assert recorder.batches == [["good", "bad"], ["good"], ["bad"]]
    worker.close(timeout=5)


def test_close_drains_queued_jobs_then_refuses_new_ones() -> None:
    recorder = Recorder(delay_s=0.02)
    worker = make_worker(recorder, max_batch_size=1)
    worker.start()
    futures = [worker.submit(job("A", i)) for i in range(5)]
    assert worker.close(timeout=5)
    assert all(f.done() and not f.cancelled() for f in futures)
    assert [f.result() for f in futures] == [("done", i) for i in range(5)]
    with pytest.raises(WorkerClosedError):
        worker.submit(job("A", 9))


def test_startup_runs_in_the_worker_thread_before_any_batch() -> None:
    events: list[str] = []
    recorder = Recorder()

    def startup() -> None:
        time.sleep(0.05)
        events.append(f"startup in {threading.current_thread().name}")

    def run(jobs: Sequence[Job]) -> list[object]:
        events.append("batch")
        return recorder(jobs)

    worker = BatchWorker(run, max_batch_size=4, max_batch_delay_s=0, queue_size=4, startup=startup)
    worker.start()
    worker.submit(job("A", 1)).result(timeout=5)
    assert events == ["startup in lalic-worker", "batch"]
    worker.close(timeout=5)
