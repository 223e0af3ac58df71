"""Queue order and redelivery through real worker processes."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from producer import Producer
from tasks.config import load_config
from tests.conftest import eventually, write_config


def _jobs(path: Path, n: int, max_tokens: int, tag: str) -> Path:
    path.write_text("".join(
        json.dumps({"prompt": f"{tag} prompt number {i}", "max_tokens": max_tokens,
                    "temperature": 0}) + "\n" for i in range(n)
    ))
    return path


def _finished_at(producer: Producer, batch_id: str) -> list[float]:
    return [float(r.fields["finished_at"]) for r in producer.store.iter_jobs(batch_id)]


@pytest.mark.parametrize("jobs_per_message", [1, 4],
                         ids=["a-job-a-message", "four-jobs-a-message"])
def test_high_jobs_overtake_a_low_backlog(tmp_path, redis_url, tiny_llama, start_worker,
                                          jobs_per_message):
    # Two task threads and a batch of two: the worker holds max_jobs_in_flight jobs (four,
    # twice its batch), plus at most one message's worth let in below that; full, it stops
    # taking low messages (a thread may hold one it took meanwhile, waiting at the gate), and
    # everything else waits in Redis. The low jobs waiting inside its engine must not hold up
    # the high ones either.
    config_path = write_config(tmp_path / "d.yaml", redis_url, tiny_llama,
                               num_workers=2, batch_size_per_gpu=2,
                               jobs_per_message=jobs_per_message)
    with Producer(load_config(config_path)) as producer:
        low = producer.submit(_jobs(tmp_path / "low.jsonl", 40, 48, "low"), priority="low")
        start_worker(config_path, concurrency=2)
        # Let the worker get busy with the low backlog before the high jobs arrive (polled
        # often: the backlog must still be there when they do).
        eventually(lambda: producer.status(low.batch_id).count("done") >= 2,
                   "the worker to start on the low jobs", patience_s=60)
        high = producer.submit(_jobs(tmp_path / "high.jsonl", 6, 8, "high"), priority="high")
        low_done_at_high_submit = producer.status(low.batch_id).count("done")

        assert producer.wait(high.batch_id, timeout=120).succeeded
        assert producer.wait(low.batch_id, timeout=300).succeeded
        last_high = max(_finished_at(producer, high.batch_id))
        low_after = sum(t > last_high for t in _finished_at(producer, low.batch_id))
        # Only the low jobs running when the high ones arrived (the batch of two, plus the one
        # finishing at that moment), and those whose stored outcomes let a waiting low message
        # through the gate, freeing a thread for the first high message, may finish in
        # between.
        low_before = 40 - low_after
        allowed = 4 + jobs_per_message
        assert low_before <= low_done_at_high_submit + allowed, (low_before,
                                                                 low_done_at_high_submit)
        assert low_after >= 40 - 10 - allowed


def test_a_killed_worker_s_jobs_are_finished_exactly_once(tmp_path, redis_url, tiny_llama,
                                                          start_worker):
    """kill -9 mid-batch: the unacknowledged jobs are redelivered to the next worker and
    every job ends done exactly once."""
    # Short leases and sweeps: the killed worker's running jobs come back within seconds
    # (the default 30 s lease would only be waited out here).
    config_path = write_config(tmp_path / "d.yaml", redis_url, tiny_llama, num_workers=4,
                               batch_size_per_gpu=4,
                               redis={"visibility_timeout_s": 3, "restore_interval_s": 1,
                                      "lease_s": 2.0, "sweep_interval_s": 0.5})
    with Producer(load_config(config_path)) as producer:
        batch = producer.submit(_jobs(tmp_path / "p.jsonl", 24, 64, "crash"))
        first = start_worker(config_path, concurrency=4)
        eventually(lambda: producer.status(batch.batch_id).count("running") > 0,
                   "the first worker to run jobs", patience_s=60)
        first.stop(signal.SIGKILL)
        in_flight = producer.status(batch.batch_id).count("running")
        assert in_flight > 0

        start_worker(config_path, concurrency=4)
        status = producer.wait(batch.batch_id, timeout=180)
        assert status.count("done") == 24 and status.total == 24
        assert status.count("running") == 0 and status.count("queued") == 0
        records = list(producer.store.iter_jobs(batch.batch_id))
        assert all(r.state == "done" for r in records)
        assert sum(int(r.fields.get("deliveries", 0)) for r in records) >= 1


def _held_at_most(records: list) -> int:
    """The most jobs of `records` started and not yet stored at any one moment (from their
    started_at and finished_at, both written by the one worker's clock)."""
    events = sorted([(float(r.fields["started_at"]), 1) for r in records]
                    + [(float(r.fields["finished_at"]), -1) for r in records])
    held = most = 0
    for _, change in events:  # at equal times a job's end sorts before another's start
        held += change
        most = max(most, held)
    return most


def test_a_high_job_is_taken_while_the_worker_holds_a_low_flood(tmp_path, redis_url,
                                                                tiny_llama, start_worker):
    """Messages are acknowledged once their jobs start, and a low message waits at the
    admission gate while the worker holds max_jobs_in_flight jobs (twice its batch of two
    here), and the full worker stops taking low messages. So the worker holds no more of a
    flood than that, and a high message, which never waits at the gate, starts long before the
    flood is through."""
    per_message, threads = 2, 3
    config_path = write_config(tmp_path / "d.yaml", redis_url, tiny_llama, num_workers=threads,
                               batch_size_per_gpu=2, jobs_per_message=per_message)
    limit = load_config(config_path).jobs_in_flight_limit
    assert limit == 4
    with Producer(load_config(config_path)) as producer:
        low = producer.submit(_jobs(tmp_path / "low.jsonl", 40, 32, "low"), priority="low")
        worker = start_worker(config_path, concurrency=threads)
        # The flood is held: the worker is at its limit and has stopped taking low messages
        # (those it took meanwhile wait at the gate), the rest is queued in Redis.
        eventually(lambda: producer.status(low.batch_id).count("running") >= limit
                   and "stops taking low messages" in worker.log(),
                   "the worker to fill up with low jobs", patience_s=60)
        high = producer.submit(_jobs(tmp_path / "high.jsonl", 1, 8, "high"), priority="high")
        assert producer.wait(high.batch_id, timeout=120).succeeded
        assert producer.wait(low.batch_id, timeout=300).succeeded

        (high_job,) = producer.store.iter_jobs(high.batch_id)
        lows = list(producer.store.iter_jobs(low.batch_id))
        high_submitted = float(high_job.fields["submitted_at"])
        high_started = float(high_job.fields["started_at"])
        low_starts = sorted(float(r.fields["started_at"]) for r in lows)
        assert high_started < low_starts[-1]
        # Between the high job's arrival and its start, at most the low message that freed a
        # task thread (its waiter let in by a stored outcome) and one let in at that moment
        # started: the high one did not wait for the flood, nor for a whole message to end.
        started_meanwhile = sum(high_submitted < t < high_started for t in low_starts)
        assert started_meanwhile <= 2 * per_message, started_meanwhile
        # Held by the worker at the high job's start: no more than the gate lets in.
        held_then = sum(float(r.fields["started_at"]) < high_started
                        < float(r.fields["finished_at"]) for r in lows)
        assert held_then <= limit + per_message - 1, held_then
        # And at any time: the count overshoots the limit by one message's jobs at most.
        assert _held_at_most(lows) <= limit + per_message - 1
