"""A full worker stops taking `low` messages, through a real worker process: they stay in Redis
while a `high` one is still taken, and once the worker has room it takes them again. At twice
its limit it stops taking `high` messages too, until a job ends.

The worker's engine core process is stopped (SIGSTOP) while the flood arrives, so no job ends
and the worker stays full for as long as the test looks; SIGCONT lets it drain."""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from producer import Producer
from tasks.config import load_config
from tasks.messages import job_ids_of
from tests.conftest import eventually, write_config

LOW_JOBS = 20
# Many more task threads than the few messages the worker can take in the moment between
# filling up and its consumer pausing: a thread stays free for `high`.
THREADS = 10


def _jobs(path: Path, n: int, tag: str) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{tag} prompt number {i}", "max_tokens": 8,
                                        "temperature": 0}) + "\n" for i in range(n)))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _paused(port: int, queue: str = "low") -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"tideq_{queue}_consumption_paused":
                return sample.value
    return None


def _engine_core_pid(worker_pid: int) -> int:
    """The worker's engine core: its child spawned by multiprocessing (the other child is
    multiprocessing's resource tracker)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(") ", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except OSError:
            continue
        if parent == worker_pid and b"spawn_main" in command:
            return int(entry)
    raise AssertionError(f"worker {worker_pid} has no engine core process")


@contextmanager
def _stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _config(tmp_path: Path, redis_url: str, model: Path, metrics_port: int) -> Path:
    """A worker with a batch of one, so full at max_jobs_in_flight = 2 jobs."""
    path = write_config(tmp_path / "d.yaml", redis_url, model, num_workers=THREADS,
                        batch_size_per_gpu=1, metrics_port=metrics_port)
    assert load_config(path).jobs_in_flight_limit == 2
    return path


def _assert_finished_once(producer: Producer, batch_id: str, n: int) -> list[Any]:
    """Every job done, counted once, and none sent again by the sweeper."""
    records = list(producer.store.iter_jobs(batch_id))
    assert [r.state for r in records] == ["done"] * n
    assert all(int(r.fields.get("deliveries", 0)) == 0 for r in records)
    counts = producer.store.batch_counts(batch_id)
    assert sum(v for k, v in counts.items() if ":" in k) == n
    return records


def test_a_full_worker_leaves_low_in_redis_takes_high_and_resumes(tmp_path, redis_url,
                                                                   tiny_llama, start_worker):
    port = _free_port()
    config_path = _config(tmp_path, redis_url, tiny_llama, port)
    limit = load_config(config_path).jobs_in_flight_limit
    worker = start_worker(config_path, concurrency=THREADS)
    assert _paused(port) == 0
    with Producer(load_config(config_path)) as producer:
        client = producer.store.client

        def running(batch_id: str) -> int:
            return producer.status(batch_id).count("running")

        with _stopped(_engine_core_pid(worker.proc.pid)):
            low = producer.submit(_jobs(tmp_path / "low.jsonl", LOW_JOBS, "low"),
                                  priority="low")
            eventually(lambda: running(low.batch_id) == limit, "the worker to fill up")
            eventually(lambda: _paused(port) == 1, "the worker to stop taking low")
            # Still taken while the worker is full: a high message never waits for room.
            high = producer.submit(_jobs(tmp_path / "high1.jsonl", 1, "high"), priority="high")
            eventually(lambda: running(high.batch_id) == 1, "the high job to start")
            backlog = client.lrange("low", 0, -1)
            # A consumer still taking low would pop the backlog with the BRPOP that comes
            # after the first high message's; the second high message comes with a later one.
            second = producer.submit(_jobs(tmp_path / "high2.jsonl", 1, "high"),
                                     priority="high")
            eventually(lambda: running(second.batch_id) == 1, "the second high job to start")
            assert client.lrange("low", 0, -1) == backlog
            assert len(backlog) >= LOW_JOBS - THREADS
            # Still full: the low messages taken before the pause wait at the gate.
            assert running(low.batch_id) == limit
            assert "stops taking low messages" in worker.log()
            # limit low jobs and two high ones: twice the limit in flight, so high is paused
            # too, and a third high message is left in Redis until a job ends.
            eventually(lambda: _paused(port, "high") == 1, "the worker to stop taking high")
            third = producer.submit(_jobs(tmp_path / "high3.jsonl", 1, "high"), priority="high")

        assert producer.wait(high.batch_id, timeout=120).succeeded
        assert producer.wait(second.batch_id, timeout=120).succeeded
        assert producer.wait(third.batch_id, timeout=120).succeeded
        assert "stops taking high messages" in worker.log()
        assert "takes high messages again" in worker.log()
        assert producer.wait(low.batch_id, timeout=300).succeeded
        eventually(lambda: _paused(port) == 0, "the drained worker to take low again")
        assert "takes low messages again" in worker.log()

        lows = _assert_finished_once(producer, low.batch_id, LOW_JOBS)
    # The backlog left in Redis started only after the high jobs had.
    (first_high,) = producer.store.iter_jobs(high.batch_id)
    left_in_redis = {job_id for raw in backlog for job_id in job_ids_of(json.loads(raw))}
    backlog_started = [float(r.fields["started_at"]) for r in lows if r.job_id in left_in_redis]
    assert len(backlog_started) == len(backlog)
    assert float(first_high.fields["started_at"]) < min(backlog_started)
    # The third high message started only once a job held at twice the limit had ended.
    (third_high,) = producer.store.iter_jobs(third.batch_id)
    held = [r for r in lows if r.job_id not in left_in_redis] + [
        first_high, *producer.store.iter_jobs(second.batch_id)]
    first_end = min(float(r.fields["finished_at"]) for r in held)
    assert float(third_high.fields["started_at"]) >= first_end


def test_a_worker_stopped_while_full_drains_and_leaves_the_backlog_queued(
        tmp_path, redis_url, tiny_llama, start_worker):
    """Warm shutdown of a paused worker: the messages waiting at its gate start, every job it
    holds is finished, it does not start taking low again as it empties, and the next worker
    finishes the backlog."""
    port = _free_port()
    config_path = _config(tmp_path, redis_url, tiny_llama, port)
    limit = load_config(config_path).jobs_in_flight_limit
    worker = start_worker(config_path, concurrency=THREADS)
    with Producer(load_config(config_path)) as producer:
        client = producer.store.client
        with _stopped(_engine_core_pid(worker.proc.pid)):
            low = producer.submit(_jobs(tmp_path / "low.jsonl", LOW_JOBS, "low"),
                                  priority="low")
            eventually(lambda: producer.status(low.batch_id).count("running") == limit,
                       "the worker to fill up")
            eventually(lambda: _paused(port) == 1, "the worker to stop taking low")
            worker.proc.send_signal(signal.SIGTERM)
            eventually(lambda: "Warm shutdown" in worker.log(), "the warm shutdown to start")
        assert worker.proc.wait(120) == 0, worker.log()

        status = producer.status(low.batch_id)
        backlog = {job_id for raw in client.lrange("low", 0, -1)
                   for job_id in job_ids_of(json.loads(raw))}
        # Nothing taken was dropped: each job is done or still queued in Redis.
        assert status.count("done") + len(backlog) == LOW_JOBS == status.total
        assert len(backlog) >= LOW_JOBS - THREADS
        assert "takes low messages again" not in worker.log()

        start_worker(config_path, concurrency=THREADS)
        assert producer.wait(low.batch_id, timeout=300).succeeded
        _assert_finished_once(producer, low.batch_id, LOW_JOBS)
