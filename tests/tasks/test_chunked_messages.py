"""Messages of several jobs (jobs_per_message) against a real Redis: each job is still
recorded, started, found missing and sent again on its own."""

from __future__ import annotations

import json
import time

import pytest

from tasks import keys
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
    raw = store.client.rpop("low")
    # What kombu records for a message it delivered and that is not acknowledged yet.
    store.client.hset(UNACKED_KEY, "tag-1", json.dumps([json.loads(raw), "", "low"]))
    store.client.zadd(UNACKED_INDEX_KEY, {"tag-1": time.time()})
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
