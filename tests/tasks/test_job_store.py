"""Job transitions against a real Redis: each job is counted once whatever is redelivered."""

from __future__ import annotations

import pytest
import redis

from tasks.store import JobStore, QueuedJob, UnknownBatchError


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore(redis.Redis.from_url(redis_url), ttl_s=60)


def enqueue(store: JobStore, batch: str, n: int, priority: str = "low") -> list[str]:
    jobs = [QueuedJob(f"{batch}:L{i}", i, None, f"msg{i}".encode()) for i in range(1, n + 1)]
    store.enqueue(batch, priority, jobs)
    return [j.job_id for j in jobs]


def test_enqueue_is_idempotent_and_ordered(store):
    ids = enqueue(store, "b", 3)
    assert enqueue(store, "b", 3) == ids
    assert store.client.llen("low") == 3
    assert [r.job_id for r in store.iter_jobs("b")] == ids
    assert store.batch_counts("b")["low:queued"] == 3
    assert store.client.ttl("tideq:job:b:L1") > 0


def test_finish_counts_once_even_when_redelivered(store):
    (job,) = enqueue(store, "b", 1, "high")
    assert store.start(job, "b", "w1", "0") == "queued"
    assert store.batch_counts("b")["high:running"] == 1
    # The worker died; the message is redelivered to another worker.
    assert store.start(job, "b", "w2", "1") == "running"
    assert store.finish(job, "b", "done", {"text": "x"}, completion_tokens=4)
    assert not store.finish(job, "b", "done", {"text": "y"}, completion_tokens=4)
    assert store.start(job, "b", "w3", "2") == "done"  # a third delivery is skipped
    counts = store.batch_counts("b")
    assert counts["high:done"] == 1 and counts["high:running"] == 0
    assert counts["completion_tokens"] == 4
    record = store.job(job)
    assert record is not None and record.result == {"text": "x"}
    assert record.fields["worker"] == "w2" and record.fields["deliveries"] == "1"


def test_cancel_marks_queued_jobs_and_stops_later_starts(store):
    a, b, c = enqueue(store, "b", 3)
    store.start(a, "b", "w", "0")
    assert store.cancel("b") == 2
    assert store.start(b, "b", "w", "0") == "cancelled"
    counts = store.batch_counts("b")
    assert counts["low:cancelled"] == 2 and counts["low:running"] == 1
    assert counts["low:queued"] == 0
    assert store.is_cancelled("b")
    assert store.finish(a, "b", "cancelled", {"type": "cancelled", "message": "m"})
    assert store.batch_counts("b")["low:cancelled"] == 3


def test_unknown_batch(store):
    with pytest.raises(UnknownBatchError):
        store.cancel("nope")
    with pytest.raises(UnknownBatchError):
        store.batch_counts("nope")
