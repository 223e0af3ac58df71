"""Celery task messages built directly as the bytes kombu's Redis transport stores.

`apply_async` costs over a millisecond a job (routing, signals, a kombu Producer, one LPUSH
round trip each); a 100,000-line file would take minutes. Instead the producer builds the exact
envelope that kombu's Redis channel LPUSHes onto a queue list and hands whole chunks of them to
JobStore.enqueue (one Lua call per chunk). The layout follows, field for field:

- celery.app.amqp.AMQP.as_task_v2: task protocol 2 headers, and the body `[args, kwargs,
  embed]` serialised as JSON;
- kombu.transport.virtual.base.Channel.prepare_message and _inplace_augment_message: the
  envelope {body, content-encoding, content-type, headers, properties}, with the body base64
  encoded and delivery_info {exchange, routing_key} filled in;
- kombu.transport.redis.Channel._put: the envelope JSON-dumped and LPUSHed onto the key named
  after the queue (priority 0: the plain queue name, no priority suffix).

tests/producer/test_messages.py checks this against what Celery itself publishes.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any, Final

from celery.utils.nodenames import anon_nodename

from tasks import keys

CONTENT_TYPE: Final = "application/json"
CONTENT_ENCODING: Final = "utf-8"
BODY_ENCODING: Final = "base64"
# AMQP delivery_mode 2 = persistent, what Celery sets for every task message.
DELIVERY_MODE_PERSISTENT: Final = 2
# Messages carry no in-queue priority: priority lives in the choice of queue (see DESIGN.md).
MESSAGE_PRIORITY: Final = 0
# Celery's AMQP.kwargsrepr_maxsize: the longest kwargsrepr header it writes.
KWARGSREPR_MAXSIZE: Final = 1024

# The third body element of every protocol 2 message without a workflow attached.
_EMBED: Final = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def job_kwargs(job_id: str, batch_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """The task's keyword arguments (the message contract with the worker)."""
    return {"job_id": job_id, "batch_id": batch_id, "request": request}


def _kwargsrepr(kwargs: dict[str, Any]) -> str:
    # Display-only (Flower, worker logs). Celery's saferepr costs ~100 us a job, longer than
    # everything else here together; repr() cut to Celery's size limit shows the same thing.
    text = repr(kwargs)
    if len(text) > KWARGSREPR_MAXSIZE:
        text = text[:KWARGSREPR_MAXSIZE] + "..."
    return text


class MessageBuilder:
    """Builds task messages for one task name, from this process.

    Args:
        task_name: the registered Celery task (tideq.generate).
        origin: the sender's node name in the headers; Celery's anonymous name by default.
    """

    def __init__(self, task_name: str = keys.TASK_GENERATE, origin: str | None = None) -> None:
        self.task_name = task_name
        self.origin = origin or anon_nodename()

    def envelope(self, task_id: str, queue: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The envelope as a dict (what the Redis list holds, before JSON encoding)."""
        body = json.dumps([[], kwargs, _EMBED]).encode(CONTENT_ENCODING)
        return {
            "body": base64.b64encode(body).decode("ascii"),
            "content-encoding": CONTENT_ENCODING,
            "content-type": CONTENT_TYPE,
            "headers": {
                "lang": "py",
                "task": self.task_name,
                "id": task_id,
                "shadow": None,
                "eta": None,
                "expires": None,
                "group": None,
                "group_index": None,
                "retries": 0,
                "timelimit": [None, None],
                "root_id": task_id,
                "parent_id": None,
                "argsrepr": "()",
                "kwargsrepr": _kwargsrepr(kwargs),
                "origin": self.origin,
                "ignore_result": None,
                "replaced_task_nesting": 0,
                "stamped_headers": None,
                "stamps": {},
            },
            "properties": {
                "correlation_id": task_id,
                "reply_to": "",
                "delivery_mode": DELIVERY_MODE_PERSISTENT,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": MESSAGE_PRIORITY,
                "body_encoding": BODY_ENCODING,
                "delivery_tag": str(uuid.uuid4()),
            },
        }

    def build(self, task_id: str, queue: str, kwargs: dict[str, Any]) -> bytes:
        """The bytes to LPUSH onto the Redis list `queue`."""
        return json.dumps(self.envelope(task_id, queue, kwargs)).encode(CONTENT_ENCODING)

    def job_message(self, job_id: str, batch_id: str, queue: str,
                    request: dict[str, Any]) -> bytes:
        """One tideq.generate message: task id = job id, args [], kwargs per the contract."""
        return self.build(job_id, queue, job_kwargs(job_id, batch_id, request))


def decode(message: bytes | str) -> tuple[dict[str, Any], list[Any]]:
    """Split stored message bytes into (envelope, decoded body [args, kwargs, embed])."""
    envelope = json.loads(message)
    body = json.loads(base64.b64decode(envelope["body"]))
    return envelope, body
