"""Faults with real processes: a real redis-server with AOF (started here, on a spare port),
real `celery -A tasks worker` processes and a real tiny model. Whatever happens to workers and
Redis, every accepted job ends exactly once: jobs submitted = jobs done, none lost, none
counted twice.

Leases and sweeps are short here (2 s, 0.5 s) so that redelivery is quick; kombu's own
visibility timeout stays at an hour, so what brings jobs back is the sweeper, not kombu.
"""

from __future__ import annotations

import base64
import json
import pickle
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from producer import Producer
from tasks import keys
from tasks.config import load_config
from tasks.messages import MessageBuilder, job_ids_of
from tasks.store import QueuedJob
from tasks.sweeper import UNACKED_KEY
from tests.conftest import write_config

pytestmark = pytest.mark.faults

FAST_RECOVERY = {"lease_s": 2.0, "sweep_interval_s": 0.5, "visibility_timeout_s": 3600,
                 "outage_s": 60}


def prompts(path: Path, n: int, max_tokens: int, tag: str) -> Path:
    path.write_text("".join(
        json.dumps({"prompt": f"{tag} prompt number {i} " + "word " * (i % 7),
                    "max_tokens": max_tokens, "temperature": 0}) + "\n" for i in range(n)))
    return path


def fault_config(tmp_path: Path, url: str, model: Path, **overrides: Any) -> Path:
    return write_config(tmp_path / "faults.yaml", url, model,
                        redis={"url": url, **FAST_RECOVERY}, **overrides)


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def assert_exactly_once(producer: Producer, batch_id: str, n: int,
                        timeout: float = 180) -> list[Any]:
    status = producer.wait(batch_id, timeout=timeout, poll_s=0.1)
    records = list(producer.store.iter_jobs(batch_id))
    assert len(records) == n == status.total
    assert [r.state for r in records].count("done") == n, status
    # Counters are moved by the same scripts that move states: a job finished twice would
    # count twice here.
    counts = producer.store.batch_counts(batch_id)
    assert sum(v for k, v in counts.items() if ":" in k) == n
    assert counts["low:done"] + counts.get("high:done", 0) == n
    assert all(r.result and r.result["completion_tokens"] >= 1 for r in records)
    return records


def jobs_done(producer: Producer, batch_ids: list[str]) -> int:
    return sum(producer.status(b).count("done") for b in batch_ids)


def running_with_message_acknowledged(producer: Producer, batch_ids: list[str]) -> set[str]:
    """Running jobs whose message kombu no longer holds: it was acknowledged when they
    started, so only their leases bring them back if their worker dies."""
    held: set[str] = set()
    for raw in producer.store.client.hvals(UNACKED_KEY):
        held.update(job_ids_of(json.loads(raw)[0]))
    running = {r.job_id for b in batch_ids for r in producer.store.iter_jobs(b)
               if r.state == "running"}
    return running - held


@pytest.mark.parametrize("jobs_per_message,threads", [(1, 6), (4, 3)],
                         ids=["a-job-a-message", "four-jobs-a-message"])
def test_kill_9_of_a_worker_mid_batch_repeated(tmp_path, redis_url, tiny_llama, start_worker,
                                               jobs_per_message, threads):
    config_path = fault_config(tmp_path, redis_url, tiny_llama, num_workers=threads,
                               batch_size_per_gpu=6, jobs_per_message=jobs_per_message)
    with Producer(load_config(config_path)) as producer:
        batches: list[str] = []
        for kill in range(3):
            # Each round's worker finds a batch of its own queued, besides what the killed
            # ones left: a worker can finish a few dozen tiny jobs in the moment it takes to
            # see it busy, and one batch for all rounds could run out before the last kill.
            batches.append(producer.submit(
                prompts(tmp_path / f"p{kill}.jsonl", 30, 24, f"kill{kill}")).batch_id)
            worker = start_worker(config_path, concurrency=threads)
            done_before = jobs_done(producer, batches)
            wait_until(lambda n=done_before: jobs_done(producer, batches) > n + 2
                       and running_with_message_acknowledged(producer, batches), 120,
                       f"the worker of round {kill} to be busy")
            # Killed while it runs jobs whose messages are already acknowledged.
            worker.stop(signal.SIGKILL)
        start_worker(config_path, concurrency=threads)
        records = [r for b in batches for r in assert_exactly_once(producer, b, 30)]
        assert sum(int(r.fields.get("deliveries", 0)) for r in records) >= 3


def test_a_message_lost_between_redis_and_a_worker_is_sent_again(tmp_path, redis_url,
                                                                 tiny_llama, start_worker):
    """kombu pops a message (BRPOP) before recording it as unacknowledged; a worker killed in
    between loses it. Popping it here is that loss, exactly."""
    config_path = fault_config(tmp_path, redis_url, tiny_llama)
    with Producer(load_config(config_path)) as producer:
        batch = producer.submit(prompts(tmp_path / "p.jsonl", 10, 8, "lost")).batch_id
        popped = json.loads(producer.store.client.rpop("low"))
        start_worker(config_path)
        records = assert_exactly_once(producer, batch, 10)
        lost = next(r for r in records if r.job_id == popped["headers"]["id"])
        assert lost.fields["deliveries"] == "1"


def test_sigterm_drains_the_running_jobs(tmp_path, redis_url, tiny_llama, start_worker):
    config_path = fault_config(tmp_path, redis_url, tiny_llama, num_workers=4,
                               batch_size_per_gpu=4)
    with Producer(load_config(config_path)) as producer:
        batch = producer.submit(prompts(tmp_path / "p.jsonl", 24, 32, "term")).batch_id
        worker = start_worker(config_path, concurrency=4)
        wait_until(lambda: producer.status(batch).count("running") >= 2, 120, "running jobs")
        running = {r.job_id for r in producer.store.iter_jobs(batch) if r.state == "running"}
        worker.stop(signal.SIGTERM, timeout=120)
        assert worker.proc.returncode == 0, worker.log()
        # Warm shutdown: what was running when the signal came was finished, not dropped.
        states = {r.job_id: r.state for r in producer.store.iter_jobs(batch)}
        assert all(states[j] == "done" for j in running), states
        start_worker(config_path, concurrency=4)
        records = assert_exactly_once(producer, batch, 24)
        assert all(int(r.fields.get("deliveries", 0)) == 0 for r in records)


def test_kill_9_of_redis_and_restart_mid_batch(tmp_path, private_redis, tiny_llama,
                                               start_worker):
    url = private_redis.url()
    config_path = fault_config(tmp_path, url, tiny_llama, num_workers=6, batch_size_per_gpu=6)
    with Producer(load_config(config_path)) as producer:
        batch = producer.submit(prompts(tmp_path / "p.jsonl", 48, 24, "redis")).batch_id
        worker = start_worker(config_path, concurrency=6)
        for restart in range(2):
            done_before = producer.status(batch).count("done")
            wait_until(lambda n=done_before: producer.status(batch).count("done") > n + 3, 120,
                       f"progress before Redis restart {restart}")
            private_redis.restart(down_s=1.5)
        records = assert_exactly_once(producer, batch, 48)
        assert worker.proc.poll() is None, worker.log()
        assert len(records) == 48


def _envelope_with(builder: MessageBuilder, task_id: str, queue: str,
                   **changes: Any) -> bytes:
    """A well-formed envelope with some fields changed ("headers__task": headers["task"])."""
    envelope = builder.envelope(task_id, queue, {"job_id": task_id, "batch_id": "x"})
    for path, value in changes.items():
        part, _, name = path.partition("__")
        if name:
            envelope[part][name] = value
        else:
            envelope[part] = value
    return json.dumps(envelope).encode()


def test_garbage_and_pickle_messages_are_dropped_and_the_worker_goes_on(
        tmp_path, redis_url, tiny_llama, start_worker):
    config_path = fault_config(tmp_path, redis_url, tiny_llama)
    builder = MessageBuilder()
    with Producer(load_config(config_path)) as producer:
        client = producer.store.client
        # A job whose message names arguments the task does not take: it is refused by
        # Celery, and the sweeper sends the job again with a good message.
        bad_args_job = QueuedJob(
            "mangled:L1", 1, None,
            builder.build("mangled:L1", "high", {"job_id": "mangled:L1", "nope": 1}),
            json.dumps({"prompt": "mangled job", "sampling": {"max_tokens": 4},
                        "priority": "high"}))
        producer.store.enqueue("mangled", "high", [bad_args_job])
        # Pickle would let anyone who can write to Redis run code on a worker.
        pickled = base64.b64encode(pickle.dumps([[], {"job_id": "p", "batch_id": "x"}, {}]))
        for raw in (
            b"this is not JSON",
            b'{"json": "but not an envelope"}',
            b"[1, 2, 3]",
            b'{"properties": {"delivery_tag": "t"}, "body": ""}',
            b"\xff\xfe binary",
            _envelope_with(builder, "pickled", "high", body=pickled.decode(), **{
                "content-type": "application/x-python-serialize", "content-encoding": "binary"}),
            _envelope_with(builder, "unknown-task", "high", headers__task="no.such.task"),
        ):
            client.lpush("high", raw)
        worker = start_worker(config_path)
        batch = producer.submit(prompts(tmp_path / "p.jsonl", 8, 8, "after")).batch_id
        assert_exactly_once(producer, batch, 8)
        wait_until(lambda: producer.store.job("mangled:L1").state == "done", 60,
                   "the mangled job to be sent again and done")
        assert worker.proc.poll() is None
        log = worker.log()
        assert log.count("dropped a message") >= 5, log
        # Dropped in place: the consumer never took them for a broken connection.
        assert "Connection to broker lost" not in log, log
        assert client.llen("high") == 0


def test_a_poison_job_fails_alone_in_a_busy_batch(tmp_path, redis_url, tiny_llama,
                                                  start_worker):
    """A request the engine cannot serve (top_k 2**70 once failed every job of its step)
    fails alone, with the reason; its batch-mates finish."""
    config_path = fault_config(tmp_path, redis_url, tiny_llama, num_workers=8)
    builder = MessageBuilder()
    with Producer(load_config(config_path)) as producer:
        batch = producer.submit(prompts(tmp_path / "p.jsonl", 16, 16, "mate")).batch_id
        poison_id = f"{batch}:poison"
        request = {"prompt": "poison", "priority": "low",
                   "sampling": {"max_tokens": 8, "temperature": 1.0, "top_k": 2 ** 70}}
        producer.store.enqueue(batch, "low", [QueuedJob(
            poison_id, 99, "poison", builder.job_message(poison_id, batch, "low"),
            json.dumps(request))])
        start_worker(config_path, concurrency=8)
        status = producer.wait(batch, timeout=180, poll_s=0.1)
        assert status.total == 17 and status.count("done") == 16
        assert status.count("failed") == 1
        poison = producer.store.job(poison_id)
        assert poison is not None and poison.state == "failed"
        assert poison.error["type"] == "invalid_request" and "top_k" in poison.error["message"]


def test_no_lease_or_pending_entry_is_left_behind(tmp_path, redis_url, tiny_llama,
                                                 start_worker):
    config_path = fault_config(tmp_path, redis_url, tiny_llama)
    with Producer(load_config(config_path)) as producer:
        batch = producer.submit(prompts(tmp_path / "p.jsonl", 6, 4, "clean")).batch_id
        start_worker(config_path)
        assert_exactly_once(producer, batch, 6)
        client = producer.store.client
        assert client.zcard(keys.LEASES_KEY) == 0
        assert client.zcard(keys.pending_key("low")) == 0
