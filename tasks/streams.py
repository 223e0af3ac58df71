"""Live token streams: each running job's text, appended to a Redis stream as it is generated.

On when the deployment sets redis.stream_tokens. The key is tideq:stream:<job_id> (keys.py's
layout), trimmed to about MAXLEN entries and kept for the result TTL. Its entries:

    {"restart": "1"}                the text starts over (the job starts, or its request runs
                                    again from its prompt); what came before is void
    {"text": delta}                 the next piece of the text
    {"done": "1", "state": state}   the job ended (done, failed, cancelled)

The text entries after the last restart concatenate to the stored result's text, unless
entries were dropped (below): the stored result is what counts, the stream is for watching.

The engine's receiver thread only appends to a bounded in-memory queue; one publisher thread
per worker process takes what has gathered and writes it in one pipeline. If Redis is slower
than the engine, the oldest text entries are dropped (counted in `dropped`); restart and done
entries are never dropped.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import redis

from tasks import keys

log = logging.getLogger(__name__)

# Entries kept per stream (approximate trimming: Redis trims whole nodes, so a few more).
STREAM_MAXLEN: Final = 10_000
# Entries waiting for the publisher, all jobs together, before the oldest text is dropped.
QUEUE_LIMIT: Final = 50_000
# Entries written per pipeline at most.
BATCH_LIMIT: Final = 2_000
# The publisher's Redis commands ride out an outage this long, then the batch is dropped.
OUTAGE_S: Final = 5.0

TEXT: Final = "text"
RESTART: Final = "restart"
DONE: Final = "done"


def stream_key(job_id: str) -> str:
    return f"{keys.PREFIX}:stream:{job_id}"


class StreamPublisher:
    """Writes jobs' text to their Redis streams from one background thread.

    Args:
        client: the Redis client the publisher thread uses (its own: it may wait on Redis).
        ttl_s: the streams' TTL (the deployment's result TTL).
    """

    def __init__(self, client: redis.Redis, ttl_s: int, maxlen: int = STREAM_MAXLEN,
                 queue_limit: int = QUEUE_LIMIT) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.maxlen = maxlen
        self.queue_limit = queue_limit
        self.dropped = 0  # text entries dropped because the queue was full
        self.failed = 0  # entries lost to Redis errors
        self.published = 0
        self._queue: deque[tuple[str, str, str]] = deque()  # (job_id, kind, value)
        self._cond = threading.Condition()
        self._busy = False
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="tideq-streams", daemon=True)
        self._thread.start()

    # --- any thread (the engine's receiver thread calls on_text) ---------------------------
    def open(self, job_id: str) -> Callable[[str | None], None]:
        """Start a job's stream (a restart entry) and return the engine callback for it."""
        self._put(job_id, RESTART, "1")

        def on_text(delta: str | None) -> None:
            if delta is None:
                self._put(job_id, RESTART, "1")
            elif delta:
                self._put(job_id, TEXT, delta)

        return on_text

    def close(self, job_id: str, state: str) -> None:
        """The job ended in `state`: its stream's last entry."""
        self._put(job_id, DONE, state)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is written (or failed); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self, timeout: float = 2.0) -> None:
        """Write what is queued (for at most timeout seconds) and end the thread."""
        self.flush(timeout)
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _put(self, job_id: str, kind: str, value: str) -> None:
        with self._cond:
            if len(self._queue) >= self.queue_limit and kind == TEXT:
                self._drop_oldest_text()
            self._queue.append((job_id, kind, value))
            self._cond.notify_all()

    def _drop_oldest_text(self) -> None:
        for i, item in enumerate(self._queue):
            if item[1] == TEXT:
                del self._queue[i]
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 10_000 == 0:
                    log.warning("token streams: Redis is behind; %d text entries dropped so far"
                                " (stored results are unaffected)", self.dropped)
                return

    # --- the publisher thread --------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if not self._queue:
                    return
                n = min(len(self._queue), BATCH_LIMIT)
                batch = [self._queue.popleft() for _ in range(n)]
                self._busy = True
            self._write(batch)

    def _write(self, batch: list[tuple[str, str, str]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        touched: set[str] = set()
        for job_id, kind, value in batch:
            key = stream_key(job_id)
            fields: dict[Any, Any] = ({DONE: "1", "state": value} if kind == DONE
                                      else {kind: value})
            pipe.xadd(key, fields, maxlen=self.maxlen, approximate=True)
            touched.add(key)
        for key in touched:
            pipe.expire(key, self.ttl_s)
        try:
            pipe.execute()
            self.published += len(batch)
        except redis.RedisError as err:
            self.failed += len(batch)
            log.warning("token streams: %d entries lost: %s (stored results are unaffected)",
                        len(batch), err)


_publishers: dict[int, StreamPublisher] = {}
_publishers_lock = threading.Lock()


def publisher_for(runtime: Any) -> StreamPublisher | None:
    """The worker's publisher when its deployment streams tokens (made on first use, one per
    worker runtime), else None."""
    config = runtime.config
    if getattr(config.redis, "stream_tokens", False) is not True:
        return None
    with _publishers_lock:
        publisher = _publishers.get(id(runtime))
        if publisher is None:
            from tasks.redis_client import connect

            publisher = StreamPublisher(connect(config.redis.url, outage_s=OUTAGE_S),
                                        config.redis.result_ttl_s)
            _publishers[id(runtime)] = publisher
            atexit.register(publisher.stop)
        return publisher
