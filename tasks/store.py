"""Job records in Redis: every state transition of a job, done atomically by a Lua script so
that a job is counted exactly once whatever is redelivered or retried.

A job moves queued -> running -> done | failed, or queued -> cancelled (also running ->
cancelled). Terminal states are final: a second finish of the same job (a redelivered message
that raced the first) changes nothing and reports so. Each batch keeps counters
"<priority>:<state>" of its jobs, updated by the same scripts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from tasks import keys

# KEYS: batch, batch_jobs, queue, job_1..job_n
# ARGV: ttl, priority, now, batch_id, then per job 5 values: job_id, line, custom_id ('' = none),
#       endpoint ('' = plain prompt/messages line; else the OpenAI batch url), message
_ENQUEUE = """
local ttl = tonumber(ARGV[1])
local priority = ARGV[2]
local now = ARGV[3]
local added = 0
for i = 4, #KEYS do
  local a = 5 + (i - 4) * 5
  local job = KEYS[i]
  if redis.call('HSETNX', job, 'state', 'queued') == 1 then
    redis.call('HSET', job, 'batch_id', ARGV[4], 'priority', priority,
               'line', ARGV[a + 1], 'custom_id', ARGV[a + 2], 'endpoint', ARGV[a + 3],
               'submitted_at', now)
    redis.call('EXPIRE', job, ttl)
    redis.call('RPUSH', KEYS[2], ARGV[a])
    redis.call('LPUSH', KEYS[3], ARGV[a + 4])
    added = added + 1
  end
end
if added > 0 then
  redis.call('HINCRBY', KEYS[1], 'total', added)
  redis.call('HINCRBY', KEYS[1], priority .. ':queued', added)
end
redis.call('HSETNX', KEYS[1], 'created_at', now)
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
return added
"""

# KEYS: job, batch.  ARGV: worker, gpu, now, ttl
# Returns the job's state before the call; 'missing' if the record is gone (expired).
_START = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'queued' then
  local priority = redis.call('HGET', KEYS[1], 'priority')
  if redis.call('HGET', KEYS[2], 'cancelled') == '1' then
    redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[3])
    redis.call('HINCRBY', KEYS[2], priority .. ':queued', -1)
    redis.call('HINCRBY', KEYS[2], priority .. ':cancelled', 1)
    return 'cancelled'
  end
  redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[1], 'gpu', ARGV[2],
             'started_at', ARGV[3])
  redis.call('HINCRBY', KEYS[2], priority .. ':queued', -1)
  redis.call('HINCRBY', KEYS[2], priority .. ':running', 1)
elseif state == 'running' then
  -- Redelivered after its worker was lost: run it again here.
  redis.call('HSET', KEYS[1], 'worker', ARGV[1], 'gpu', ARGV[2], 'started_at', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return state
"""

# KEYS: job, batch.  ARGV: new state, field, value (result JSON or error), now, ttl, tokens
# Returns 1 if this call finished the job, 0 if it was already terminal.
_FINISH = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'done' or state == 'failed' or state == 'cancelled' then return 0 end
local priority = redis.call('HGET', KEYS[1], 'priority') or 'low'
redis.call('HSET', KEYS[1], 'state', ARGV[1], ARGV[2], ARGV[3], 'finished_at', ARGV[4])
if state then
  redis.call('HINCRBY', KEYS[2], priority .. ':' .. state, -1)
end
redis.call('HINCRBY', KEYS[2], priority .. ':' .. ARGV[1], 1)
redis.call('HINCRBY', KEYS[2], 'completion_tokens', tonumber(ARGV[6]))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
return 1
"""

# KEYS: batch, batch_jobs.  ARGV: now, job key prefix
# Marks the batch cancelled and every still-queued job cancelled. Returns how many.
_CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HSET', KEYS[1], 'cancelled', '1')
local n = 0
for _, id in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  local job = ARGV[2] .. id
  if redis.call('HGET', job, 'state') == 'queued' then
    local priority = redis.call('HGET', job, 'priority')
    redis.call('HSET', job, 'state', 'cancelled', 'finished_at', ARGV[1])
    redis.call('HINCRBY', KEYS[1], priority .. ':queued', -1)
    redis.call('HINCRBY', KEYS[1], priority .. ':cancelled', 1)
    n = n + 1
  end
end
return n
"""


@dataclass(frozen=True)
class QueuedJob:
    """One job ready to enqueue: its id, where it came from, and its Celery message (bytes)."""

    job_id: str
    line: int
    custom_id: str | None
    message: bytes
    # The OpenAI batch url ("/v1/chat/completions", "/v1/completions") or None for plain lines.
    endpoint: str | None = None


@dataclass
class JobRecord:
    job_id: str
    state: str
    line: int
    custom_id: str | None
    priority: str
    endpoint: str | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    fields: dict[str, str]


class UnknownBatchError(KeyError):
    """No such batch in Redis (never submitted, or its records expired)."""


class JobStore:
    """Job and batch records; shared by the producer and the workers."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self._enqueue = client.register_script(_ENQUEUE)
        self._start = client.register_script(_START)
        self._finish = client.register_script(_FINISH)
        self._cancel = client.register_script(_CANCEL)

    @classmethod
    def from_url(cls, url: str, ttl_s: int) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=False), ttl_s)

    # --- producer side -------------------------------------------------------------------
    def enqueue(self, batch_id: str, priority: str, jobs: Sequence[QueuedJob]) -> int:
        """Record and enqueue jobs not already in the batch; return how many were new.

        One script call per chunk: a chunk is recorded and enqueued completely or not at all,
        so a crash in between cannot leave a recorded job that was never queued.
        """
        if not jobs:
            return 0
        keys_ = [keys.batch_key(batch_id), keys.batch_jobs_key(batch_id), priority]
        keys_ += [keys.job_key(j.job_id) for j in jobs]
        args: list[Any] = [self.ttl_s, priority, f"{time.time():.6f}", batch_id]
        for j in jobs:
            args += [j.job_id, j.line, j.custom_id or "", j.endpoint or "", j.message]
        return int(self._enqueue(keys=keys_, args=args))

    def cancel(self, batch_id: str) -> int:
        """Cancel a batch: queued jobs become cancelled now, running ones are aborted by their
        workers. Returns how many queued jobs were cancelled."""
        n = int(
            self._cancel(
                keys=[keys.batch_key(batch_id), keys.batch_jobs_key(batch_id)],
                args=[f"{time.time():.6f}", keys.job_key("")],
            )
        )
        if n < 0:
            raise UnknownBatchError(batch_id)
        return n

    def batch_counts(self, batch_id: str) -> dict[str, int]:
        """The batch hash: total, completion_tokens and "<priority>:<state>" counters."""
        raw = self.client.hgetall(keys.batch_key(batch_id))
        if not raw:
            raise UnknownBatchError(batch_id)
        out: dict[str, int] = {}
        for k, v in raw.items():
            name = _text(k)
            if name == "created_at":
                continue
            try:
                out[name] = int(v)
            except ValueError:
                continue
        return out

    def is_cancelled(self, batch_id: str) -> bool:
        return self.client.hget(keys.batch_key(batch_id), "cancelled") == b"1"

    def iter_jobs(self, batch_id: str, chunk: int = 1000) -> Iterator[JobRecord]:
        """Every job of the batch in input order, fetched a chunk per round trip."""
        list_key = keys.batch_jobs_key(batch_id)
        if not self.client.exists(keys.batch_key(batch_id)):
            raise UnknownBatchError(batch_id)
        start = 0
        while True:
            ids = self.client.lrange(list_key, start, start + chunk - 1)
            if not ids:
                return
            pipe = self.client.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(keys.job_key(_text(job_id)))
            for job_id, raw in zip(ids, pipe.execute(), strict=False):
                yield _record(_text(job_id), raw)
            start += len(ids)

    def job(self, job_id: str) -> JobRecord | None:
        raw = self.client.hgetall(keys.job_key(job_id))
        return _record(job_id, raw) if raw else None

    # --- worker side ---------------------------------------------------------------------
    def start(self, job_id: str, batch_id: str, worker: str, gpu: str) -> str:
        """Mark a job running; returns its previous state ('queued', 'running' when
        redelivered, a terminal state when it must be skipped, or 'missing')."""
        state = self._start(
            keys=[keys.job_key(job_id), keys.batch_key(batch_id)],
            args=[worker, gpu, f"{time.time():.6f}", self.ttl_s],
        )
        return state.decode() if isinstance(state, bytes) else str(state)

    def finish(
        self,
        job_id: str,
        batch_id: str,
        state: str,
        payload: dict[str, Any],
        completion_tokens: int = 0,
    ) -> bool:
        """Store a job's final state with its result (done) or error (failed, cancelled).
        Returns False if the job was already finished (nothing is changed then)."""
        if state not in keys.TERMINAL_STATES:
            raise ValueError(f"not a terminal state: {state}")
        field = "result" if state == "done" else "error"
        done = self._finish(
            keys=[keys.job_key(job_id), keys.batch_key(batch_id)],
            args=[state, field, json.dumps(payload), f"{time.time():.6f}", self.ttl_s,
                  completion_tokens],
        )
        return bool(done)


def _text(value: bytes | str) -> str:
    """A Redis reply as text (the client returns bytes; its type hints allow str too)."""
    return value.decode() if isinstance(value, bytes) else value


def _record(job_id: str, raw: Mapping[bytes | str, bytes | str]) -> JobRecord:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    result = json.loads(fields["result"]) if "result" in fields else None
    error = json.loads(fields["error"]) if "error" in fields else None
    custom_id = fields.get("custom_id") or None
    return JobRecord(
        job_id=job_id,
        state=fields.get("state", "missing"),
        line=int(fields.get("line", 0)),
        custom_id=custom_id,
        priority=fields.get("priority", ""),
        endpoint=fields.get("endpoint") or None,
        result=result,
        error=error,
        fields=fields,
    )
