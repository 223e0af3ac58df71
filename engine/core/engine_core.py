"""The engine core: one backend (scheduler and model), stepped in a loop, and the recovery from
a step that raises. It works in token ids only and talks to the front (engine/engine.py)
through plain messages, so that it can run in a process of its own (engine/core_process.py)
or in a thread of the front's (tests, debugging).

Messages to the core (tuples):
    ("add", request_id, prompt_token_ids, sampling, priority_rank, per_step)
    ("abort", request_id)
    ("stop",)
Events from the core (tuples), in order:
    ("out", request_id, new_token_ids, finished, finish_reason)
                                    per step for a `per_step` request (stop strings, streamed
                                    text); for the others only the first (it was scheduled),
                                    the one with its first token and the last, which carries
                                    the tokens held back meanwhile
    ("restart", request_id)        the output so far is void; the request runs again
    ("fail", request_id, error)     an EngineError; the request is gone from the core
    ("stats", dict)                 the backend's counters, now and then

Holding tokens back spares the front one event per request and step, Python work under the
front's one GIL that competes with its task threads: at a batch of 256 it was 40,000 events a
second, most of them for requests whose text nobody reads before the end.

A request fails alone: one the backend refuses, or one whose step raises (found by running
the step's requests one at a time, engine/core/recovery.py); the others go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.core.backend import GenerationBackend
from engine.core.recovery import (
    MAX_OUT_OF_MEMORY,
    MAX_STEP_FAILURES,
    StepFailure,
    free_device_memory,
    out_of_memory_error,
    repeated_failure_error,
)
from engine.request import EngineError, SamplingParams

log = logging.getLogger(__name__)

Message = tuple[Any, ...]
Event = tuple[Any, ...]

# How long an idle core waits for a message before it looks again (its stop check).
IDLE_WAIT_S = 0.5
# Seconds between stats events while the core is busy.
STATS_INTERVAL_S = 0.5


@dataclass
class _Admitted:
    """What the core keeps of a request: enough to admit it again from scratch."""

    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: int
    # Whether the front wants its tokens every step (stop strings, streamed text).
    per_step: bool = True
    # Failed steps it ran in, and out-of-memory errors it met (engine/core/recovery.py).
    step_failures: int = 0
    out_of_memory: int = 0
    # Tokens not yet sent (not per_step), and what the front has been told so far.
    held: list[int] = field(default_factory=list)
    told_scheduled: bool = False
    told_first_token: bool = False

    def restart(self) -> None:
        self.held.clear()
        self.told_scheduled = self.told_first_token = False


class EngineCore:
    """One backend and its live requests. Called from one thread only."""

    def __init__(self, backend: GenerationBackend) -> None:
        self.backend = backend
        self._requests: dict[str, _Admitted] = {}
        self.counters = {"steps": 0, "step_errors": 0, "out_of_memory": 0}

    def has_unfinished(self) -> bool:
        return bool(self._requests) and self.backend.has_unfinished()

    def stats(self) -> dict[str, Any]:
        return {**self.counters, **self.backend.stats()}

    def handle(self, message: Message, events: list[Event]) -> None:
        """Apply an "add" or "abort" message; events for the front go to `events`."""
        op = message[0]
        if op == "add":
            _, rid, prompt, sampling, priority, per_step = message
            if rid in self._requests:
                events.append(("fail", rid, EngineError(f"request id {rid} is already live")))
                return
            self._requests[rid] = _Admitted(prompt, sampling, priority, per_step)
            self._admit(rid, events)
        elif op == "abort":
            if self._requests.pop(message[1], None) is not None:
                self.backend.abort_request(message[1])
        else:
            raise ValueError(f"unknown message {op!r}")

    def step(self, events: list[Event]) -> None:
        """One step over every live request; what it produced goes to `events`."""
        try:
            outputs = self.backend.step()
        except Exception as err:
            failure = StepFailure.of(err)
            if failure.out_of_memory:
                log.warning("engine step ran out of device memory: %s", failure.detail)
            else:
                log.exception("engine step failed")
        else:
            self.counters["steps"] += 1
            for out in outputs:
                req = self._requests.get(out.request_id)
                if req is None:
                    continue  # aborted while the step ran
                if out.finished:
                    del self._requests[out.request_id]
                if req.per_step:
                    events.append(("out", out.request_id, out.new_token_ids, out.finished,
                                   out.finish_reason))
                    continue
                req.held.extend(out.new_token_ids)
                if (out.finished or not req.told_scheduled
                        or (req.held and not req.told_first_token)):
                    events.append(("out", out.request_id, req.held, out.finished,
                                   out.finish_reason))
                    req.told_scheduled = True
                    req.told_first_token = req.told_first_token or bool(req.held)
                    req.held = []
            return
        # Out of the except block, so that the exception (and the step's tensors its
        # traceback holds) is gone before recovery frees device memory.
        self._recover(failure, events)

    def fail_all(self, error: EngineError, events: list[Event]) -> None:
        for rid in list(self._requests):
            self._fail(rid, error, events)

    # --- internals -----------------------------------------------------------------------
    def _admit(self, rid: str, events: list[Event]) -> None:
        """Hand a request to the backend; one it refuses (a token outside the vocabulary,
        more tokens than the KV cache holds, ...) fails alone."""
        req = self._requests[rid]
        try:
            self.backend.add_request(rid, req.prompt_token_ids, req.sampling, req.priority)
        except Exception as err:
            log.warning("request %s refused: %s: %s", rid, type(err).__name__, err)
            self._fail(rid, as_engine_error(rid, err), events)

    def _fail(self, rid: str, error: EngineError, events: list[Event]) -> None:
        if self._requests.pop(rid, None) is None:
            return
        try:
            self.backend.abort_request(rid)
        except Exception:  # the last resort must not raise in its turn
            log.exception("request %s: abort failed", rid)
        events.append(("fail", rid, error))

    def _recover(self, failure: StepFailure, events: list[Event]) -> None:
        """Find the request at fault, fail it alone and re-admit the others from scratch.

        The backend's state after a failed step is not trusted (a step may have raised
        half-way), so every live request is aborted and re-admitted, in arrival order.
        """
        reported = self.backend.last_step_request_ids()
        involved = [rid for rid in self._requests if reported is None or rid in reported]
        involved = involved or list(self._requests)  # no one named: blame everyone
        for rid in self._requests:
            self.backend.abort_request(rid)
        if failure.out_of_memory:
            self.counters["out_of_memory"] += 1
            free_device_memory()
        else:
            self.counters["step_errors"] += 1
        for rid in involved:
            self._blame(rid, failure, events)
        if not failure.out_of_memory:
            for rid in involved:
                if rid in self._requests:
                    self._probe(rid, events)
        log.warning(
            "engine recovered from a failed step (%s): %d request(s) ran in it; re-admitting"
            " %d live request(s) from scratch",
            failure.detail, len(involved), len(self._requests),
        )
        for rid in list(self._requests):
            events.append(("restart", rid))
            self._requests[rid].restart()
            self._admit(rid, events)

    def _blame(self, rid: str, failure: StepFailure, events: list[Event]) -> None:
        """Count a failure against a request that ran in the failed step; fail it at its limit."""
        req = self._requests[rid]
        if failure.out_of_memory:
            req.out_of_memory += 1
            if req.out_of_memory >= MAX_OUT_OF_MEMORY:
                log.warning("request %s fails: out of memory %d times", rid, req.out_of_memory)
                self._fail(rid, out_of_memory_error(rid, failure.detail), events)
        else:
            req.step_failures += 1
            if req.step_failures >= MAX_STEP_FAILURES:
                log.warning("request %s fails: in %d failed steps", rid, req.step_failures)
                self._fail(rid, repeated_failure_error(rid, req.step_failures, failure.detail),
                           events)

    def _probe(self, rid: str, events: list[Event]) -> None:
        """Run a request alone for one step; if that raises, it is at fault and fails. The
        backend is left without it either way (survivors are re-admitted afterwards)."""
        req = self._requests[rid]
        try:
            self.backend.add_request(rid, req.prompt_token_ids, req.sampling, req.priority)
            self.backend.step()
            self.backend.drain()  # the step may still be running
        except Exception as err:
            failure = StepFailure.of(err)
        else:
            self.backend.abort_request(rid)
            return
        self.backend.abort_request(rid)
        log.warning("request %s fails alone in a step: %s", rid, failure.detail)
        if failure.out_of_memory:
            free_device_memory()
            self._blame(rid, failure, events)
        else:
            self._fail(rid, as_engine_error(rid, failure), events)


def serve(core: EngineCore, receive: Callable[[float], list[Message]],
          emit: Callable[[list[Event]], None]) -> None:
    """The core's loop: take messages, step while work is live, emit what each step produced.
    Returns on a "stop" message; the live requests are then failed by the front.

    Args:
        receive: the messages that arrived, waiting up to the given seconds for the first.
        emit: sends a batch of events to the front.
    """
    next_stats = 0.0
    while True:
        events: list[Event] = []
        busy = core.has_unfinished()
        for message in receive(0.0 if busy else IDLE_WAIT_S):
            if message[0] == "stop":
                return
            core.handle(message, events)
        if core.has_unfinished():
            core.step(events)
        now = time.monotonic()
        # Now and then while busy, and whenever the core falls idle (so that the front's
        # counters are current once a batch is done).
        if (now >= next_stats and (events or not busy)) or (busy and not core.has_unfinished()):
            events.append(("stats", core.stats()))
            next_stats = now + STATS_INTERVAL_S
        if events:
            emit(events)


def as_engine_error(request_id: str, err: BaseException | StepFailure) -> EngineError:
    """An EngineError as it is (it names the request already); anything else wrapped."""
    if isinstance(err, EngineError):
        return err
    detail = err.detail if isinstance(err, StepFailure) else f"{type(err).__name__}: {err}"
    return EngineError(f"request {request_id}: engine step failed: {detail}")
