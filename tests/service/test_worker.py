"""The batching worker on its own: grouping, batch size and delay, queue bound, deadlines, drain,
short jobs before and inside long ones, abandoning late batches, and the drain estimates."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import pytest

from service.worker import (
    BatchWorker,
    DeadlineExceededError,
    Job,
    JobAbandonedError,
    QueueFullError,
    WorkerClosedError,
)


class Recorder:
    """A batch function that records the batches it ran and echoes payloads."""

    def __init__(self, delay_s: float = 0.0, fail_on: object = None) -> None:
        self.batches: list[list[object]] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.fail_on = fail_on

    def __call__(self, jobs: Sequence[Job], checkpoint: object = None) -> list[object]:
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


def test_a_lone_job_does_not_wait_for_a_batch_when_nothing_else_is_coming() -> None:
    recorder = Recorder()
    coming = threading.Event()
    worker = BatchWorker(
        recorder, max_batch_size=4, max_batch_delay_s=0.5, queue_size=8, expecting=coming.is_set
    )
    worker.start()
    started = time.monotonic()
    assert worker.submit(job("A", 1)).result(timeout=5)
    assert time.monotonic() - started < 0.25  # nothing on its way: no 0.5 s wait
    coming.set()  # a request is being read: worth waiting for it
    first = worker.submit(job("A", 2))
    time.sleep(0.1)
    second = worker.submit(job("A", 3))
    assert first.result(timeout=5) and second.result(timeout=5)
    assert recorder.batches == [[1], [2, 3]]
    worker.close(timeout=5)


def test_queue_is_bounded() -> None:
    worker = make_worker(Recorder(), queue_size=2, max_batch_size=1)
    worker.submit(job("A", 1))  # the batch being formed: not waiting
    worker.submit(job("A", 2))
    worker.submit(job("A", 3))
    assert worker.depth == 2
    with pytest.raises(QueueFullError):
        worker.submit(job("A", 4))
    worker.start()
    assert worker.close(timeout=5)


def test_dead_jobs_free_their_queue_slots() -> None:
    worker = make_worker(Recorder(), queue_size=2, max_batch_size=1)
    worker.submit(job("A", 0))  # forms the next batch
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

    def run(jobs: Sequence[Job], checkpoint: object) -> list[object]:
        events.append("batch")
        return recorder(jobs)

    worker = BatchWorker(run, max_batch_size=4, max_batch_delay_s=0, queue_size=4, startup=startup)
    worker.start()
    worker.submit(job("A", 1)).result(timeout=5)
    assert events == ["startup in lalic-worker", "batch"]
    worker.close(timeout=5)


class Stages:
    """A batch function of ``stages[key]`` steps of ``stage_s[key]`` seconds, calling the checkpoint
    before each step; records what ran, in order, and how long the worker says each batch ran."""

    def __init__(self, stages: dict[str, int], stage_s: dict[str, float]) -> None:
        self.stages = stages
        self.stage_s = stage_s
        self.events: list[tuple[str, object]] = []
        self.run_times: dict[object, float] = {}
        self.abandoned: dict[object, float] = {}

    def __call__(self, jobs: Sequence[Job], checkpoint: Callable[[], None]) -> list[object]:
        key = jobs[0].key
        self.events.append(("start", jobs[0].payload))
        for _ in range(self.stages[key]):
            checkpoint()
            time.sleep(self.stage_s[key])
        self.events.append(("end", jobs[0].payload))
        return [("done", job.payload) for job in jobs]

    def on_done(self, jobs: Sequence[Job], seconds: float) -> None:
        self.run_times[jobs[0].payload] = seconds

    def on_abandoned(self, jobs: Sequence[Job], seconds: float) -> None:
        self.abandoned[jobs[0].payload] = seconds


def staged_worker(stages: Stages, **options: float) -> BatchWorker:
    params = {"max_batch_size": 4, "max_batch_delay_s": 0.0, "queue_size": 64, **options}
    return BatchWorker(
        stages,
        on_done=stages.on_done,
        on_abandoned=stages.on_abandoned,
        **params,  # type: ignore[arg-type]
    )


def costed(key: str, payload: object, cost: float, deadline_s: float = 30.0) -> Job:
    return Job(key=key, payload=payload, deadline=time.monotonic() + deadline_s, cost=cost)


def test_six_requests_on_an_idle_worker_fit_a_queue_of_four() -> None:
    """The batch being formed does not count against queue_size: capacity = 4 waiting + a batch of 8."""
    worker = make_worker(Recorder(), queue_size=4, max_batch_size=8)
    futures = [worker.submit(job("A", i)) for i in range(6)]
    assert worker.depth == 0  # all six form the first batch
    futures += [worker.submit(job("A", i)) for i in range(6, 12)]
    assert worker.depth == 4
    with pytest.raises(QueueFullError, match="4 jobs are waiting already"):
        worker.submit(job("A", 12))
    worker.start()
    assert [f.result(timeout=5) for f in futures] == [("done", i) for i in range(12)]
    assert worker.close(timeout=5)


def test_short_jobs_run_inside_a_long_jobs_checkpoints() -> None:
    stages = Stages({"L": 20, "S": 1}, {"L": 0.05, "S": 0.5})
    worker = staged_worker(stages)
    worker.start()
    long = worker.submit(costed("L", "long", cost=10.0))
    while not stages.events:
        time.sleep(0.01)
    short = worker.submit(costed("S", "short", cost=0.5))
    assert short.result(timeout=30) == ("done", "short")
    assert not long.done()  # the short job did not wait for the long one
    assert long.result(timeout=30) == ("done", "long")
    assert stages.events == [("start", "long"), ("start", "short"), ("end", "short"), ("end", "long")]
    # the long batch's run time leaves out the short one it let in (0.5 s of sleep)
    assert stages.run_times["long"] >= 20 * 0.05
    assert stages.run_times["short"] >= 0.5
    assert worker.close(timeout=5)


def test_a_short_job_queued_behind_a_long_one_runs_at_its_first_checkpoint() -> None:
    stages = Stages({"L": 2, "S": 1, "M": 1}, {"L": 0.0, "S": 0.0, "M": 0.0})
    worker = staged_worker(stages)
    futures = [
        worker.submit(costed("L", "long", 5.0)),
        worker.submit(costed("M", "medium", 2.0)),  # over a quarter of the long job: waits its turn
        worker.submit(costed("S", "short", 1.25)),  # a quarter: let in
    ]
    worker.start()
    assert [f.result(timeout=5) for f in futures] == [("done", "long"), ("done", "medium"), ("done", "short")]
    assert stages.events == [
        ("start", "long"),
        ("start", "short"),
        ("end", "short"),
        ("end", "long"),
        ("start", "medium"),
        ("end", "medium"),
    ]
    assert worker.close(timeout=5)


def test_a_running_batch_stops_at_its_deadline_and_frees_the_worker() -> None:
    stages = Stages({"L": 400, "S": 1}, {"L": 0.05, "S": 0.0})  # 20 s of work
    worker = staged_worker(stages)
    worker.start()
    started = time.monotonic()
    late = worker.submit(costed("L", "late", cost=20.0, deadline_s=0.5))
    with pytest.raises(JobAbandonedError, match="the deadline passed"):
        late.result(timeout=30)
    assert time.monotonic() - started < 10  # the deadline plus a stage, not the 20 s of work
    assert ("end", "late") not in stages.events
    assert 0.5 <= stages.abandoned["late"] < 10 and "late" not in stages.run_times
    assert worker.submit(costed("S", "next", cost=0.1)).result(timeout=5) == ("done", "next")
    assert worker.close(timeout=5)


def test_a_batch_runs_on_while_one_of_its_jobs_is_still_in_time() -> None:
    stages = Stages({"L": 20}, {"L": 0.05})
    worker = staged_worker(stages)
    futures = [worker.submit(costed("L", "late", 2.0, deadline_s=0.1)), worker.submit(costed("L", "ok", 2.0))]
    worker.start()
    assert [f.result(timeout=30) for f in futures] == [("done", "late"), ("done", "ok")]
    assert stages.abandoned == {}
    assert worker.close(timeout=5)


def test_drain_and_backlog_estimates() -> None:
    worker = staged_worker(Stages({}, {}))
    worker.submit(costed("L", 1, cost=10.0))
    worker.submit(costed("S", 2, cost=0.5))
    worker.submit(costed("T", 3, cost=0.25))
    assert worker.drain_s() == pytest.approx(10.75)
    # up to a quarter of the 10 s job, a job runs inside its checkpoints: it waits for the small ones
    assert worker.backlog_s(0.5) == pytest.approx(0.75)
    assert worker.backlog_s(2.5) == pytest.approx(0.75)
    assert worker.backlog_s(2.6) == pytest.approx(10.75)  # a larger one waits for everything
    worker.start()
    assert worker.close(timeout=5)
    assert worker.drain_s() == 0.0


def test_a_client_sending_small_jobs_back_to_back_keeps_the_worker() -> None:
    """Anticipation: after a small job, a checkpoint waits briefly for the next one instead of starting
    another 0.3 s stage of the large job in the 10 ms gap between one answer and the next request."""
    stages = Stages({"L": 10, "S": 1}, {"L": 0.3, "S": 0.01})
    worker = staged_worker(stages)
    worker.start()
    long = worker.submit(costed("L", "long", cost=3.0))
    while not stages.events:
        time.sleep(0.01)
    latencies = []
    for i in range(10):
        time.sleep(0.01)  # the client reads its answer and sends the next request
        submitted = time.monotonic()
        assert worker.submit(costed("S", i, cost=0.01)).result(timeout=30) == ("done", i)
        latencies.append(time.monotonic() - submitted)
    # the first waits for the stage under way; the others come within the anticipation window
    assert max(latencies[1:]) < 0.2, latencies
    assert not long.done()
    assert long.result(timeout=30) == ("done", "long")
    # the anticipation waits (up to 0.1 s after each small job) are not the long batch's own time
    assert 3.0 <= stages.run_times["long"] < 3.0 + 0.5
    assert worker.close(timeout=5)
