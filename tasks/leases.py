"""A worker's lease keeper: one thread that renews the leases of the jobs this worker runs,
stops the ones that were cancelled or taken elsewhere, marks the messages it holds unstarted
(waiting at the admission gate) as still taken, and sweeps when its turn comes.

One Redis round trip per beat covers every job the worker holds, however many task threads it
has: the task threads themselves only start and finish their jobs (they used to poll their
batch for cancellation every half second each, hundreds of Redis calls a second).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from tasks.redis_client import OUTAGE_ERRORS
from tasks.store import JobStore
from tasks.sweeper import Sweeper, mark_taken_now

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Args:
        store: the job store.
        lease_s: each renewal extends a lease to now + lease_s.
        beat_s: seconds between renewals (and cancellation checks); well under lease_s.
        stop_job: called with a job id that must stop (cancelled, or no longer ours).
        sweeper: run every sweep_s seconds when no other worker has just swept; None: never.
    """

    def __init__(self, store: JobStore, lease_s: float, beat_s: float,
                 stop_job: Callable[[str], None], sweeper: Sweeper | None = None,
                 sweep_s: float = 10.0) -> None:
        if beat_s >= lease_s:
            raise ValueError(f"beat_s ({beat_s}) must be shorter than lease_s ({lease_s})")
        self.store = store
        self.lease_s = lease_s
        self.beat_s = beat_s
        self.stop_job = stop_job
        self.sweeper = sweeper
        self.sweep_s = sweep_s
        self._held: dict[str, str] = {}
        self._lost: set[str] = set()
        # Delivery tags of messages this worker holds without having started their jobs.
        self._messages: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tideq-leases", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def hold(self, job_id: str, token: str) -> None:
        with self._lock:
            self._held[job_id] = token
            self._lost.discard(job_id)

    def release(self, job_id: str) -> None:
        with self._lock:
            self._held.pop(job_id, None)
            self._lost.discard(job_id)

    def was_lost(self, job_id: str) -> bool:
        """Whether the job stopped being this worker's while it ran (finished or taken over
        elsewhere after this worker's lease lapsed): its outcome here must not be stored as
        a cancellation."""
        with self._lock:
            return job_id in self._lost

    def held(self) -> dict[str, str]:
        with self._lock:
            return dict(self._held)

    def hold_message(self, delivery_tag: str) -> None:
        """A message this worker holds unacknowledged and has not started yet (it waits at the
        admission gate): its jobs are still queued, and the sweeper takes a message held
        longer than a lease without starting for one whose worker is gone. Each beat marks it
        taken again, as a lease is renewed; once the worker is gone, nobody does."""
        with self._lock:
            self._messages.add(delivery_tag)

    def release_message(self, delivery_tag: str) -> None:
        with self._lock:
            self._messages.discard(delivery_tag)

    def beat(self) -> None:
        """One renewal: extend every lease, stop cancelled and lost jobs, mark the messages
        held unstarted as taken now."""
        held = self.held()
        cancelled, lost = self.store.renew(held, self.lease_s)
        with self._lock:
            # Only jobs still held by the same delivery: one released meanwhile (it finished
            # between the snapshot and the renewal) is neither lost nor to be stopped.
            lost = [j for j in lost if self._held.get(j) == held[j]]
            cancelled = [j for j in cancelled if self._held.get(j) == held[j]]
            self._lost.update(lost)
        if lost:
            log.warning("jobs no longer held by this worker (finished or taken over"
                        " elsewhere), stopping them here: %s", ", ".join(lost[:10]))
        for job_id in (*cancelled, *lost):
            self.stop_job(job_id)
        with self._lock:
            messages = list(self._messages)
        if messages:
            mark_taken_now(self.store.client, messages)

    def _run(self) -> None:
        next_sweep = time.monotonic()
        while True:
            try:
                self.beat()
                if self.sweeper is not None and time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.sweep_s
                    self.sweeper.try_sweep(hold_s=self.sweep_s * 0.9)
            except OUTAGE_ERRORS as err:
                # The jobs keep running; their leases outlast a short outage, and a long one
                # hands them to another worker, which is what a lease is for.
                log.warning("lease renewal: Redis unreachable (%s); retrying", err)
            except Exception:
                log.exception("lease renewal failed; retrying")
            if self._stop.wait(self.beat_s):
                return
