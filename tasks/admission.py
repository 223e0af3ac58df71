"""A worker's admission gate: the jobs it has started and not yet finished, and the wait of a
`low` message until there is room for its jobs.

A message is acknowledged as soon as its jobs are started (tasks/jobs.py), so the task threads
no longer bound what a worker holds: this count does. A `low` message's task thread waits here
BEFORE it starts its jobs (they stay `queued` in the store meanwhile) while the worker has
`max_jobs_in_flight` jobs or more in flight; a `high` message never waits, so it reaches the
engine, which runs high jobs first, however many low jobs the worker holds.

Waiters pass in arrival order. Only the first in line is woken when a job's outcome is stored,
and it wakes the next once it has passed, so the count overshoots the limit by at most one
message's jobs (the last one let in below the limit), not by every waiter at once.

Watchers (tasks/intake.py) are told of every change of the count or of the line, so that a
full worker can stop taking `low` messages instead of holding them here.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

# Called with (jobs in flight, messages waiting) after every change.
GateWatcher = Callable[[int, int], None]


class AdmissionGate:
    """Args:
        limit: jobs in flight at or above which a waiting message is held back.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        # One condition per waiting message, oldest first; all share the gate's lock.
        self._waiters: deque[threading.Condition] = deque()
        self._emptied = threading.Condition(self._lock)
        self._in_flight = 0
        self._closed = False
        self._watchers: list[GateWatcher] = []

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def waiting(self) -> int:
        """Messages waiting for room now."""
        with self._lock:
            return len(self._waiters)

    def watch(self, watcher: GateWatcher) -> None:
        """Call watcher(in_flight, waiting) after every change from now on. It runs under the
        gate's lock, in whichever thread changed the gate, so that the changes reach it in the
        order they happened: it must be quick, must not raise, and must not use the gate."""
        with self._lock:
            self._watchers.append(watcher)

    def admit(self, jobs: int, wait: bool = True) -> None:
        """Count a message's `jobs` in flight. wait=True (a `low` message): first wait, behind
        the messages already waiting, until fewer than `limit` jobs are in flight or the gate
        is closed. wait=False (a `high` message): at once."""
        with self._lock:
            if wait and not self._closed and (self._waiters or self._in_flight >= self.limit):
                self._wait_turn()
            self._in_flight += jobs
            self._changed()
            self._wake_next()

    def release(self, jobs: int = 1) -> None:
        """`jobs` have left the worker's hands: their outcomes are stored, or they were left
        to their leases, or they were never started."""
        with self._lock:
            self._in_flight -= jobs
            if self._in_flight <= 0:
                self._emptied.notify_all()
            self._changed()
            self._wake_next()

    def close(self) -> None:
        """The worker is stopping: let every waiting message through now, and every later one
        at once (tasks/worker.py says why they run rather than go back to their queue)."""
        with self._lock:
            self._closed = True
            for turn in self._waiters:
                turn.notify()

    def wait_empty(self, timeout: float) -> bool:
        """Wait until no job is in flight; False if some still are after timeout seconds."""
        with self._lock:
            return self._emptied.wait_for(lambda: self._in_flight <= 0, timeout)

    # --- under the lock ----------------------------------------------------------------------
    def _wait_turn(self) -> None:
        turn = threading.Condition(self._lock)
        self._waiters.append(turn)
        self._changed()
        try:
            while not self._closed and (self._waiters[0] is not turn
                                        or self._in_flight >= self.limit):
                turn.wait()
        except BaseException:
            # Leaving the line without passing: the next one in line may have room.
            self._waiters.remove(turn)
            self._changed()
            self._wake_next()
            raise
        # Counted by the caller's admission, which tells the watchers once for both changes.
        self._waiters.remove(turn)

    def _changed(self) -> None:
        for watcher in self._watchers:
            watcher(self._in_flight, len(self._waiters))

    def _wake_next(self) -> None:
        if self._waiters and (self._closed or self._in_flight < self.limit):
            self._waiters[0].notify()
