"""A worker's finisher threads: they store the outcomes of the jobs its engine ran.

An engine future resolves in the engine's receiver thread, which delivers every job's tokens:
a Redis round trip there would hold up every other job. So a future's done-callback only
hands its job to this small pool, and a finisher stores the result, the failure or the
cancellation, exactly as the task thread used to before messages were acknowledged early.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# Finisher threads per worker. Storing an outcome is one Lua call; a few threads keep up with
# a batch of hundreds whose jobs end in the same engine step, and each holds a pooled Redis
# connection (tasks/worker.py sizes the pool for them).
FINISHER_THREADS = 4


class Finishers:
    """A few threads that run outcome-storing work in the order it was handed over, urgent
    work (a `high` job's) before the rest: a low flood's jobs end dozens to a step, and a
    high job's outcome stored behind them waited ~0.1 s (W-priority's slowest high jobs)."""

    def __init__(self, threads: int = FINISHER_THREADS, name: str = "tideq-finish") -> None:
        self._cond = threading.Condition()
        self._urgent: deque[Callable[[], Any]] = deque()
        self._work: deque[Callable[[], Any]] = deque()
        self._busy = 0  # work handed over and not done yet (queued or running)
        self._stopped = False
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, work: Callable[[], Any], urgent: bool = False) -> bool:
        """Hand over work (any thread; it never waits); urgent work runs before any work that
        is not. False once stopped: the work is not run, and the caller lets its job go."""
        with self._cond:
            if self._stopped:
                return False
            (self._urgent if urgent else self._work).append(work)
            self._busy += 1
            self._cond.notify()
        return True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until everything handed over is done; False if not after timeout seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self._busy == 0, timeout)

    def stop(self, timeout: float) -> None:
        """Take no more work, drop what has not started, and end the threads (waiting at most
        timeout seconds for work in progress, such as a store retrying through an outage)."""
        with self._cond:
            self._stopped = True
            self._busy -= len(self._work) + len(self._urgent)
            self._work.clear()
            self._urgent.clear()
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._work and not self._urgent and not self._stopped:
                    self._cond.wait()
                if self._urgent:
                    work = self._urgent.popleft()
                elif self._work:
                    work = self._work.popleft()
                else:
                    return
            try:
                work()
            except Exception:  # noqa: BLE001 - one job's failure must not end a finisher
                log.exception("storing a job's outcome failed")
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()
