"""A trace of the engine's steps, for finding where a job's time went.

Set TIDEQ_STEP_TRACE to a directory and every engine core writes one JSON line a step to
`steps-<pid>.jsonl` there: when the step started (wall clock, comparable with a job's
submitted_at / started_at / finished_at in Redis), how long the call that made it took and
what it held. A call schedules the step, launches it and, with async scheduling, then waits
for and postprocesses the step before it (without, its own): the steps' period, not one
step's `ms`, is the device's pace. bench/step_trace_summary.py reads a trace against a
W-priority run. Lines are kept in memory and written a thousand at a
time, so tracing costs the step loop a list append; off (the default), one attribute test.

Fields: `t` start (s since the epoch), `ms` duration, `launch_ms` of it spent scheduling and
launching the step, `wait_ms` of it blocked on the device for the step before's tokens (near
zero when the host, not the device, sets the pace), `tokens` computed, `decode` one-token
chunks, `prefill` tokens of longer chunks, `high` chunks of priority-0 sequences, `running`
and `waiting` sequences after the step, `gc_ms` spent collecting garbage in this process since
the step before's line (`gc_gen`: the oldest generation collected, -1 none).
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.core.scheduler import Scheduler, SchedulerOutput

TRACE_ENV = "TIDEQ_STEP_TRACE"
FLUSH_EVERY = 1000


def trace_path(env: str, stem: str) -> Path | None:
    """DIR/<stem>-<pid>.jsonl for the directory $env names (created), or None when unset: where
    a process writes a trace asked for by environment variable (this one, the worker's
    tasks/front_trace.py)."""
    where = os.environ.get(env)
    if not where:
        return None
    directory = Path(where)
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{stem}-{os.getpid()}.jsonl"


class StepTrace:
    """Buffered step records, appended to `path` (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lines: list[str] = []
        # Garbage collections in this process since the last record: their pause and the
        # oldest generation collected (-1: none).
        self._gc_ms = 0.0
        self._gc_gen = -1
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        self._gc_ms += 1e3 * (time.perf_counter() - self._gc_started)
        self._gc_gen = max(self._gc_gen, info["generation"])

    @classmethod
    def from_env(cls) -> StepTrace | None:
        """The trace $TIDEQ_STEP_TRACE asks for (None when unset); creates the directory."""
        path = trace_path(TRACE_ENV, "steps")
        return None if path is None else cls(path)

    def record(self, started: float, launched: float, waited: float, ended: float,
               out: SchedulerOutput, scheduler: Scheduler) -> None:
        decode = prefill = high = 0
        for chunk in out.chunks:
            if chunk.num_tokens == 1:
                decode += 1
            else:
                prefill += chunk.num_tokens
            high += chunk.seq.priority == 0
        self._lines.append(json.dumps({
            "t": round(started, 6), "ms": round(1e3 * (ended - started), 3),
            "launch_ms": round(1e3 * (launched - started), 3),
            "wait_ms": round(1e3 * waited, 3),
            "tokens": decode + prefill, "decode": decode, "prefill": prefill, "high": high,
            "running": len(scheduler.running), "waiting": len(scheduler.waiting),
            "gc_ms": round(self._gc_ms, 3), "gc_gen": self._gc_gen,
        }))
        self._gc_ms, self._gc_gen = 0.0, -1
        if len(self._lines) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        with self.path.open("a") as f:
            f.write("\n".join(self._lines) + "\n")
        self._lines.clear()
