"""A trace of the worker's side of each `high` message, for finding where a high job's time
goes before the engine sees it (the engine's own steps: engine/core/step_trace.py).

Set TIDEQ_FRONT_TRACE to a directory and every worker appends one JSON line per high message
to `front-<pid>.jsonl` there: wall-clock times (s since the epoch, comparable with a job's
submitted_at / started_at in Redis and with the step trace) of

- `start`: the task thread begins the message (just before the jobs are started in Redis;
  the jobs' started_at is taken here too),
- `started`: the jobs are started (one Redis script call),
- `submitted`: every job has been handed to the engine (tokenised and sent to its core).

`jobs` lists the message's job ids. Off (the default), one attribute test per message. Low
messages are not traced: a flood of them would be most of the file and none of the question.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

TRACE_ENV = "TIDEQ_FRONT_TRACE"


class FrontTrace:
    """Appends one line per traced message to `path` (a high message's few lines are written
    at once: there are few of them)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> FrontTrace | None:
        from engine.core.step_trace import trace_path  # pure Python, no torch

        path = trace_path(TRACE_ENV, "front")
        return None if path is None else cls(path)

    def record(self, jobs: list[str], start: float, started: float, submitted: float) -> None:
        line = json.dumps({"jobs": jobs, "start": round(start, 6), "started": round(started, 6),
                           "submitted": round(submitted, 6)})
        with self._lock, self.path.open("a") as f:
            f.write(line + "\n")
