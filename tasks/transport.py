"""kombu's Redis transport, with two changes that keep a worker alive: a message that is not a
task envelope is logged and dropped, and a lost connection no longer ends the worker; one
that keeps a queue in order: a message popped after the worker stopped consuming goes back
where it was taken from; and one that makes a queue added to a consumer count at once.

kombu decodes what BRPOP returns inside the consumer loop, and a decoding error there escapes
to Celery as "Unrecoverable error" and stops the worker: one stray LPUSH of a non-JSON string
onto `high` took down every worker that popped it. A message that cannot be read belongs to no
job the store can see, and a job whose message was garbled is re-enqueued by the sweeper.

Selected by the `broker_transport` setting (tasks/app.py) for redis:// and rediss:// URLs.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import Empty
from kombu.transport.virtual import Message as VirtualMessage
from kombu.transport.virtual import QoS as VirtualQoS
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

log = logging.getLogger(__name__)


class UnreadableMessageError(ValueError):
    """A message from the queue that is not a kombu envelope."""


# What decoding a stray message raises: JSONDecodeError, UnicodeDecodeError and a bad base64
# body are ValueErrors. (kombu counts KeyError among its Redis *connection* errors, so a
# missing envelope field must not surface as one: Message checks the fields first.)
_UNREADABLE = (ValueError, TypeError, AttributeError, IndexError)


class Message(VirtualMessage):
    """kombu's message, refusing an envelope without the fields kombu and Celery read."""

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        properties = payload.get("properties") if isinstance(payload, dict) else None
        info = properties.get("delivery_info") if isinstance(properties, dict) else None
        if not (isinstance(info, dict) and "delivery_tag" in properties  # type: ignore[operator]
                and {"exchange", "routing_key"} <= info.keys()
                and isinstance(payload.get("headers", {}), dict)
                and isinstance(payload.get("body", ""), str)):
            raise UnreadableMessageError(f"not a task envelope: {str(payload)[:200]}")
        super().__init__(payload, channel=channel, **kwargs)


class Channel(kombu_redis.Channel):
    Message = Message
    # The socket of the connection that sends BRPOP, and its CLIENT ID (a new connection, after
    # a reconnection, has a new one); None: not known.
    _brpop_client: tuple[Any, int] | None = None

    def basic_consume(self, queue: str, *args: Any, **kwargs: Any) -> Any:
        tag = super().basic_consume(queue, *args, **kwargs)
        self._restart_brpop()
        return tag

    def _brpop_start(self, timeout: Any = None) -> None:
        self._learn_brpop_client()
        super()._brpop_start(timeout)

    def _learn_brpop_client(self) -> None:
        """Ask the BRPOP connection its CLIENT ID, once per connection, while it is idle (just
        before its BRPOP is sent): a blocked connection can only be unblocked by its id."""
        connection = getattr(self.client, "connection", None)
        sock = getattr(connection, "_sock", None)
        if sock is None or (self._brpop_client is not None and self._brpop_client[0] is sock):
            return
        try:
            self._brpop_client = (sock, int(self.client.client_id()))
        except ResponseError as err:  # CLIENT refused (an ACL): queues added wait for a BRPOP
            log.debug("no CLIENT ID for the BRPOP connection: %s", err)
            self._brpop_client = None

    def _restart_brpop(self) -> None:
        """A queue was added while a BRPOP without it blocks (the worker had stopped taking
        `low` while full, tasks/intake.py): that BRPOP waits up to brpop_timeout for the other
        queues, a second of an idle engine each time. CLIENT UNBLOCK ends it at once, as a
        timeout (kombu then sends the next BRPOP, with every queue); a reply already on its way
        is not touched (UNBLOCK finds the connection no longer blocked)."""
        connection = self._in_poll
        known = self._brpop_client
        if not connection or known is None or getattr(connection, "_sock", None) is not known[0]:
            return
        try:
            with self.conn_or_acquire() as client:
                client.client_unblock(known[1])
        except ResponseError as err:
            log.debug("could not unblock the BRPOP connection: %s", err)

    def _connparams(self, asynchronous: bool = False) -> Any:
        # Once the connection to Redis is lost, kombu tears the channel down and still uses it
        # (to restore or acknowledge the messages it holds) through a connection that is gone:
        # that raised AttributeError ('NoneType' object has no attribute 'client' / 'hostname'),
        # which escapes Celery's handling of connection errors and stopped the worker. Raised
        # as the connection error it is, Celery logs it and reconnects. The messages stay
        # recorded in Redis: their jobs finish here, or the sweeper sends them again.
        connection = self.connection
        if connection is None or connection.client is None:
            raise RedisConnectionError("the broker channel's connection is closed")
        return super()._connparams(asynchronous=asynchronous)

    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))
        except UnreadableMessageError as err:
            log.error("dropped a message: %s", err)
        except self.connection_errors:
            raise
        except _UNREADABLE as err:
            log.error("dropped a message that is not a task envelope (%s: %s)",
                      type(err).__name__, err)
        raise Empty()


class Transport(kombu_redis.Transport):
    Channel = Channel

    def _deliver(self, message: Any, queue: str) -> None:
        if queue and queue not in (self._callbacks or {}):
            # A BRPOP sent before the worker cancelled the queue's consumer (it is full, or
            # stopping) returned a message: expected, so no warning (kombu's "No consumers").
            # It goes back where it was taken from (below).
            log.debug("a message popped from %s after its consumer was cancelled goes back",
                      queue)
            self._reject_inbound_message(message)
            return
        super()._deliver(message, queue)

    def _reject_inbound_message(self, raw_message: Any) -> None:
        # A BRPOP still in flight when a stopping worker cancels its consumer returns a message
        # nobody here will take. kombu gives it back with LPUSH: at the far end of the queue,
        # behind messages enqueued after it, where the sweeper (which relies on messages leaving
        # a queue oldest first) takes its jobs for lost and sends them a second time. RPUSH
        # puts it back at the consuming end, where it was.
        channels: list[Any] = list(self.channels or [])
        for channel in channels:
            if channel:
                message = channel.Message(raw_message, channel=channel)
                channel.qos.append(message, message.delivery_tag)
                channel.qos.restore_by_tag(message.delivery_tag, leftmost=False)
                # kombu's own bookkeeping of a rejected message (the Redis side is done).
                VirtualQoS.ack(channel.qos, message.delivery_tag)
                return
