"""kombu's Redis transport, with one change: a message that is not a task envelope is logged
and dropped instead of ending the worker.

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

log = logging.getLogger(__name__)

# What decoding a stray message raises: JSONDecodeError and UnicodeDecodeError are
# ValueErrors; a JSON value that is not an envelope fails with the others.
_UNREADABLE = (ValueError, KeyError, TypeError, AttributeError, IndexError)


class Channel(kombu_redis.Channel):
    def _brpop_read(self, **options: Any) -> bool:
        try:
            return bool(super()._brpop_read(**options))
        except self.connection_errors:
            raise
        except _UNREADABLE as err:
            log.error("dropped a message that is not a task envelope (%s: %s)",
                      type(err).__name__, err)
            raise Empty() from None


class Transport(kombu_redis.Transport):
    Channel = Channel
