"""tideq's kombu transport against a real Redis: what used to stop a worker does not."""

from __future__ import annotations

import json

import redis
from kombu import Connection, Consumer, Queue

from tasks.messages import MessageBuilder


def consume_one(url: str, raw: bytes) -> tuple[Connection, list]:
    client = redis.Redis.from_url(url)
    client.lpush("high", raw)
    conn = Connection(url, transport="tasks.transport:Transport")
    got: list = []
    consumer = Consumer(conn.default_channel, [Queue("high", routing_key="high")],
                        callbacks=[lambda body, message: got.append(message)])
    consumer.consume()
    conn.drain_events(timeout=5)
    return conn, got


def test_undecodable_messages_are_dropped_not_raised(redis_url):
    client = redis.Redis.from_url(redis_url)
    for raw in (b"not json", b'{"json": 1}', b"[1]", b'{"properties": {}}'):
        client.lpush("high", raw)
    good = MessageBuilder().job_message("b:L1", "b", "high")
    client.lpush("high", good)
    conn = Connection(redis_url, transport="tasks.transport:Transport")
    got: list = []
    consumer = Consumer(conn.default_channel, [Queue("high", routing_key="high")],
                        callbacks=[lambda body, message: got.append(message)])
    consumer.consume()
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


def test_closing_a_channel_whose_connection_is_gone_does_not_raise(redis_url):
    """kombu restores unacknowledged messages when a channel closes; after a lost connection
    it did so through a connection already torn down and raised AttributeError, which Celery
    took as unrecoverable and stopped the worker."""
    raw = MessageBuilder().job_message("b:L2", "b", "high")
    conn, got = consume_one(redis_url, raw)
    assert len(got) == 1  # delivered, not acknowledged
    channel = conn.default_channel
    channel.connection.client = None  # what a lost connection leaves behind
    channel.close()
    # The message stays recorded as unacknowledged, for the sweeper or kombu to send again.
    client = redis.Redis.from_url(redis_url)
    (stored,) = client.hvals("unacked")
    assert json.loads(stored)[0]["headers"]["id"] == "b:L2"
