"""Job records in Redis: every state transition of a job, done atomically by a Lua script so
that a job is counted exactly once whatever is redelivered or retried.

A job moves queued -> running -> done | failed, or queued -> cancelled (also running ->
cancelled). Terminal states are final: a second finish of the same job (a redelivered message
that raced the first) changes nothing and reports so. Each batch keeps counters
"<priority>:<state>" of its jobs, updated by the same scripts.

The records, not the Celery messages, are the truth about a job. A running job holds a lease
that its worker renews; a job whose lease lapsed (its worker died) or whose message vanished
(kombu pops a message before it records it as unacknowledged) is put back in its queue by the
sweeper (tasks/sweeper.py), and a message for a job that is already running under a live lease
or finished is skipped. So any number of messages for a job run it once at a time and finish
it exactly once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from tasks import keys

# KEYS: batch, batch_jobs, queue, pending (of queue), seq, job_1..job_n
# ARGV: ttl, priority, now, batch_id, then per job 6 values: job_id, line, custom_id ('' = none),
#       endpoint ('' = plain prompt/messages line; else the OpenAI batch url), request JSON,
#       message ('' = none: the job rides in the message of a later job of the call)
# A message covers the jobs since the previous message; it is pushed if any of them is new (a
# job already recorded was enqueued by an earlier call whose reply was lost).
_ENQUEUE = """
local ttl = tonumber(ARGV[1])
local priority = ARGV[2]
local now = ARGV[3]
local added = 0
local message_has_new = false
for i = 6, #KEYS do
  local a = 5 + (i - 6) * 6
  local job = KEYS[i]
  if redis.call('HSETNX', job, 'state', 'queued') == 1 then
    local seq = redis.call('INCR', KEYS[5])
    redis.call('HSET', job, 'batch_id', ARGV[4], 'priority', priority,
               'line', ARGV[a + 1], 'custom_id', ARGV[a + 2], 'endpoint', ARGV[a + 3],
               'request', ARGV[a + 4], 'submitted_at', now, 'seq', seq)
    redis.call('EXPIRE', job, ttl)
    redis.call('RPUSH', KEYS[2], ARGV[a])
    redis.call('ZADD', KEYS[4], seq, ARGV[a])
    added = added + 1
    message_has_new = true
  end
  if ARGV[a + 5] ~= '' then
    if message_has_new then redis.call('LPUSH', KEYS[3], ARGV[a + 5]) end
    message_has_new = false
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

# KEYS: batch, leases, pending_high, pending_low, job_1..job_n (the jobs of one message).
# ARGV: worker, gpu, now, ttl, lease seconds, then per job: job_id, token (this delivery's)
# Leases are in Redis's own clock (TIME), so workers' clocks need not agree.
# Returns per job {state before the call, request JSON}, flattened. 'missing': no record
# (expired); 'busy': running under a live lease held by another delivery (this message is a
# duplicate). Only a 'queued' or a 'running' whose lease lapsed (its worker is gone) is taken;
# the caller runs it then.
_START = """
local t = redis.call('TIME')
local clock = tonumber(t[1]) + tonumber(t[2]) / 1e6
local cancelled = redis.call('HGET', KEYS[1], 'cancelled') == '1'
local out = {}
for i = 5, #KEYS do
  local job = KEYS[i]
  local id, token = ARGV[4 + (i - 4) * 2], ARGV[5 + (i - 4) * 2]
  local state = redis.call('HGET', job, 'state')
  local take = false
  if not state then
    state = 'missing'
  elseif state == 'queued' then
    local priority = redis.call('HGET', job, 'priority')
    redis.call('ZREM', KEYS[3], id)
    redis.call('ZREM', KEYS[4], id)
    redis.call('HINCRBY', KEYS[1], priority .. ':queued', -1)
    if cancelled then
      redis.call('HSET', job, 'state', 'cancelled', 'finished_at', ARGV[3])
      redis.call('HINCRBY', KEYS[1], priority .. ':cancelled', 1)
      state = 'cancelled'
    else
      redis.call('HINCRBY', KEYS[1], priority .. ':running', 1)
      take = true
    end
  elseif state == 'running' then
    take = true
    if redis.call('HGET', job, 'token') ~= token then
      local lease = redis.call('ZSCORE', KEYS[2], id)
      if lease and tonumber(lease) > clock then
        state = 'busy'
        take = false
      else
        -- Its worker is gone (the lease lapsed): run it again here.
        redis.call('HINCRBY', job, 'deliveries', 1)
      end
    end
  end
  if take then
    redis.call('HSET', job, 'state', 'running', 'worker', ARGV[1], 'gpu', ARGV[2],
               'started_at', ARGV[3], 'token', token)
    redis.call('ZADD', KEYS[2], clock + tonumber(ARGV[5]), id)
    redis.call('EXPIRE', job, tonumber(ARGV[4]))
    out[#out + 1] = state
    out[#out + 1] = redis.call('HGET', job, 'request') or false
  else
    out[#out + 1] = state
    out[#out + 1] = false
  end
end
return out
"""

# KEYS: leases.  ARGV: lease seconds, job key prefix, batch key prefix, then (job_id, token) pairs
# Renews the leases this worker holds. Returns {cancelled, lost}: jobs whose batch was
# cancelled, and jobs no longer this delivery's (finished or taken over elsewhere, or gone).
# Leases renewed per script call (JobStore.renew).
RENEW_CHUNK = 64
_RENEW = """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[1])
local cancelled, lost = {}, {}
for i = 4, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  local job = ARGV[2] .. id
  local fields = redis.call('HMGET', job, 'state', 'token', 'batch_id')
  if fields[1] == 'running' and fields[2] == token then
    redis.call('ZADD', KEYS[1], expiry, id)
    if redis.call('HGET', ARGV[3] .. fields[3], 'cancelled') == '1' then
      cancelled[#cancelled + 1] = id
    end
  else
    lost[#lost + 1] = id
  end
end
return {cancelled, lost}
"""

# KEYS: job, batch, batch_jobs, leases, pending_high, pending_low.
# ARGV: new state, field, value (result JSON or error), now, ttl, tokens, job_id
# Returns 1 if this call finished the job, 0 if it was already terminal. Every key of the
# batch then lives as long as its newest result.
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
redis.call('ZREM', KEYS[4], ARGV[7])
redis.call('ZREM', KEYS[5], ARGV[7])
redis.call('ZREM', KEYS[6], ARGV[7])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[5])) end
return 1
"""

# KEYS: job, batch, leases, pending (of its queue), queue, seq, suspects.
# ARGV: job_id, message, why ('lease': its lease lapsed; 'lost': its message vanished)
# Puts a job back in its queue with a fresh message, if it is still in the state that made
# the sweeper choose it. Returns 1 if it did.
_REQUEUE = """
local t = redis.call('TIME')
local clock = tonumber(t[1]) + tonumber(t[2]) / 1e6
local state = redis.call('HGET', KEYS[1], 'state')
redis.call('HDEL', KEYS[7], ARGV[1])
if ARGV[3] == 'lease' then
  local lease = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if state ~= 'running' then
    redis.call('ZREM', KEYS[3], ARGV[1])
    return 0
  end
  if lease and tonumber(lease) > clock then return 0 end
  local priority = redis.call('HGET', KEYS[1], 'priority')
  redis.call('HINCRBY', KEYS[2], priority .. ':running', -1)
  redis.call('HINCRBY', KEYS[2], priority .. ':queued', 1)
  redis.call('HSET', KEYS[1], 'state', 'queued')
  redis.call('HDEL', KEYS[1], 'token')
  redis.call('ZREM', KEYS[3], ARGV[1])
elseif state ~= 'queued' then
  redis.call('ZREM', KEYS[4], ARGV[1])
  return 0
end
local seq = redis.call('INCR', KEYS[6])
redis.call('HSET', KEYS[1], 'seq', seq)
redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
redis.call('ZADD', KEYS[4], seq, ARGV[1])
redis.call('LPUSH', KEYS[5], ARGV[2])
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
    """One job ready to enqueue: its id, where it came from, its Celery message (bytes) and its
    request (JSON text), which the job's record keeps for the worker.

    `message` covers this job and the jobs before it in the same enqueue call that have none
    (b""): a message of several jobs is carried by the last of them."""

    job_id: str
    line: int
    custom_id: str | None
    message: bytes
    request: str = ""
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


@dataclass(frozen=True)
class Started:
    """What JobStore.start found. `previous` is the state before the call: 'queued', or
    'running' when a lapsed job is taken over, is runnable; a terminal state, 'busy' (held by
    a live delivery elsewhere) or 'missing' (no record) mean: skip this message."""

    previous: str
    request: dict[str, Any] | None

    @property
    def runnable(self) -> bool:
        return self.previous in ("queued", "running")


class UnknownBatchError(KeyError):
    """No such batch in Redis (never submitted, or its records expired)."""


class JobStore:
    """Job and batch records; shared by the producer and the workers.

    The client decides how Redis outages are met: tasks.redis_client.connect gives one that
    retries through a restart (the workers' and the producer's)."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self._enqueue = client.register_script(_ENQUEUE)
        self._start = client.register_script(_START)
        self._renew = client.register_script(_RENEW)
        self._finish = client.register_script(_FINISH)
        self._requeue = client.register_script(_REQUEUE)
        self._cancel = client.register_script(_CANCEL)

    @classmethod
    def from_url(cls, url: str, ttl_s: int, outage_s: float = 60.0,
                 max_connections: int | None = None) -> JobStore:
        from tasks.redis_client import connect

        return cls(connect(url, outage_s=outage_s, max_connections=max_connections), ttl_s)

    # --- producer side -------------------------------------------------------------------
    def enqueue(self, batch_id: str, priority: str, jobs: Sequence[QueuedJob]) -> int:
        """Record and enqueue jobs not already in the batch; return how many were new.

        One script call per chunk: a chunk is recorded and enqueued completely or not at all,
        so a crash in between cannot leave a recorded job that was never queued.
        """
        if not jobs:
            return 0
        if not jobs[-1].message:
            raise ValueError("the last job of an enqueue call must carry a message")
        keys_ = [keys.batch_key(batch_id), keys.batch_jobs_key(batch_id), priority,
                 keys.pending_key(priority), keys.SEQ_KEY]
        keys_ += [keys.job_key(j.job_id) for j in jobs]
        args: list[Any] = [self.ttl_s, priority, f"{time.time():.6f}", batch_id]
        for j in jobs:
            args += [j.job_id, j.line, j.custom_id or "", j.endpoint or "", j.request,
                     j.message]
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
    def start(self, job_id: str, batch_id: str, worker: str, gpu: str, token: str,
              lease_s: float) -> Started:
        """Take a job for this delivery (token) under a lease of lease_s seconds, and read its
        request in the same round trip. Retrying a call whose reply was lost is safe: the
        same token finds the job already its own."""
        return self.start_many([job_id], batch_id, worker, gpu, [token], lease_s)[0]

    def start_many(self, job_ids: Sequence[str], batch_id: str, worker: str, gpu: str,
                   tokens: Sequence[str], lease_s: float) -> list[Started]:
        """start() for every job of a message (tokens[i] is job_ids[i]'s delivery), in one
        script call. Each job is taken or refused on its own, as start() would."""
        args: list[Any] = [worker, gpu, f"{time.time():.6f}", self.ttl_s, lease_s]
        for job_id, token in zip(job_ids, tokens, strict=True):
            args += [job_id, token]
        flat = self._start(
            keys=[keys.batch_key(batch_id), keys.LEASES_KEY, keys.pending_key(keys.QUEUE_HIGH),
                  keys.pending_key(keys.QUEUE_LOW), *(keys.job_key(j) for j in job_ids)],
            args=args,
        )
        return [Started(_text(flat[k]), json.loads(flat[k + 1]) if flat[k + 1] else None)
                for k in range(0, len(flat), 2)]

    def renew(self, holds: Mapping[str, str], lease_s: float) -> tuple[list[str], list[str]]:
        """Renew the leases of the jobs this worker runs ({job_id: token}). Returns the ids
        whose batch was cancelled and those no longer held here (finished or taken over
        elsewhere): both should be stopped in the engine."""
        cancelled: list[str] = []
        lost: list[str] = []
        items = list(holds.items())
        # In chunks: Redis runs one script at a time, and one over a full worker's 512 leases
        # held every other client (a high job's submit, its start) for 4-6 ms twice a second
        # (an H200 worker under a low flood, Redis SLOWLOG).
        for first in range(0, len(items), RENEW_CHUNK):
            args: list[Any] = [lease_s, keys.job_key(""), keys.batch_key("")]
            for job_id, token in items[first:first + RENEW_CHUNK]:
                args += [job_id, token]
            chunk_cancelled, chunk_lost = self._renew(keys=[keys.LEASES_KEY], args=args)
            cancelled += [_text(x) for x in chunk_cancelled]
            lost += [_text(x) for x in chunk_lost]
        return cancelled, lost

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
            keys=[keys.job_key(job_id), keys.batch_key(batch_id), keys.batch_jobs_key(batch_id),
                  keys.LEASES_KEY, keys.pending_key(keys.QUEUE_HIGH),
                  keys.pending_key(keys.QUEUE_LOW)],
            args=[state, field, json.dumps(payload), f"{time.time():.6f}", self.ttl_s,
                  completion_tokens, job_id],
        )
        return bool(done)

    # --- the sweeper ---------------------------------------------------------------------
    def clock(self) -> float:
        """Redis's time (epoch seconds), the clock that leases are measured in."""
        seconds, micros = self.client.time()
        return float(seconds) + micros / 1e6

    def requeue(self, job_id: str, batch_id: str, priority: str, message: bytes,
                why: str) -> bool:
        """Put a job back in its queue with a new message: why='lease' if it is still running
        under a lapsed lease, why='lost' if it is still queued (its message vanished)."""
        if priority not in keys.QUEUES:
            raise ValueError(f"job {job_id}: unknown priority {priority!r}")
        return bool(self._requeue(
            keys=[keys.job_key(job_id), keys.batch_key(batch_id), keys.LEASES_KEY,
                  keys.pending_key(priority), priority, keys.SEQ_KEY, keys.SUSPECTS_KEY],
            args=[job_id, message, why],
        ))


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
