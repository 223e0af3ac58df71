"""The sweeper and the lease keeper against a real Redis: stranded jobs come back, nothing
else is touched, and more threads than a default pool share one worker's store; in
messages of several jobs, every job is started and sent again on its own."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from tasks import keys
from tasks.leases import LeaseKeeper
from tasks.messages import MessageBuilder, decode, job_ids_of
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


def take_unacknowledged(store: JobStore, queue: str) -> None:
    """Take the oldest message of `queue` as a live worker does: kombu records a message it
    delivered and that is not acknowledged yet in its unacked hash and index."""
    raw = store.client.rpop(queue)
    store.client.hset(UNACKED_KEY, "tag-1", json.dumps([json.loads(raw), "", queue]))
    store.client.zadd(UNACKED_INDEX_KEY, {"tag-1": time.time()})


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
    take_unacknowledged(store, "low")
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


# --- messages of several jobs (jobs_per_message): each job is still recorded, started, found
# missing and sent again on its own ---------------------------------------------------------
def chunked(batch: str, lines: range, per_message: int, priority: str = "low"
            ) -> list[QueuedJob]:
    """QueuedJobs as the producer builds them: the last job of each group carries the group's
    message."""
    builder = MessageBuilder()
    ids = [f"{batch}:L{i}" for i in lines]
    jobs = []
    for start in range(0, len(ids), per_message):
        group = ids[start:start + per_message]
        for k, job_id in enumerate(group):
            message = (builder.jobs_message(group, batch, priority)
                       if k == len(group) - 1 else b"")
            jobs.append(QueuedJob(job_id, int(job_id.rsplit("L", 1)[1]), None, message,
                                  json.dumps({"prompt": job_id, "priority": priority})))
    return jobs


def messages_in(store: JobStore, queue: str) -> list[list[str]]:
    """The job ids of each message of a queue, oldest (next consumed) first."""
    return [job_ids_of(decode(m)[0]) for m in reversed(store.client.lrange(queue, 0, -1))]


def test_one_message_per_group_each_job_recorded(store):
    store.enqueue("b", "low", chunked("b", range(1, 11), per_message=4))
    assert messages_in(store, "low") == [
        ["b:L1", "b:L2", "b:L3", "b:L4"], ["b:L5", "b:L6", "b:L7", "b:L8"], ["b:L9", "b:L10"]]
    # The message's task id is its first job's: the lowest enqueue sequence it holds.
    first = decode(store.client.lindex("low", -1))[0]
    assert first["headers"]["id"] == "b:L1"
    assert store.batch_counts("b")["low:queued"] == 10
    assert store.client.zcard(keys.pending_key("low")) == 10


def test_a_resubmitted_group_is_not_pushed_again_a_partly_new_one_is(store):
    store.enqueue("b", "low", chunked("b", range(1, 5), per_message=4))
    # The same four again (a resubmission after a lost reply) push nothing...
    assert store.enqueue("b", "low", chunked("b", range(1, 5), per_message=4)) == 0
    assert store.client.llen("low") == 1
    # ...a group with one new job is pushed whole; its old jobs are skipped at start.
    assert store.enqueue("b", "low", chunked("b", range(3, 7), per_message=4)) == 2
    assert messages_in(store, "low")[-1] == ["b:L3", "b:L4", "b:L5", "b:L6"]
    with pytest.raises(ValueError, match="must carry a message"):
        store.enqueue("b", "low", [QueuedJob("b:L9", 9, None, b"", "{}")])


def test_each_job_of_a_message_is_started_on_its_own(store):
    store.enqueue("b", "low", chunked("b", range(1, 5), per_message=4))
    ids = ["b:L1", "b:L2", "b:L3", "b:L4"]
    # L1 finished already, L2 runs under another delivery's live lease.
    store.start("b:L1", "b", "w0", "0", "t-old", lease_s=30)
    store.finish("b:L1", "b", "done", {"text": "x"}, 1)
    store.start("b:L2", "b", "w0", "0", "t-live", lease_s=30)
    started = store.start_many(ids, "b", "w1", "1", ["a", "b", "c", "d"], lease_s=30)
    assert [s.previous for s in started] == ["done", "busy", "queued", "queued"]
    assert [s.runnable for s in started] == [False, False, True, True]
    assert started[2].request == {"prompt": "b:L3", "priority": "low"}
    assert started[0].request is None and started[1].request is None
    counts = store.batch_counts("b")
    assert counts["low:running"] == 3 and counts["low:done"] == 1
    assert counts.get("low:queued", 0) == 0
    assert store.job("b:L3").fields["worker"] == "w1"
    assert store.job("b:L2").fields["worker"] == "w0"


def test_a_cancelled_batch_s_jobs_are_refused_at_start(store):
    store.enqueue("b", "low", chunked("b", range(1, 4), per_message=3))
    store.cancel("b")
    started = store.start_many(["b:L1", "b:L2", "b:L3"], "b", "w", "0", ["x", "y", "z"], 30)
    assert [s.previous for s in started] == ["cancelled"] * 3
    assert store.batch_counts("b")["low:cancelled"] == 3


def test_a_lost_message_of_several_jobs_comes_back_one_message_per_job(store, sweeper):
    store.enqueue("b", "low", chunked("b", range(1, 9), per_message=4))
    # A worker popped the first message (L1-L4) and died before kombu recorded it.
    store.client.rpop("low")
    assert sweeper.sweep().suspects == 4
    time.sleep(GRACE_S + 0.1)
    assert sweeper.sweep().lost == 4
    assert messages_in(store, "low") == [
        ["b:L5", "b:L6", "b:L7", "b:L8"], ["b:L1"], ["b:L2"], ["b:L3"], ["b:L4"]]
    assert sweeper.sweep().lost == 0


def test_every_job_of_a_message_a_live_worker_holds_is_left_alone(store, sweeper):
    store.enqueue("b", "low", chunked("b", range(1, 9), per_message=4))
    take_unacknowledged(store, "low")
    sweeper.sweep()
    time.sleep(GRACE_S + 0.1)
    assert sweeper.sweep().lost == 0
    assert messages_in(store, "low") == [["b:L5", "b:L6", "b:L7", "b:L8"]]


def test_job_ids_of_refuses_what_is_not_a_generate_message():
    builder = MessageBuilder()
    envelope = json.loads(builder.build("t", "low", {"job_ids": "not-a-list", "batch_id": "b"}))
    with pytest.raises(ValueError, match="job_ids must be a list"):
        job_ids_of(envelope)
    with pytest.raises(ValueError, match="not a tideq.generate message"):
        job_ids_of({"body": "@@not base64@@"})
    assert job_ids_of(json.loads(builder.job_message("b:L1", "b", "low"))) == ["b:L1"]
