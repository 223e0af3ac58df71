"""Every name that the producer and the workers share: queues, task name, Redis keys.

Redis layout (all keys carry the deployment's TTL once written):
    tideq:batch:<batch_id>        hash  batch meta (created, format, total, cancelled) and
                                        counters "<priority>:<state>" kept by jobs' transitions
    tideq:batch:<batch_id>:jobs   list  job ids in input order
    tideq:job:<job_id>            hash  state, priority, line, custom_id, result (JSON), ...
    tideq:pending:<queue>         zset  job id -> enqueue sequence, while its message should be
                                        in <queue> (the sweeper finds lost messages with it)
    tideq:leases                  zset  job id -> lease expiry (epoch s) of each running job
    tideq:seq                     str   the enqueue sequence counter
    tideq:sweep:suspects          hash  job id -> when its message was first seen missing
    tideq:sweep:lock              str   held by the worker sweeping now (expires)

The job, batch and batch-jobs keys carry the deployment's TTL, renewed by every result; the
shared keys above have none and the sweeper drops entries of jobs that are gone.
"""

from __future__ import annotations

from typing import Final, Literal

QUEUE_HIGH: Final = "high"
QUEUE_LOW: Final = "low"
# Consumed in this order; kombu's "priority" queue_order_strategy keeps it.
QUEUES: Final = (QUEUE_HIGH, QUEUE_LOW)

TASK_GENERATE: Final = "tideq.generate"

PREFIX: Final = "tideq"

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
STATES: Final = ("queued", "running", "done", "failed", "cancelled")
TERMINAL_STATES: Final = frozenset({"done", "failed", "cancelled"})


def batch_key(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}"


def batch_jobs_key(batch_id: str) -> str:
    return f"{PREFIX}:batch:{batch_id}:jobs"


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def job_id_for(batch_id: str, custom_id: str | None, line_number: int) -> str:
    """A job's id: stable for the same batch and line identity, so resubmitting is idempotent."""
    return f"{batch_id}:{custom_id}" if custom_id is not None else f"{batch_id}:L{line_number}"


def counter_field(priority: str, state: str) -> str:
    return f"{priority}:{state}"


def pending_key(queue: str) -> str:
    return f"{PREFIX}:pending:{queue}"


LEASES_KEY: Final = f"{PREFIX}:leases"
SEQ_KEY: Final = f"{PREFIX}:seq"
SUSPECTS_KEY: Final = f"{PREFIX}:sweep:suspects"
SWEEP_LOCK_KEY: Final = f"{PREFIX}:sweep:lock"
