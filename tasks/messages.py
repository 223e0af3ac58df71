"""Celery task messages built directly as the bytes kombu's Redis transport stores.

`apply_async` costs over a millisecond a job (routing, signals, a kombu Producer, one LPUSH
round trip each); a 100,000-line file would take minutes. Instead the producer builds the exact
envelope that kombu's Redis channel LPUSHes onto a queue list and hands whole chunks of them to
JobStore.enqueue (one Lua call per chunk); the workers' sweeper builds the same messages to
re-enqueue a job whose message was lost. The layout follows, field for field:

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
import binascii
import json
import os
import random
import re
import socket
from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any, Final

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
# Seed bytes of the delivery-tag generator (tags must be unique, not unpredictable).
_TAG_SEED_BYTES: Final = 16
_UUID_BITS: Final = 128

# Placeholders of the variable envelope fields while the byte template is made (see build()).
_SLOT = re.compile(r'"@@(\w+)@@"')


def job_kwargs(job_ids: Sequence[str], batch_id: str) -> dict[str, Any]:
    """The task's keyword arguments (the message contract with the worker): `job_id` for a
    message of one job, `job_ids` for a message of several (jobs_per_message).

    The request itself lives in the job's record (tasks/store.py), which the worker reads in
    the same round trip that starts the job: a message is then small, carries no prompt text
    into Flower or the worker logs, and can be rebuilt from the job id alone when the sweeper
    re-enqueues a job whose message was lost (always as a message of its own)."""
    if not job_ids:
        raise ValueError("a message needs at least one job")
    if len(job_ids) == 1:
        return {"job_id": job_ids[0], "batch_id": batch_id}
    return {"job_ids": list(job_ids), "batch_id": batch_id}


def job_ids_in(kwargs: Mapping[str, Any]) -> list[str]:
    """The job ids a message's keyword arguments name (either form of job_kwargs)."""
    many = kwargs.get("job_ids")
    if many is not None:
        if not isinstance(many, list) or not all(isinstance(j, str) for j in many):
            raise ValueError(f"job_ids must be a list of strings, not {many!r}")
        return many
    one = kwargs.get("job_id")
    if not isinstance(one, str):
        raise ValueError(f"job_id must be a string, not {one!r}")
    return [one]


def anon_nodename() -> str:
    """The node name Celery gives a process that is not a worker ("gen<pid>@<host>", what
    celery.utils.nodenames.anon_nodename returns): the origin header of the messages this
    process sends. Written out here so that the producer imports no Celery (~50 ms of a
    submit's start); tests/producer/test_messages.py checks that the two agree."""
    return f"gen{os.getpid()}@{socket.gethostname()}"


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
        self._random = random.Random(os.urandom(_TAG_SEED_BYTES))
        self._template = self._make_template()

    def envelope(self, task_id: str, queue: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The envelope as a dict (what the Redis list holds, before JSON encoding)."""
        return self._envelope(task_id, queue, _encode_body(kwargs), _kwargsrepr(kwargs),
                              self.delivery_tag())

    def _envelope(self, task_id: str, queue: str, body: str, kwargsrepr: str,
                  delivery_tag: str) -> dict[str, Any]:
        return {
            "body": body,
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
                "kwargsrepr": kwargsrepr,
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
                "delivery_tag": delivery_tag,
            },
        }

    def delivery_tag(self) -> str:
        """A random UUID-4 string, as kombu's uuid() gives (from a seeded PRNG: one syscall
        per builder instead of one per message)."""
        n = self._random.getrandbits(_UUID_BITS)
        n = (n & ~(0xF000 << 64)) | (0x4000 << 64)  # version 4
        n = (n & ~(0xC000 << 48)) | (0x8000 << 48)  # RFC 4122 variant
        h = f"{n:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    def _make_template(self) -> list[str]:
        # json.dumps of the envelope with placeholders, split around them: static JSON text
        # at even positions, slot names at odd ones. build() fills the slots with JSON strings
        # and gives byte for byte what json.dumps(envelope) gives (the tests check it).
        slots = {name: f"@@{name}@@" for name in ("body", "task_id", "queue", "kwargsrepr",
                                                   "delivery_tag")}
        env = self._envelope(slots["task_id"], slots["queue"], slots["body"],
                             slots["kwargsrepr"], slots["delivery_tag"])
        return _SLOT.split(json.dumps(env))

    def build(self, task_id: str, queue: str, kwargs: dict[str, Any]) -> bytes:
        """The bytes to LPUSH onto the Redis list `queue`: json.dumps(envelope(...))."""
        values = {
            "body": _json_str(_encode_body(kwargs)),
            "task_id": _json_str(task_id),
            "queue": _json_str(queue),
            "kwargsrepr": _json_str(_kwargsrepr(kwargs)),
            "delivery_tag": _json_str(self.delivery_tag()),
        }
        parts = self._template
        out = [parts[0]]
        for i in range(1, len(parts), 2):
            out.append(values[parts[i]])
            out.append(parts[i + 1])
        return "".join(out).encode(CONTENT_ENCODING)

    def job_message(self, job_id: str, batch_id: str, queue: str) -> bytes:
        """One tideq.generate message for one job: task id = job id."""
        return self.build(job_id, queue, job_kwargs([job_id], batch_id))

    def jobs_message(self, job_ids: Sequence[str], batch_id: str, queue: str) -> bytes:
        """One tideq.generate message for the jobs job_ids (in enqueue order). Its task id is
        the first job's id: the sweeper reads the enqueue sequence of the message at a queue's
        consuming end from it, and the first job's is the lowest of the message."""
        return self.build(job_ids[0], queue, job_kwargs(job_ids, batch_id))


def _encode_body(kwargs: dict[str, Any]) -> str:
    body = json.dumps([[], kwargs, _EMBED]).encode(CONTENT_ENCODING)
    return base64.b64encode(body).decode("ascii")


def decode(message: bytes | str) -> tuple[dict[str, Any], list[Any]]:
    """Split stored message bytes into (envelope, decoded body [args, kwargs, embed])."""
    envelope = json.loads(message)
    body = json.loads(base64.b64decode(envelope["body"]))
    return envelope, body


def job_ids_of(envelope: Mapping[str, Any]) -> list[str]:
    """The job ids of a tideq.generate envelope (what kombu stores); ValueError if it is not
    one (another task, a body that does not decode)."""
    try:
        body = json.loads(base64.b64decode(envelope["body"]))
        return job_ids_in(body[1])
    except (KeyError, IndexError, TypeError, binascii.Error) as err:
        raise ValueError(f"not a tideq.generate message: {err!r}") from None
