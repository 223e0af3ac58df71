"""The engine's front: tokenising, the loop thread, futures, stop strings, detokenising.

Any thread may call `submit`; one loop thread owns the backend and, at every step, runs every
request that is live at that moment together (requests that arrive during a step join the
next one). The backend works in token ids; this front turns text into ids and back.
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
from engine.request import (
    PRIORITY_RANK,
    Completion,
    EngineError,
    EngineOutOfMemoryError,
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
        self._counters = {"requests": 0, "generated_tokens": 0, "steps": 0, "failed": 0}
        self._thread = threading.Thread(target=self._loop, name="tideq-engine", daemon=True)
        self._thread.start()

    # --- any thread ------------------------------------------------------------------------
    def submit(self, request: Request) -> Future[Completion]:
        """Queue a request; the future resolves to its Completion or raises an EngineError."""
        future: Future[Completion] = Future()
        if self._stopped:
            future.set_exception(EngineError("engine is shut down"))
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
            self._drain_inbox()
            if not self.backend.has_unfinished():
                self._wakeup.wait(_IDLE_WAIT_S)
                self._wakeup.clear()
                continue
            try:
                outputs = self.backend.step()
            except torch.OutOfMemoryError as err:
                # Nothing live can be trusted to finish; fail them all with a clear reason and
                # keep serving (the next requests start from an empty cache).
                self._fail_all(EngineOutOfMemoryError(f"device out of memory: {err}"))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            except Exception as err:  # a bug or a device fault: report it on every future
                log.exception("engine step failed")
                self._fail_all(EngineError(f"engine step failed: {type(err).__name__}: {err}"))
                continue
            self._counters["steps"] += 1
            for out in outputs:
                self._advance(out)
        self._drain_inbox()
        self._fail_all(EngineError("engine is shut down"))

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
                self.backend.add_request(
                    rid, live.prompt_token_ids, live.request.sampling,
                    PRIORITY_RANK[live.request.priority],
                )
            elif op == "abort" and item in self._live:
                self.backend.abort_request(item)
                self._finish(self._live[item], "cancelled")

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

    def _fail_all(self, error: EngineError) -> None:
        for rid, live in list(self._live.items()):
            self.backend.abort_request(rid)
            if not live.future.done():
                live.future.set_exception(error)
            self._counters["failed"] += 1
        self._live.clear()
