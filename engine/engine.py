"""The engine's front: tokenising, the loop thread, futures, stop strings, detokenising.

Any thread may call `submit`; one loop thread owns the backend and, at every step, runs every
request that is live at that moment together (requests that arrive during a step join the
next one). The backend works in token ids; this front turns text into ids and back.

A request fails alone: one the backend refuses, one whose step raises (found by running the
step's requests one at a time, engine/recovery.py) or one whose output cannot be handled fails
its own future; the others go on, and the loop itself survives any error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.backend import GenerationBackend, StepOutput
from engine.config import EngineConfig
from engine.recovery import (
    MAX_OUT_OF_MEMORY,
    MAX_STEP_FAILURES,
    StepFailure,
    free_device_memory,
    out_of_memory_error,
    repeated_failure_error,
)
from engine.request import (
    PRIORITY_RANK,
    Completion,
    EngineError,
    EngineShutDownError,
    PromptTooLongError,
    Request,
)

log = logging.getLogger(__name__)

# How long the idle loop sleeps between checks of its stop flag; a submission wakes it at once.
_IDLE_WAIT_S = 0.5


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def create_backend(config: EngineConfig) -> GenerationBackend:
    """The backend config.backend names; "auto" takes the native one where it supports the
    checkpoint's architecture, and says which it chose."""
    choice = config.backend
    if choice == "auto":
        from engine import native_backend

        choice = "native" if native_backend.supports(config.model_path) else "hf"
        log.info("backend auto: chose %s for %s", choice, config.model_path)
    if choice == "native":
        from engine.native_backend import NativeBackend

        return NativeBackend(config)
    if choice == "echo":
        from engine.echo_backend import EchoBackend

        return EchoBackend(config)
    from engine.hf_backend import HFBackend

    return HFBackend(config)


@dataclass
class _Live:
    """A request the loop is serving, and what it has produced so far."""

    request: Request
    prompt_token_ids: list[int]
    future: Future[Completion]
    submitted_at: float
    output_ids: list[int] = field(default_factory=list)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    # Stop-string search resumes from here (characters of decoded output already checked).
    stop_checked: int = 0
    text: str | None = None
    # Failed steps this request ran in, and out-of-memory errors it met (engine/recovery.py).
    step_failures: int = 0
    out_of_memory: int = 0

    def restart(self) -> None:
        """Forget the output: the backend computes the request again from its prompt. The
        time it was first scheduled stays (queued_s is the wait before any work)."""
        self.output_ids = []
        self.first_token_at = None
        self.stop_checked = 0
        self.text = None


class Engine:
    """Serves generation requests through futures.

    Args:
        config: the engine settings.
        backend: an already built backend (tests); default: create_backend(config).
    """

    def __init__(self, config: EngineConfig, backend: GenerationBackend | None = None) -> None:
        self.config = config
        self.backend = backend or create_backend(config)
        self.tokenizer = self.backend.tokenizer
        # Fast tokenizers are not safe to call from many threads at once.
        self._tokenizer_lock = threading.Lock()
        self._inbox: deque[tuple[str, Any]] = deque()
        self._wakeup = threading.Event()
        self._stopped = False
        self._live: dict[str, _Live] = {}
        self._counters = {
            "requests": 0, "generated_tokens": 0, "steps": 0, "failed": 0,
            # Failed steps the engine recovered from (engine/recovery.py).
            "step_errors": 0, "out_of_memory": 0,
        }
        self._thread = threading.Thread(target=self._loop, name="tideq-engine", daemon=True)
        self._thread.start()

    # --- any thread ------------------------------------------------------------------------
    def submit(self, request: Request) -> Future[Completion]:
        """Queue a request; the future resolves to its Completion or raises an EngineError."""
        future: Future[Completion] = Future()
        if self._stopped:
            future.set_exception(EngineShutDownError("engine is shut down"))
            return future
        try:
            prompt_ids = self._prompt_token_ids(request)
        except (EngineError, ValueError) as err:
            future.set_exception(err if isinstance(err, EngineError) else EngineError(str(err)))
            return future
        live = _Live(request, prompt_ids, future, time.monotonic())
        self._inbox.append(("add", live))
        self._wakeup.set()
        return future

    def cancel(self, request_id: str) -> None:
        """Stop a request wherever it is; its future resolves with finish_reason "cancelled"."""
        self._inbox.append(("abort", request_id))
        self._wakeup.set()

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Submit all and wait for all (offline use and benchmarks)."""
        futures = [self.submit(r) for r in requests]
        return [f.result() for f in futures]

    def stats(self) -> dict[str, Any]:
        return {**self._counters, "live": len(self._live), **self.backend.stats()}

    def is_alive(self) -> bool:
        """Whether the loop thread runs and the engine is not shut down (a health check:
        requests are served only while this holds)."""
        return not self._stopped and self._thread.is_alive()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still live fail with EngineError."""
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout)

    def _prompt_token_ids(self, request: Request) -> list[int]:
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
        else:
            with self._tokenizer_lock:
                if request.messages is not None:
                    text = self.tokenizer.apply_chat_template(
                        request.messages, tokenize=False, add_generation_prompt=True
                    )
                    ids = self.tokenizer.encode(text, add_special_tokens=False)
                else:
                    ids = self.tokenizer.encode(request.prompt)
        if not ids:
            raise EngineError(f"request {request.request_id}: the prompt is empty")
        limit = self.backend.max_model_len - 1
        if self.config.max_prompt_tokens is not None:
            limit = min(limit, self.config.max_prompt_tokens)
        if len(ids) > limit:
            raise PromptTooLongError(
                f"request {request.request_id}: prompt has {len(ids)} tokens, at most {limit}"
                f" are accepted (max_model_len {self.backend.max_model_len},"
                f" max_prompt_tokens {self.config.max_prompt_tokens})"
            )
        return ids

    # --- the loop thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopped:
            try:
                self._iterate()
            except Exception:  # a bug of the front itself; the loop must go on serving
                log.exception("engine loop error; failing the live requests")
                self._fail_all(EngineError("internal engine error; see the worker's log"))
        self._drain_inbox()
        self._fail_all(EngineShutDownError("engine is shut down"))

    def _iterate(self) -> None:
        self._drain_inbox()
        if not self.backend.has_unfinished():
            self._wakeup.wait(_IDLE_WAIT_S)
            self._wakeup.clear()
            return
        try:
            outputs = self.backend.step()
        except Exception as err:
            failure = StepFailure.of(err)
            if failure.out_of_memory:
                log.warning("engine step ran out of device memory: %s", failure.detail)
            else:
                log.exception("engine step failed")
        else:
            self._counters["steps"] += 1
            for out in outputs:
                self._advance_or_fail(out)
            return
        # Out of the except block, so that the exception (and the step's tensors its
        # traceback holds) is gone before recovery frees device memory.
        self._recover(failure)

    def _drain_inbox(self) -> None:
        while self._inbox:
            op, item = self._inbox.popleft()
            if op == "add":
                live: _Live = item
                rid = live.request.request_id
                if rid in self._live:
                    live.future.set_exception(EngineError(f"request id {rid} is already live"))
                    continue
                self._live[rid] = live
                self._counters["requests"] += 1
                self._admit(live)
            elif op == "abort" and item in self._live:
                self.backend.abort_request(item)
                self._finish(self._live[item], "cancelled")

    def _admit(self, live: _Live) -> None:
        """Hand a live request to the backend; one it refuses (a token outside the
        vocabulary, more tokens than the KV cache holds, ...) fails alone."""
        request = live.request
        try:
            self.backend.add_request(
                request.request_id, live.prompt_token_ids, request.sampling,
                PRIORITY_RANK[request.priority],
            )
        except Exception as err:
            log.warning("request %s refused: %s: %s", request.request_id, type(err).__name__, err)
            self._fail(live, _as_engine_error(request.request_id, err))

    # --- when a step fails (engine/recovery.py has the policy) ------------------------------
    def _recover(self, failure: StepFailure) -> None:
        """Find the request at fault, fail it alone and re-admit the others from scratch.

        The backend's state after a failed step is not trusted (a step may have raised
        half-way), so every live request is aborted and re-admitted, in arrival order;
        requests that arrived meanwhile wait in the inbox until recovery is done.
        """
        reported = self.backend.last_step_request_ids()
        involved = [
            live for rid, live in self._live.items() if reported is None or rid in reported
        ] or list(self._live.values())  # no one named: blame everyone, or nothing would end
        for rid in list(self._live):
            self.backend.abort_request(rid)
        if failure.out_of_memory:
            self._counters["out_of_memory"] += 1
            free_device_memory()
        else:
            self._counters["step_errors"] += 1
        for live in involved:
            self._blame(live, failure)
        if not failure.out_of_memory:
            for live in involved:
                if live.request.request_id in self._live and not self._stopped:
                    self._probe(live)
        log.warning(
            "engine recovered from a failed step (%s): %d request(s) ran in it; re-admitting"
            " %d live request(s) from scratch",
            failure.detail, len(involved), len(self._live),
        )
        for live in list(self._live.values()):
            live.restart()
            self._admit(live)

    def _blame(self, live: _Live, failure: StepFailure) -> None:
        """Count a failure against a request that ran in the failed step; fail it at its limit."""
        rid = live.request.request_id
        if failure.out_of_memory:
            live.out_of_memory += 1
            if live.out_of_memory >= MAX_OUT_OF_MEMORY:
                log.warning("request %s fails: out of memory %d times", rid, live.out_of_memory)
                self._fail(live, out_of_memory_error(rid, failure.detail))
        else:
            live.step_failures += 1
            if live.step_failures >= MAX_STEP_FAILURES:
                log.warning("request %s fails: in %d failed steps", rid, live.step_failures)
                self._fail(live, repeated_failure_error(rid, live.step_failures, failure.detail))

    def _probe(self, live: _Live) -> None:
        """Run `live` alone for one step; if that raises, the request is at fault and fails.
        The backend is left without it either way (survivors are re-admitted afterwards)."""
        rid = live.request.request_id
        try:
            self.backend.add_request(
                rid, live.prompt_token_ids, live.request.sampling,
                PRIORITY_RANK[live.request.priority],
            )
            self.backend.step()
        except Exception as err:
            failure = StepFailure.of(err)
        else:
            self.backend.abort_request(rid)
            return
        self.backend.abort_request(rid)
        log.warning("request %s fails alone in a step: %s", rid, failure.detail)
        if failure.out_of_memory:
            free_device_memory()
            self._blame(live, failure)
        else:
            self._fail(live, _as_engine_error(rid, failure))

    def _advance(self, out: StepOutput) -> None:
        live = self._live.get(out.request_id)
        if live is None:  # aborted while the step ran
            return
        now = time.monotonic()
        if live.scheduled_at is None:
            live.scheduled_at = now
        if out.new_token_ids:
            if live.first_token_at is None:
                live.first_token_at = now
            live.output_ids.extend(out.new_token_ids)
            self._counters["generated_tokens"] += len(out.new_token_ids)
            if live.request.sampling.stop and self._match_stop(live):
                self.backend.abort_request(out.request_id)
                self._finish(live, "stop")
                return
        if out.finished:
            self._finish(live, out.finish_reason or "length")

    def _match_stop(self, live: _Live) -> bool:
        """Whether the output now contains a stop string; if so, cut the text before it."""
        text = self._decode(live.output_ids)
        stops = live.request.sampling.stop
        start = max(0, live.stop_checked - max(len(s) for s in stops))
        found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
        live.stop_checked = len(text)
        if not found:
            return False
        live.text = text[: min(found)]
        return True

    def _finish(self, live: _Live, reason: str) -> None:
        self._live.pop(live.request.request_id, None)
        if live.future.done():
            return
        now = time.monotonic()
        text = live.text
        if text is None:
            text = self._decode(live.output_ids)
        live.future.set_result(
            Completion(
                request_id=live.request.request_id,
                text=text,
                token_ids=list(live.output_ids),
                finish_reason=reason,  # type: ignore[arg-type]
                prompt_tokens=len(live.prompt_token_ids),
                completion_tokens=len(live.output_ids),
                queued_s=(live.scheduled_at or now) - live.submitted_at,
                first_token_s=(live.first_token_at or now) - live.submitted_at,
                total_s=now - live.submitted_at,
            )
        )

    def _decode(self, token_ids: list[int]) -> str:
        with self._tokenizer_lock:
            return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))

    def _advance_or_fail(self, out: StepOutput) -> None:
        """`_advance`, where an error (say, in detokenising) fails only this request."""
        try:
            self._advance(out)
        except Exception as err:
            log.exception("request %s: handling its step output failed", out.request_id)
            live = self._live.get(out.request_id)
            if live is not None:
                self.backend.abort_request(out.request_id)
                self._fail(live, _as_engine_error(out.request_id, err))

    def _fail(self, live: _Live, error: EngineError) -> None:
        """Resolve one request with `error`; the caller has taken it out of the backend."""
        self._live.pop(live.request.request_id, None)
        if not live.future.done():
            live.future.set_exception(error)
        self._counters["failed"] += 1

    def _fail_all(self, error: EngineError) -> None:
        for rid, live in list(self._live.items()):
            try:
                self.backend.abort_request(rid)
            except Exception:  # the last resort must not raise in its turn
                log.exception("request %s: abort failed", rid)
            self._fail(live, error)


def _as_engine_error(request_id: str, err: BaseException | StepFailure) -> EngineError:
    """An EngineError as it is (it names the request already); anything else wrapped."""
    if isinstance(err, EngineError):
        return err
    detail = err.detail if isinstance(err, StepFailure) else f"{type(err).__name__}: {err}"
    return EngineError(f"request {request_id}: engine step failed: {detail}")
