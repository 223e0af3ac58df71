"""The sweeper: puts back in their queues the jobs that nobody will finish otherwise.

Two ways a job is stranded:
- its worker died while running it: its lease (tasks/leases.py) lapses;
- its message vanished: kombu's Redis transport pops a message (BRPOP) and only then records
  it as unacknowledged, so a worker killed in between loses it (celery #7950, #4354), and a
  message dropped as undecodable or refused by Celery takes its job with it.

The second is found without scanning the queues. Each queued job has an enqueue sequence
number in `tideq:pending:<queue>`; messages leave a queue list oldest first, so every pending
job older than the message now at the list's consuming end has left the list. Such a job that
is still queued should be in kombu's unacknowledged hash, taken by a live worker that is about
to start it (or that waits at its admission gate for room, and marks the message taken again
at every lease renewal); if it is not (or has been there longer than a lease without
starting), it is a suspect, and a suspect seen again a sweep later is re-enqueued with a fresh
message.

Re-enqueueing is safe even when wrong: a second message for a job that runs under a live lease
or has finished is skipped by JobStore.start.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from tasks import keys
from tasks.messages import MessageBuilder, job_ids_of
from tasks.store import JobStore

log = logging.getLogger(__name__)

# kombu's Redis transport keeps taken, unacknowledged messages here (its default key names).
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
# Jobs examined per sweep and kind; the rest wait for the next sweep.
_BATCH = 1000


@dataclass
class SweepReport:
    lapsed: int = 0  # running jobs re-enqueued because their lease lapsed
    lost: int = 0  # queued jobs re-enqueued because their message vanished
    suspects: int = 0  # queued jobs whose message is missing, to be re-enqueued next sweep


class Sweeper:
    """Args:
        store: the job store (its client retries through Redis outages).
        lease_s: a job reserved by a worker but not started after this long counts as lost.
        grace_s: how long a suspect must stay missing before it is re-enqueued.
        owner: this worker's name, written into the sweep lock.
    """

    def __init__(self, store: JobStore, lease_s: float, grace_s: float, owner: str) -> None:
        self.store = store
        self.client = store.client
        self.lease_s = lease_s
        self.grace_s = grace_s
        self.owner = owner
        self.messages = MessageBuilder(origin=owner)

    def try_sweep(self, hold_s: float) -> SweepReport | None:
        """Sweep if no other worker swept in the last hold_s seconds; None if one did."""
        if not self.client.set(keys.SWEEP_LOCK_KEY, self.owner, nx=True,
                               px=max(1, int(hold_s * 1000))):
            return None
        return self.sweep()

    def sweep(self) -> SweepReport:
        report = SweepReport()
        now = self.store.clock()
        report.lapsed = self._requeue_lapsed(now)
        seen: set[str] = set()
        unacked: dict[str, float] | None = None
        for queue in keys.QUEUES:
            candidates = self._left_the_list(queue)
            if not candidates:
                continue
            if unacked is None:
                unacked = self._unacked_jobs()
            lost, suspects = self._check(queue, candidates, unacked, now)
            report.lost += lost
            report.suspects += len(suspects)
            seen.update(suspects)
        self._forget_suspects_except(seen)
        if report.lapsed or report.lost:
            log.warning("sweeper: re-enqueued %d jobs whose worker was lost and %d whose"
                        " message was lost", report.lapsed, report.lost)
        return report

    # --- jobs whose worker died ----------------------------------------------------------
    def _requeue_lapsed(self, now: float) -> int:
        ids = [_text(x) for x in self.client.zrangebyscore(
            keys.LEASES_KEY, "-inf", now, start=0, num=_BATCH)]
        n = 0
        for job_id, (batch_id, priority) in zip(ids, self._fields(ids), strict=True):
            if batch_id is None or priority is None:
                self.client.zrem(keys.LEASES_KEY, job_id)  # the record expired
                continue
            n += self._requeue(job_id, batch_id, priority, "lease")
        return n

    # --- jobs whose message vanished -----------------------------------------------------
    def _left_the_list(self, queue: str) -> list[str]:
        """Pending jobs of `queue` enqueued before the message now at its consuming end (its
        task id is its first job's, the lowest enqueue sequence of its jobs)."""
        pending = keys.pending_key(queue)
        oldest = self.client.lindex(queue, -1)
        bound: float | str = "+inf"
        if oldest is not None:
            job_id = _job_id_of(oldest)
            score = self.client.zscore(pending, job_id) if job_id else None
            if score is None:
                return []  # not one of ours (or already dropped): judge it next sweep
            bound = f"({score}"
        return [_text(x) for x in self.client.zrangebyscore(pending, "-inf", bound, start=0,
                                                             num=_BATCH)]

    def _unacked_jobs(self) -> dict[str, float]:
        """Job id -> when it was taken, of every message a worker holds unacknowledged."""
        index: Any = self.client.zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True)
        taken_at = {_text(tag): float(score) for tag, score in index}
        out: dict[str, float] = {}
        for tag, raw in self.client.hscan_iter(UNACKED_KEY, count=1000):
            try:
                job_ids = job_ids_of(json.loads(raw)[0])
            except (ValueError, KeyError, IndexError, TypeError):
                continue  # not a tideq.generate message
            for job_id in job_ids:
                out[job_id] = taken_at.get(_text(tag), 0.0)
        return out

    def _check(self, queue: str, candidates: list[str], unacked: dict[str, float],
               now: float) -> tuple[int, list[str]]:
        pipe = self.client.pipeline(transaction=False)
        for job_id in candidates:
            pipe.hmget(keys.job_key(job_id), "state", "batch_id")
        pipe.hmget(keys.SUSPECTS_KEY, candidates)
        *states, first_seen = pipe.execute()
        lost, suspects = 0, []
        stale: list[str] = []
        for job_id, (state, batch_id), seen in zip(candidates, states, first_seen, strict=True):
            if state is None or _text(state) != "queued" or batch_id is None:
                stale.append(job_id)  # started, cancelled, or expired: no longer pending
                continue
            taken = unacked.get(job_id)
            if taken is not None and now - taken < self.lease_s:
                continue  # a worker holds it and is about to start it
            if seen is not None and now - float(seen) >= self.grace_s:
                lost += self._requeue(job_id, _text(batch_id), queue, "lost")
            else:
                if seen is None:
                    self.client.hsetnx(keys.SUSPECTS_KEY, job_id, f"{now:.6f}")
                suspects.append(job_id)
        if stale:
            self.client.zrem(keys.pending_key(queue), *stale)
        return lost, suspects

    def _forget_suspects_except(self, keep: set[str]) -> None:
        gone = [k for k in (_text(x) for x in self.client.hkeys(keys.SUSPECTS_KEY))
                if k not in keep]
        if gone:
            self.client.hdel(keys.SUSPECTS_KEY, *gone)

    # --- shared --------------------------------------------------------------------------
    def _fields(self, ids: list[str]) -> list[tuple[str | None, str | None]]:
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(keys.job_key(job_id), "batch_id", "priority")
        return [(_opt(b), _opt(p)) for b, p in pipe.execute()]

    def _requeue(self, job_id: str, batch_id: str, priority: str, why: str) -> int:
        message = self.messages.job_message(job_id, batch_id, priority)
        if self.store.requeue(job_id, batch_id, priority, message, why):
            log.info("sweeper: job %s back in %s (%s)", job_id, priority,
                     "its worker was lost" if why == "lease" else "its message was lost")
            return 1
        return 0


def mark_taken_now(client: Any, delivery_tags: Collection[str]) -> None:
    """Mark messages a live worker holds unacknowledged as taken now: in kombu's index, where
    kombu recorded when each was delivered (in the worker's clock, as kombu does). Tags no
    longer there (acknowledged meanwhile) are not added back."""
    now = time.time()
    client.zadd(UNACKED_INDEX_KEY, {tag: now for tag in delivery_tags}, xx=True)


def _job_id_of(message: bytes | str) -> str | None:
    try:
        envelope: Any = json.loads(message)
        return str(envelope["headers"]["id"])
    except (ValueError, KeyError, TypeError):
        return None


def _text(value: Any) -> str:
    """A Redis reply as text (redis-py's hints cover every reply type; these are strings)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _opt(value: Any) -> str | None:
    return None if value is None else _text(value)
