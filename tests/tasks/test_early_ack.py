"""A message is acknowledged once its jobs are started, not once they are stored: a real Celery
worker (in this process, threads pool) against a real Redis, with an engine the test resolves
by hand. The finisher threads still store each job's outcome exactly once; a worker fault
stores nothing and leaves the job to its lease; a low message waits at the admission gate with
its jobs still queued while a high one goes straight through."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from engine.request import Completion, EngineShutDownError
from producer import Producer
from tasks import jobs, keys
from tasks.admission import AdmissionGate
from tasks.app import celery_settings
from tasks.config import DeploymentConfig, parse_config
from tasks.finishers import Finishers
from tasks.jobs import run_jobs
from tasks.leases import LeaseKeeper
from tasks.store import JobStore
from tasks.sweeper import UNACKED_INDEX_KEY, UNACKED_KEY, Sweeper
from tasks.worker import WorkerRuntime, drain
from tests.conftest import eventually

PATIENCE_S = 20.0  # how long a step may take before the test gives up (not a measurement)


class HeldEngine:
    """An engine that holds every request until the test resolves or fails it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.futures: dict[str, Future[Completion]] = {}

    def submit(self, request: Any, on_text: Any = None) -> Future[Completion]:
        future: Future[Completion] = Future()
        with self._lock:
            self.futures[request.request_id] = future
        return future

    def cancel(self, request_id: str) -> None:
        self._resolve(request_id, "cancelled")

    def live(self) -> list[str]:
        with self._lock:
            return [rid for rid, f in self.futures.items() if not f.done()]

    def finish(self, request_id: str) -> None:
        self._resolve(request_id, "length")

    def fail(self, request_id: str, error: Exception) -> None:
        with self._lock:
            future = self.futures[request_id]
        future.set_exception(error)

    def _resolve(self, request_id: str, reason: str) -> None:
        with self._lock:
            future = self.futures.get(request_id)
        if future is not None and not future.done():
            future.set_result(Completion(request_id, f"text of {request_id}", [7, 8],
                                         reason, prompt_tokens=3, completion_tokens=2))


def make_config(redis_url: str, **overrides: Any) -> DeploymentConfig:
    return parse_config({"redis": {"url": redis_url, "lease_s": 30.0},
                         "model": {"build_if_missing": False}, **overrides})


@pytest.fixture
def engine() -> HeldEngine:
    return HeldEngine()


@pytest.fixture
def make_runtime(redis_url: str, engine: HeldEngine
                 ) -> Iterator[Callable[..., WorkerRuntime]]:
    made: list[WorkerRuntime] = []

    def make(**overrides: Any) -> WorkerRuntime:
        config = make_config(redis_url, **overrides)
        store = JobStore.from_url(redis_url, 600, outage_s=5, max_connections=16)
        lease_s = config.redis.lease_s
        leases = LeaseKeeper(store, lease_s=lease_s, beat_s=lease_s / 3, stop_job=engine.cancel)
        runtime = WorkerRuntime(config, engine, store, "w@test", "cpu", "held", leases,
                                AdmissionGate(config.jobs_in_flight_limit), Finishers(2))
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.gate.close()
        runtime.finishers.stop(5)


def submit(producer: Producer, tmp_path: Path, n: int, priority: str = "low") -> str:
    path = tmp_path / f"{priority}-{n}.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{priority} {i}", "max_tokens": 4}) + "\n"
                            for i in range(n)))
    return producer.submit(path, priority=priority).batch_id


def job_ids(producer: Producer, batch_id: str) -> list[str]:
    return [r.job_id for r in producer.store.iter_jobs(batch_id)]


def states(producer: Producer, batch_id: str) -> list[str]:
    return [r.state for r in producer.store.iter_jobs(batch_id)]


def assert_stored_once(producer: Producer, batch_id: str, n: int) -> None:
    records = list(producer.store.iter_jobs(batch_id))
    assert [r.state for r in records] == ["done"] * n
    assert all(r.result["text"] == f"text of {r.job_id}" for r in records)
    counts = producer.store.batch_counts(batch_id)
    # The counters move with the transitions: a job stored twice would count twice.
    assert sum(v for k, v in counts.items() if ":" in k) == n == counts["low:done"]


def test_a_message_is_acknowledged_while_its_jobs_still_run(tmp_path, redis_url, engine,
                                                           make_runtime):
    runtime = make_runtime(jobs_per_message=2)
    app = Celery("tideq-early-ack")
    app.conf.update(celery_settings(runtime.config))
    jobs.register(app)
    app.tideq_runtime = runtime  # type: ignore[attr-defined]
    client = runtime.store.client
    with Producer(runtime.config) as producer:
        batch = submit(producer, tmp_path, 2)
        ids = job_ids(producer, batch)
        with start_worker(app, concurrency=2, pool="threads", perform_ping_check=False,
                          loglevel="WARNING", shutdown_timeout=PATIENCE_S):
            eventually(lambda: sorted(engine.live()) == sorted(ids), "both jobs in the engine")
            # Acknowledged: kombu no longer holds the message, nor gave it back to its queue,
            # while the engine has not answered either job.
            eventually(lambda: client.hlen(UNACKED_KEY) == 0, "the message to be acknowledged")
            assert client.llen("low") == 0
            assert sorted(engine.live()) == sorted(ids)
            assert states(producer, batch) == ["running", "running"]
            assert runtime.gate.in_flight == 2
            assert set(runtime.leases.held()) == set(ids)

            for job_id in ids:
                engine.finish(job_id)
            eventually(lambda: states(producer, batch) == ["done", "done"], "both stored")
            eventually(lambda: runtime.gate.in_flight == 0, "the gate to empty")
        assert_stored_once(producer, batch, 2)
        assert runtime.leases.held() == {}
        assert client.zcard(keys.LEASES_KEY) == 0
        # A second outcome for the same job (a redelivery racing the first) changes nothing.
        jobs_done = producer.store.batch_counts(batch)["low:done"]
        assert not runtime.store.finish(ids[0], batch, "done", {"text": "again"}, 2)
        assert producer.store.batch_counts(batch)["low:done"] == jobs_done


def test_an_engine_gone_mid_job_stores_nothing_and_leaves_it_to_its_lease(
        tmp_path, redis_url, engine, make_runtime):
    runtime = make_runtime(redis={"url": redis_url, "lease_s": 0.5})
    with Producer(runtime.config) as producer:
        batch = submit(producer, tmp_path, 1)
        (job_id,) = job_ids(producer, batch)
        producer.store.client.delete("low")  # the message, as a worker took it
        assert run_jobs(runtime, [job_id], batch) == {job_id: "running"}
        engine.fail(job_id, EngineShutDownError("engine is shut down"))
        eventually(lambda: runtime.gate.in_flight == 0, "the job to leave the gate")
        # Nothing stored, no longer renewed here: the lease lapses and the sweeper sends the
        # job again.
        assert states(producer, batch) == ["running"]
        assert runtime.leases.held() == {}
        sweeper = Sweeper(runtime.store, lease_s=0.5, grace_s=0.1, owner="test")
        eventually(lambda: sweeper.sweep().lapsed == 1, "the lease to lapse")
        assert states(producer, batch) == ["queued"]
        assert producer.store.client.llen("low") == 1


def test_an_invalid_request_fails_at_once_and_leaves_the_gate(tmp_path, redis_url, engine,
                                                              make_runtime):
    runtime = make_runtime(limits={"max_output_tokens": 8, "default_max_tokens": 4})
    with Producer(runtime.config) as producer:
        batch = submit(producer, tmp_path, 1)
        (job_id,) = job_ids(producer, batch)
        record = keys.job_key(job_id)
        request = json.loads(producer.store.client.hget(record, "request"))
        request["sampling"] = {"max_tokens": 99}
        producer.store.client.hset(record, "request", json.dumps(request))
        assert run_jobs(runtime, [job_id], batch) == {job_id: "failed"}
        assert engine.live() == [] and runtime.gate.in_flight == 0
        failed = producer.store.job(job_id)
        assert failed.state == "failed" and failed.error["type"] == "invalid_request"


def test_a_low_message_waits_with_its_jobs_queued_and_a_high_one_does_not(
        tmp_path, redis_url, engine, make_runtime):
    runtime = make_runtime(max_jobs_in_flight=1)
    client = runtime.store.client
    with Producer(runtime.config) as producer:
        first, waiting = (submit(producer, tmp_path, 1, "low") for _ in range(2))
        high = submit(producer, tmp_path, 1, "high")
        (first_id,), (waiting_id,), (high_id,) = (job_ids(producer, b) for b in
                                                  (first, waiting, high))
        assert run_jobs(runtime, [first_id], first) == {first_id: "running"}
        # The second low message, held by this worker as kombu holds it, waits for room.
        client.zadd(UNACKED_INDEX_KEY, {"tag-waiting": 1.0})
        outcome: dict[str, str] = {}
        waiter = threading.Thread(target=lambda: outcome.update(
            run_jobs(runtime, [waiting_id], waiting, delivery_tag="tag-waiting")))
        waiter.start()
        eventually(lambda: runtime.gate.waiting == 1, "the low message to wait")
        assert states(producer, waiting) == ["queued"]
        # While it waits, the lease keeper marks its message taken again, as a live worker's.
        runtime.leases.beat()
        assert client.zscore(UNACKED_INDEX_KEY, "tag-waiting") > 1.0

        # A high message goes through although the worker is full.
        assert run_jobs(runtime, [high_id], high, priority="high") == {high_id: "running"}
        assert runtime.gate.in_flight == 2 and runtime.gate.waiting == 1
        engine.finish(high_id)
        eventually(lambda: states(producer, high) == ["done"], "the high job stored")
        assert states(producer, waiting) == ["queued"]  # 1 in flight: still no room

        engine.finish(first_id)  # its outcome stored: room for the waiting message
        waiter.join(PATIENCE_S)
        assert outcome == {waiting_id: "running"}
        assert states(producer, waiting) == ["running"]
        engine.finish(waiting_id)
        eventually(lambda: runtime.gate.in_flight == 0, "every job to leave the gate")
        assert states(producer, waiting) == ["done"]


class StallingEngine(HeldEngine):
    """A HeldEngine whose submit of one chosen job stalls until the test lets it go, as a
    low message's start that takes long (tokenising, a slow round trip) would."""

    def __init__(self) -> None:
        super().__init__()
        self.stall_id = ""
        self.stalled = threading.Event()
        self.go_on = threading.Event()

    def submit(self, request: Any, on_text: Any = None) -> Future[Completion]:
        if request.request_id == self.stall_id:
            self.stalled.set()
            assert self.go_on.wait(PATIENCE_S)
        return super().submit(request, on_text)


def test_low_messages_start_one_at_a_time_and_a_high_one_passes_them(
        tmp_path, redis_url, make_runtime):
    engine = StallingEngine()
    runtime = make_runtime()
    runtime.engine = engine
    with Producer(runtime.config) as producer:
        first, second = (submit(producer, tmp_path, 1, "low") for _ in range(2))
        high = submit(producer, tmp_path, 1, "high")
        (first_id,), (second_id,), (high_id,) = (job_ids(producer, b) for b in
                                                 (first, second, high))
        engine.stall_id = first_id
        outcomes: dict[str, str] = {}
        starts = [threading.Thread(target=lambda b=b, j=j: outcomes.update(run_jobs(
            runtime, [j], b))) for b, j in ((first, first_id), (second, second_id))]
        starts[0].start()
        assert engine.stalled.wait(PATIENCE_S)
        starts[1].start()
        # The second low message is past the gate (its job counted in flight) but does not
        # start while the first one's start is under way.
        eventually(lambda: runtime.gate.in_flight == 2, "the second low message at the gate")
        assert run_jobs(runtime, [high_id], high, priority="high") == {high_id: "running"}
        assert states(producer, second) == ["queued"]
        assert second_id not in engine.live() and starts[1].is_alive()

        engine.go_on.set()
        for thread in starts:
            thread.join(PATIENCE_S)
        assert outcomes == {first_id: "running", second_id: "running"}
        for job_id in (first_id, second_id, high_id):
            engine.finish(job_id)
        eventually(lambda: runtime.gate.in_flight == 0, "every job to leave the gate")
        assert [states(producer, b) for b in (first, second, high)] == [["done"]] * 3


def test_the_drain_finishes_the_jobs_in_flight_before_the_engine_stops(
        tmp_path, redis_url, engine, make_runtime):
    runtime = make_runtime()
    with Producer(runtime.config) as producer:
        batch = submit(producer, tmp_path, 2)
        ids = job_ids(producer, batch)
        assert run_jobs(runtime, ids, batch) == dict.fromkeys(ids, "running")
        drained: list[bool] = []
        drainer = threading.Thread(target=lambda: drained.append(drain(runtime, PATIENCE_S)))
        drainer.start()
        engine.finish(ids[0])
        eventually(lambda: states(producer, batch) == ["done", "running"], "the first stored")
        assert drained == []  # one job still in flight
        engine.finish(ids[1])
        drainer.join(PATIENCE_S)
        assert drained == [True] and states(producer, batch) == ["done", "done"]
        # The finishers are stopped: an outcome now is not stored, and the job lets go.
        assert not runtime.finishers.submit(lambda: None)


def test_a_job_not_finished_by_the_drain_s_deadline_is_left_to_its_lease(
        tmp_path, redis_url, engine, make_runtime):
    runtime = make_runtime()
    with Producer(runtime.config) as producer:
        batch = submit(producer, tmp_path, 1)
        (job_id,) = job_ids(producer, batch)
        run_jobs(runtime, [job_id], batch)
        assert drain(runtime, timeout_s=0) is False
        # The engine shuts down next: its futures fail, and nothing is stored.
        engine.fail(job_id, EngineShutDownError("engine is shut down"))
        assert runtime.gate.in_flight == 0 and runtime.leases.held() == {}
        assert states(producer, batch) == ["running"]
        assert runtime.store.client.zscore(keys.LEASES_KEY, job_id) is not None


def test_the_front_trace_times_each_high_message_and_no_low_one(tmp_path, redis_url, engine,
                                                               make_runtime):
    from tasks.front_trace import FrontTrace

    runtime = make_runtime()
    runtime.front_trace = FrontTrace(tmp_path / "front.jsonl")
    with Producer(runtime.config) as producer:
        low, high = submit(producer, tmp_path, 1), submit(producer, tmp_path, 2, "high")
        (low_id,), high_ids = job_ids(producer, low), job_ids(producer, high)
        assert run_jobs(runtime, [low_id], low) == {low_id: "running"}
        assert run_jobs(runtime, high_ids, high, priority="high") == dict.fromkeys(
            high_ids, "running")
        (line,) = (tmp_path / "front.jsonl").read_text().splitlines()
        traced = json.loads(line)
        assert traced["jobs"] == high_ids
        # The jobs' started_at is taken inside the start, and both were in the engine by the end.
        started_at = float(producer.store.job(high_ids[0]).fields["started_at"])
        assert traced["start"] <= started_at <= traced["started"] <= traced["submitted"]
        assert sorted(engine.live()) == sorted([low_id, *high_ids])
        for job_id in [low_id, *high_ids]:
            engine.finish(job_id)
        eventually(lambda: runtime.gate.in_flight == 0, "the jobs to be stored")
