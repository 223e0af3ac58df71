"""tideq's kombu transport against a real Redis: what used to stop a worker does not."""

from __future__ import annotations

import json

import pytest
import redis
from kombu import Connection, Consumer, Queue
from kombu.common import ignore_errors

from tasks.messages import MessageBuilder


def consumer(url: str) -> tuple[Connection, list]:
    """A kombu connection through tideq's transport, consuming `high` into a list."""
    conn = Connection(url, transport="tasks.transport:Transport")
    got: list = []
    consumer = Consumer(conn.default_channel, [Queue("high", routing_key="high")],
                        callbacks=[lambda body, message: got.append(message)])
    consumer.consume()
    return conn, got


def test_undecodable_messages_are_dropped_not_raised(redis_url):
    client = redis.Redis.from_url(redis_url)
    for raw in (b"not json", b'{"json": 1}', b"[1]", b'{"properties": {}}'):
        client.lpush("high", raw)
    good = MessageBuilder().job_message("b:L1", "b", "high")
    client.lpush("high", good)
    conn, got = consumer(redis_url)
    for _ in range(5):
        try:
            conn.drain_events(timeout=1)
        except TimeoutError:
            break
        if got:
            break
    assert [m.headers["id"] for m in got] == ["b:L1"]
    assert client.llen("high") == 0
    conn.release()


def test_a_channel_whose_connection_is_gone_raises_connection_errors_only(redis_url):
    """After a lost connection kombu restores and acknowledges messages through a connection
    already torn down; that raised AttributeError, which Celery took as unrecoverable and
    stopped the worker. A connection error is what Celery handles (it logs and reconnects)."""
    redis.Redis.from_url(redis_url).lpush("high", MessageBuilder().job_message("b:L2", "b",
                                                                               "high"))
    conn, got = consumer(redis_url)
    conn.drain_events(timeout=5)
    assert len(got) == 1  # delivered, not acknowledged
    channel = conn.default_channel
    # What a lost connection leaves behind: pools dropped, the connection gone.
    channel._disconnect_pools()
    channel.__dict__.pop("client", None)
    channel.connection.client = None
    with pytest.raises(redis.ConnectionError):
        got[0].ack()
    # Closing restores through the same path; Celery closes with kombu's ignore_errors, which
    # swallows connection errors (and used to let the AttributeError through).
    ignore_errors(conn, channel.close)
    # The message stays recorded as unacknowledged, for the sweeper or kombu to send again.
    client = redis.Redis.from_url(redis_url)
    (stored,) = client.hvals("unacked")
    assert json.loads(stored)[0]["headers"]["id"] == "b:L2"


def test_a_message_popped_after_the_consumer_stopped_goes_back_where_it_was(redis_url):
    """A stopping worker cancels its consumer while a BRPOP may still be in flight; the message
    it returns is given back at the consuming end, so the queue's order (which the sweeper
    relies on) is kept and nothing is left recorded as unacknowledged."""
    client = redis.Redis.from_url(redis_url)
    builder = MessageBuilder()
    for job in ("b:L1", "b:L2", "b:L3"):
        client.lpush("low", builder.job_message(job, "b", "low"))
    conn = Connection(redis_url, transport="tasks.transport:Transport")
    listener = Consumer(conn.default_channel, [Queue("low", routing_key="low")],
                        callbacks=[lambda body, message: None])
    listener.consume()
    listener.cancel()
    popped = client.rpop("low")  # what the in-flight BRPOP took: the oldest message
    conn.transport._deliver(json.loads(popped), "low")
    order = [json.loads(m)["headers"]["id"] for m in reversed(client.lrange("low", 0, -1))]
    assert order == ["b:L1", "b:L2", "b:L3"]  # the next one consumed is still the oldest
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
    conn.release()


def test_a_queue_added_while_a_brpop_without_it_blocks_is_consumed_at_once(redis_url):
    """A full worker stops consuming `low` and later adds it back (tasks/intake.py) while its
    BRPOP on `high` alone blocks in Redis. That BRPOP is ended at once, so the next one takes
    `low` too, instead of after brpop_timeout (a second of idle engine each time)."""
    from tests.conftest import eventually

    client = redis.Redis.from_url(redis_url)
    conn, got = consumer(redis_url)
    channel = conn.default_channel
    # Long enough that a BRPOP left alone outlasts the patience below.
    channel.brpop_timeout = 60
    with pytest.raises(TimeoutError):
        conn.drain_events(timeout=0.01)  # sends BRPOP high, and leaves it blocked
    host, port = channel.client.connection._sock.getsockname()[:2]
    brpop_addr = f"{host}:{port}"

    def brpop_blocked() -> bool:
        (info,) = [c for c in client.client_list() if c["addr"] == brpop_addr]
        return "b" in info["flags"]

    eventually(brpop_blocked, "the BRPOP on high to block")
    client.lpush("low", MessageBuilder().job_message("b:L1", "b", "low"))
    listener = Consumer(channel, [Queue("low", routing_key="low")],
                        callbacks=[lambda body, message: got.append(message)])
    listener.consume()
    assert not brpop_blocked()
    conn.drain_events(timeout=10)
    assert [m.headers["id"] for m in got] == ["b:L1"]
    conn.release()
