"""Job transitions against a real Redis: each job is counted once whatever is redelivered,
and a job runs under one live lease at a time."""

from __future__ import annotations

import json
import time

import pytest
import redis

from tasks import keys
from tasks.store import JobStore, QueuedJob, UnknownBatchError

LEASE_S = 30.0


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore(redis.Redis.from_url(redis_url), ttl_s=60)


def enqueue(store: JobStore, batch: str, n: int, priority: str = "low") -> list[str]:
    jobs = [QueuedJob(f"{batch}:L{i}", i, None, f"msg{i}".encode(),
                      json.dumps({"prompt": f"p{i}", "priority": priority}))
            for i in range(1, n + 1)]
    store.enqueue(batch, priority, jobs)
    return [j.job_id for j in jobs]


def test_enqueue_is_idempotent_and_ordered(store):
    ids = enqueue(store, "b", 3)
    assert enqueue(store, "b", 3) == ids
    assert store.client.llen("low") == 3
    assert [r.job_id for r in store.iter_jobs("b")] == ids
    assert store.batch_counts("b")["low:queued"] == 3
    assert store.client.ttl("tideq:job:b:L1") > 0
    # Each queued job is pending in its queue, in enqueue order.
    assert [m.decode() for m in store.client.zrange(keys.pending_key("low"), 0, -1)] == ids


def test_start_returns_the_request_and_takes_a_lease(store):
    (job,) = enqueue(store, "b", 1)
    started = store.start(job, "b", "w1", "0", "t1", LEASE_S)
    assert started.runnable and started.previous == "queued"
    assert started.request == {"prompt": "p1", "priority": "low"}
    assert store.client.zscore(keys.LEASES_KEY, job) > store.clock() + LEASE_S - 5
    assert store.client.zcard(keys.pending_key("low")) == 0
    # The same delivery retrying its call (a reply lost to a blip) keeps the job.
    again = store.start(job, "b", "w1", "0", "t1", LEASE_S)
    assert again.runnable and store.job(job).fields.get("deliveries") is None


def test_a_second_delivery_is_refused_while_the_lease_lives(store):
    (job,) = enqueue(store, "b", 1, "high")
    assert store.start(job, "b", "w1", "0", "t1", LEASE_S).runnable
    busy = store.start(job, "b", "w2", "1", "t2", LEASE_S)
    assert busy.previous == "busy" and not busy.runnable
    assert store.batch_counts("b")["high:running"] == 1


def test_a_lapsed_lease_is_taken_over_and_the_job_finishes_once(store):
    (job,) = enqueue(store, "b", 1, "high")
    assert store.start(job, "b", "w1", "0", "t1", lease_s=0.2).runnable
    time.sleep(0.3)
    # The worker died; its lease lapsed; another delivery takes the job.
    assert store.start(job, "b", "w2", "1", "t2", LEASE_S).previous == "running"
    assert store.finish(job, "b", "done", {"text": "x"}, completion_tokens=4)
    assert not store.finish(job, "b", "done", {"text": "y"}, completion_tokens=4)
    assert store.start(job, "b", "w3", "2", "t3", LEASE_S).previous == "done"
    counts = store.batch_counts("b")
    assert counts["high:done"] == 1 and counts["high:running"] == 0
    assert counts["completion_tokens"] == 4
    record = store.job(job)
    assert record is not None and record.result == {"text": "x"}
    assert record.fields["worker"] == "w2" and record.fields["deliveries"] == "1"
    assert store.client.zscore(keys.LEASES_KEY, job) is None


def test_renew_reports_cancelled_and_lost_jobs(store):
    a, b, c = enqueue(store, "b", 3)
    for job, token in ((a, "ta"), (b, "tb")):
        store.start(job, "b", "w", "0", token, lease_s=1)
    before = store.client.zscore(keys.LEASES_KEY, a)
    cancelled, lost = store.renew({a: "ta", b: "tb"}, LEASE_S)
    assert cancelled == [] and lost == []
    assert store.client.zscore(keys.LEASES_KEY, a) > before + 10
    store.finish(b, "b", "done", {"text": "x"})
    store.cancel("b")
    cancelled, lost = store.renew({a: "ta", b: "tb", c: "tc"}, LEASE_S)
    assert cancelled == [a]
    assert sorted(lost) == sorted([b, c])  # b finished; c was never started by this worker


def test_renew_covers_every_lease_of_a_full_worker_chunk_by_chunk(store, monkeypatch):
    from tasks import store as store_module

    n = 2 * store_module.RENEW_CHUNK + 3
    ids = enqueue(store, "b", n)
    for job in ids:
        store.start(job, "b", "w", "0", f"t-{job}", lease_s=1)
    store.finish(ids[-1], "b", "done", {"text": "x"})  # lost, in the last chunk
    calls = []
    script = store._renew
    monkeypatch.setattr(store, "_renew", lambda **kw: calls.append(kw) or script(**kw))
    cancelled, lost = store.renew({job: f"t-{job}" for job in ids}, LEASE_S)
    assert len(calls) == 3 and cancelled == [] and lost == [ids[-1]]
    deadline = store.clock() + LEASE_S - 5
    assert all(store.client.zscore(keys.LEASES_KEY, job) > deadline for job in ids[:-1])


def test_finish_renews_the_ttl_of_every_key_of_the_batch(store):
    (job,) = enqueue(store, "b", 1)
    for key in (keys.batch_key("b"), keys.batch_jobs_key("b"), keys.job_key(job)):
        store.client.expire(key, 5)
    store.start(job, "b", "w", "0", "t", LEASE_S)
    store.finish(job, "b", "done", {"text": "x"})
    for key in (keys.batch_key("b"), keys.batch_jobs_key("b"), keys.job_key(job)):
        assert store.client.ttl(key) > 30, key


def test_requeue_only_what_is_still_stranded(store):
    a, b = enqueue(store, "b", 2)
    store.client.delete("low")  # both messages vanished
    store.start(a, "b", "w", "0", "t", lease_s=0.2)
    # a is running under a live lease: not re-enqueued as lapsed; b is queued: re-enqueued.
    assert not store.requeue(a, "b", "low", b"new-a", "lease")
    assert not store.requeue(b, "b", "low", b"new-b", "lease")
    assert store.requeue(b, "b", "low", b"new-b", "lost")
    time.sleep(0.3)
    assert store.requeue(a, "b", "low", b"new-a", "lease")
    assert not store.requeue(a, "b", "low", b"new-a", "lease")  # now queued, not running
    assert store.client.lrange("low", 0, -1) == [b"new-a", b"new-b"]
    counts = store.batch_counts("b")
    assert counts["low:queued"] == 2 and counts["low:running"] == 0
    assert store.job(a).fields["deliveries"] == "1"


def test_cancel_marks_queued_jobs_and_stops_later_starts(store):
    a, b, c = enqueue(store, "b", 3)
    store.start(a, "b", "w", "0", "t", LEASE_S)
    assert store.cancel("b") == 2
    assert store.start(b, "b", "w", "0", "t2", LEASE_S).previous == "cancelled"
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
