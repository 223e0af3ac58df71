"""The sweeper and the lease keeper against a real Redis: stranded jobs come back, nothing
else is touched, and more threads than a default pool share one worker's store."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from tasks import keys
from tasks.leases import LeaseKeeper
from tasks.messages import MessageBuilder, decode
from tasks.store import JobStore, QueuedJob
from tasks.sweeper import UNACKED_INDEX_KEY, UNACKED_KEY, Sweeper

GRACE_S = 0.3


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore.from_url(redis_url, ttl_s=600, outage_s=5, max_connections=8)


@pytest.fixture
def sweeper(store: JobStore) -> Sweeper:
    return Sweeper(store, lease_s=5.0, grace_s=GRACE_S, owner="test-sweeper")


def enqueue(store: JobStore, batch: str, n: int, priority: str = "low") -> list[str]:
    builder = MessageBuilder()
    jobs = [QueuedJob(f"{batch}:L{i}", i, None, builder.job_message(f"{batch}:L{i}", batch,
                                                                    priority),
                      json.dumps({"prompt": f"p{i}", "priority": priority}))
            for i in range(1, n + 1)]
    store.enqueue(batch, priority, jobs)
    return [j.job_id for j in jobs]


def queued_ids(store: JobStore, queue: str) -> list[str]:
    return [decode(m)[0]["headers"]["id"] for m in store.client.lrange(queue, 0, -1)]


def test_a_message_lost_in_flight_is_sent_again_after_the_grace(store, sweeper):
    ids = enqueue(store, "b", 4)
    # A worker popped the oldest message and died before recording it as unacknowledged.
    popped = store.client.rpop("low")
    assert decode(popped)[0]["headers"]["id"] == ids[0]

    first = sweeper.sweep()
    assert first.suspects == 1 and first.lost == 0
    assert queued_ids(store, "low") == ids[:0:-1]  # untouched until the grace has passed
    time.sleep(GRACE_S + 0.1)
    second = sweeper.sweep()
    assert second.lost == 1
    # Re-sent at the back of the queue, the others untouched, nothing twice.
    assert queued_ids(store, "low") == [ids[0], ids[3], ids[2], ids[1]]
    assert store.job(ids[0]).fields["deliveries"] == "1"
    assert sweeper.sweep().lost == 0 and store.client.hlen(keys.SUSPECTS_KEY) == 0


def test_a_message_a_live_worker_holds_is_left_alone(store, sweeper):
    (job,) = enqueue(store, "b", 1)
    raw = store.client.rpop("low")
    # What kombu records for a message it delivered and that is not acknowledged yet.
    store.client.hset(UNACKED_KEY, "tag-1", json.dumps([json.loads(raw), "", "low"]))
    store.client.zadd(UNACKED_INDEX_KEY, {"tag-1": time.time()})
    sweeper.sweep()
    time.sleep(GRACE_S + 0.1)
    assert sweeper.sweep().lost == 0
    assert store.client.llen("low") == 0


def test_started_jobs_leave_the_pending_set(store, sweeper):
    a, b = enqueue(store, "b", 2)
    store.client.rpop("low")
    store.start(a, "b", "w", "0", "t", lease_s=30)
    report = sweeper.sweep()
    assert report.suspects == 0
    assert store.client.zrange(keys.pending_key("low"), 0, -1) == [b.encode()]


def test_a_dead_worker_s_jobs_come_back_when_their_leases_lapse(store, sweeper):
    a, b = enqueue(store, "b", 2, "high")
    store.client.delete("high")
    store.start(a, "b", "dead", "0", "t", lease_s=0.2)
    store.start(b, "b", "alive", "0", "t", lease_s=30)
    time.sleep(0.3)
    report = sweeper.sweep()
    assert report.lapsed == 1
    assert queued_ids(store, "high") == [a]
    assert store.job(a).state == "queued" and store.job(b).state == "running"
    counts = store.batch_counts("b")
    assert counts["high:queued"] == 1 and counts["high:running"] == 1


def test_only_one_worker_sweeps_at_a_time(store, sweeper):
    other = Sweeper(store, lease_s=5.0, grace_s=GRACE_S, owner="other")
    assert sweeper.try_sweep(hold_s=5) is not None
    assert other.try_sweep(hold_s=5) is None


def test_the_lease_keeper_renews_and_stops_cancelled_jobs(store):
    a, b = enqueue(store, "b", 2)
    stopped: list[str] = []
    keeper = LeaseKeeper(store, lease_s=1.0, beat_s=0.1, stop_job=stopped.append)
    for job in (a, b):
        store.start(job, "b", "w", "0", f"t-{job}", lease_s=1.0)
        keeper.hold(job, f"t-{job}")
    keeper.start()
    try:
        time.sleep(1.5)  # past the first leases: renewed, so nothing lapsed
        assert store.client.zscore(keys.LEASES_KEY, a) > store.clock()
        store.cancel("b")
        deadline = time.monotonic() + 5
        while sorted(set(stopped)) != sorted([a, b]):
            assert time.monotonic() < deadline, stopped
            time.sleep(0.05)
        assert not keeper.was_lost(a)
    finally:
        keeper.stop()


def test_more_threads_than_a_default_pool_share_a_worker_s_store(redis_url):
    """redis-py's default pool raises MaxConnectionsError past 100 connections; a worker's
    store waits for a free connection instead, so 160 task threads starting and finishing
    jobs at the same moment all succeed on a pool of 40."""
    threads_n = 160
    store = JobStore.from_url(redis_url, ttl_s=600, outage_s=5, max_connections=40)
    ids = enqueue(store, "many", threads_n)
    barrier = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def work(job_id: str) -> None:
        try:
            barrier.wait()
            assert store.start(job_id, "many", "w", "0", "t" + job_id, 30).runnable
            # Hold the connection-hungry phase together again.
            store.client.blpop([f"nothing:{job_id}"], timeout=0.2)
            assert store.finish(job_id, "many", "done", {"text": "x"}, 1)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    workers = [threading.Thread(target=work, args=(j,)) for j in ids]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert errors == []
    assert store.batch_counts("many")["low:done"] == threads_n
    default = redis.Redis.from_url(redis_url)
    assert default.connection_pool.max_connections < threads_n  # the case this guards
