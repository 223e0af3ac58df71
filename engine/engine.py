"""The engine's front: tokenising, futures, stop strings, detokenising.

Any thread may call `submit`. The scheduler and the model run in the engine core
(engine/core/engine_core.py), in processes of its own by default (engine/core_process.py), and
answer in token ids; a receiver thread here turns each step's events into text and resolves futures.
Requests that arrive during a step join the next one.

A request fails alone: one the core refuses, one whose step raises (found by running the
step's requests one at a time, engine/core/recovery.py) or one whose output cannot be handled here
fails its own future; the others go on. If the core itself dies (a rank process killed, say),
every live request fails with EngineShutDownError and `is_alive()` turns false.

Streaming: `submit(request, on_text=callback)` has the receiver thread call `callback(delta)`
with the text each step adds (the deltas concatenate to the Completion's text), and
`callback(TEXT_RESTART)` (None) when the request runs again from its prompt: the text so far
is void and starts over. Requests without a callback cost nothing extra.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from engine.config import EngineConfig
from engine.core.backend import GenerationBackend
from engine.core.engine_core import Event
from engine.core_link import IDLE_WAIT_S, CoreGoneError, open_core
from engine.request import (
    PRIORITY_RANK,
    Completion,
    EngineError,
    EngineShutDownError,
    PromptTooLongError,
    Request,
)
from engine.tokenization import ThreadTokenizers

log = logging.getLogger(__name__)

# What an on_text callback receives when the request's text starts over (a restart).
TEXT_RESTART = None
TextCallback = Callable[[str | None], None]


@dataclass
class _Live:
    """A request in flight, and what it has produced so far."""

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
    # Streaming: the callback, and the text handed to it so far (since the last restart).
    on_text: TextCallback | None = None
    streamed: str = ""

    def restart(self) -> None:
        """Forget the output: the core computes the request again from its prompt. The
        time it was first scheduled stays (queued_s is the wait before any work)."""
        self.output_ids = []
        self.first_token_at = None
        self.stop_checked = 0
        self.text = None
        if self.on_text is not None:
            self.streamed = ""
            _call_on_text(self, TEXT_RESTART)


class Engine:
    """Serves generation requests through futures.

    Args:
        config: the engine settings (config.core: the core in processes or in a thread).
        backend: an already built backend (tests); it runs in a thread of this process.
    """

    def __init__(self, config: EngineConfig, backend: GenerationBackend | None = None) -> None:
        self.config = config
        self._core = open_core(config, backend)
        # The backend object when the core runs in this process (tests look inside it).
        self.backend: GenerationBackend | None = getattr(self._core, "backend", None)
        self.tokenizer = self._core.tokenizer
        self.max_model_len = self._core.max_model_len
        # Fast tokenizers are not safe to call from many threads at once: each thread that
        # tokenises or detokenises has its own copy (engine/tokenization.py says why no lock).
        self._tokenizers = ThreadTokenizers(self.tokenizer)
        # Guards _live: task threads add and cancel, the receiver advances and finishes.
        self._lock = threading.Lock()
        self._live: dict[str, _Live] = {}
        self._stopped = False
        self._gone: str | None = None
        self._counters = {"requests": 0, "generated_tokens": 0, "failed": 0}
        self._core_stats: dict[str, Any] = dict(self._core.stats)
        self._thread = threading.Thread(target=self._receive_loop, name="tideq-engine",
                                        daemon=True)
        self._thread.start()

    # --- any thread ------------------------------------------------------------------------
    def submit(self, request: Request,
               on_text: TextCallback | None = None) -> Future[Completion]:
        """Queue a request; the future resolves to its Completion or raises an EngineError.

        on_text: called by the receiver thread with each step's new text, before the future
        resolves (see the module docstring); it must be quick, and one that raises is dropped.
        """
        future: Future[Completion] = Future()
        if self._stopped or self._gone is not None:
            future.set_exception(EngineShutDownError(self._gone or "engine is shut down"))
            return future
        try:
            prompt_ids = self._prompt_token_ids(request)
        except (EngineError, ValueError) as err:
            future.set_exception(err if isinstance(err, EngineError) else EngineError(str(err)))
            return future
        rid = request.request_id
        live = _Live(request, prompt_ids, future, time.monotonic(), on_text=on_text)
        with self._lock:
            if rid in self._live:
                future.set_exception(EngineError(f"request id {rid} is already live"))
                return future
            self._live[rid] = live
            self._counters["requests"] += 1
        try:
            # Tokens every step only where they are read before the end: stop strings are
            # matched and streamed text is sent here.
            per_step = bool(request.sampling.stop) or on_text is not None
            self._core.send(("add", rid, prompt_ids, request.sampling,
                             PRIORITY_RANK[request.priority], per_step))
        except CoreGoneError as err:
            self._fail(rid, EngineShutDownError(str(err)))
        return future

    def prepare_tokenizers(self, threads: int) -> None:
        """Make the tokenizer copies of `threads` threads that will submit requests ahead, in
        the background (engine/tokenization.py: a large vocabulary's takes ~0.5 s)."""
        self._tokenizers.prepare(threads)

    def cancel(self, request_id: str) -> None:
        """Stop a request wherever it is; its future resolves with finish_reason "cancelled"."""
        live = self._abort_in_core(request_id)
        if live is not None:
            self._finish(live, "cancelled")

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Submit all and wait for all (offline use and benchmarks)."""
        futures = [self.submit(r) for r in requests]
        return [f.result() for f in futures]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            live = len(self._live)
        core = self._core.live_stats()
        return {**self._counters, "live": live, **(core if core is not None else self._core_stats)}

    def is_alive(self) -> bool:
        """Whether the core runs and the engine is not shut down (a health check: requests
        are served only while this holds)."""
        return (not self._stopped and self._gone is None and self._thread.is_alive()
                and self._core.alive())

    @property
    def stopped(self) -> bool:
        """Whether shutdown() was called."""
        return self._stopped

    @property
    def gone_reason(self) -> str | None:
        """Why the core died, if it did."""
        return self._gone

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the core; requests still live fail with EngineShutDownError."""
        if self._stopped:
            return
        self._stopped = True
        self._core.close()
        self._thread.join(timeout)
        self._fail_all(EngineShutDownError("engine is shut down"))

    def _prompt_token_ids(self, request: Request) -> list[int]:
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
        else:
            tokenizer = self._tokenizers.get()
            if request.messages is not None:
                text = tokenizer.apply_chat_template(
                    request.messages, tokenize=False, add_generation_prompt=True
                )
                ids = tokenizer.encode(text, add_special_tokens=False)
            else:
                ids = tokenizer.encode(request.prompt)
        if not ids:
            raise EngineError(f"request {request.request_id}: the prompt is empty")
        limit = self.max_model_len - 1
        if self.config.max_prompt_tokens is not None:
            limit = min(limit, self.config.max_prompt_tokens)
        if len(ids) > limit:
            raise PromptTooLongError(
                f"request {request.request_id}: prompt has {len(ids)} tokens, at most {limit}"
                f" are accepted (max_model_len {self.max_model_len},"
                f" max_prompt_tokens {self.config.max_prompt_tokens})"
            )
        return ids

    # --- the receiver thread ---------------------------------------------------------------
    def _receive_loop(self) -> None:
        self._tokenizers.get()  # this thread's copy now, not when the first request finishes
        while True:
            try:
                events = self._core.receive(IDLE_WAIT_S)
            except CoreGoneError as err:
                if not self._stopped:
                    self._gone = str(err)
                    log.critical("%s; failing its %d live request(s)", err, len(self._live))
                    self._fail_all(EngineShutDownError(str(err)))
                return
            for event in events:
                try:
                    self._handle(event)
                except Exception as err:  # an error here fails one request, never the loop
                    log.exception("engine event %s failed", event[0])
                    if event[0] != "stats":
                        self._abort_failed(event[1], err)

    def _handle(self, event: Event) -> None:
        kind = event[0]
        if kind == "out":
            _, rid, new_ids, finished, reason = event
            self._advance(rid, new_ids, finished, reason)
        elif kind == "restart":
            with self._lock:
                live = self._live.get(event[1])
            if live is not None:
                live.restart()
        elif kind == "fail":
            self._fail(event[1], event[2])
        elif kind == "stats":
            self._core_stats = event[1]

    def _advance(self, rid: str, new_ids: list[int], finished: bool,
                 reason: str | None) -> None:
        with self._lock:
            live = self._live.get(rid)
        if live is None:  # cancelled or stopped meanwhile
            return
        now = time.monotonic()
        if live.scheduled_at is None:
            live.scheduled_at = now
        if new_ids:
            if live.first_token_at is None:
                live.first_token_at = now
            live.output_ids.extend(new_ids)
            self._counters["generated_tokens"] += len(new_ids)
            if live.request.sampling.stop and self._match_stop(live):
                if not finished:
                    self._core.send(("abort", rid))
                self._stream(live, final=True)
                self._finish(live, "stop")
                return
            if live.on_text is not None:
                self._stream(live, final=finished)
        if finished:
            if live.on_text is not None and not new_ids:
                self._stream(live, final=True)
            self._finish(live, reason or "length")

    def _stream(self, live: _Live, final: bool) -> None:
        """Hand the callback the text added since its last call. Before the end, text that
        may still change is held back: a trailing partial character (decoded as U+FFFD) and,
        with stop strings, as much as a stop string could still cover."""
        if live.on_text is None:
            return
        text = live.text if live.text is not None else self._decode(live.output_ids)
        if final:
            live.text = text  # _finish uses it as it is, no second decode
        else:
            text = text.rstrip("\ufffd")
            stops = live.request.sampling.stop
            if stops:
                hold = max(len(s) for s in stops) - 1
                text = text[: max(len(text) - hold, 0)]
        if not text.startswith(live.streamed):
            # Decoding more tokens rewrote earlier text (rare): start the stream over.
            if not final:
                return
            live.streamed = ""
            _call_on_text(live, TEXT_RESTART)
        delta = text[len(live.streamed):]
        if delta:
            live.streamed = text
            _call_on_text(live, delta)

    def _abort_in_core(self, rid: str) -> _Live | None:
        """Tell the core to drop a live request (nothing to do if the core is gone); returns
        the request, or None when it is no longer live here."""
        with self._lock:
            live = self._live.get(rid)
        if live is not None:
            with contextlib.suppress(CoreGoneError):
                self._core.send(("abort", rid))
        return live

    def _abort_failed(self, rid: str, err: Exception) -> None:
        if self._abort_in_core(rid) is not None:
            self._fail(rid, EngineError(f"request {rid}: handling its output failed:"
                                        f" {type(err).__name__}: {err}"))

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
        # Whoever takes it out of _live resolves it (a cancel may race the receiver).
        with self._lock:
            if self._live.get(live.request.request_id) is not live:
                return
            del self._live[live.request.request_id]
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
        return str(self._tokenizers.get().decode(token_ids, skip_special_tokens=True))

    def _fail(self, rid: str, error: EngineError) -> None:
        """Resolve one request with `error` (the core no longer holds it)."""
        with self._lock:
            live = self._live.pop(rid, None)
        if live is None:
            return
        if not live.future.done():
            live.future.set_exception(error)
        self._counters["failed"] += 1

    def _fail_all(self, error: EngineError) -> None:
        with self._lock:
            rids = list(self._live)
        for rid in rids:
            self._fail(rid, error)


def _call_on_text(live: _Live, delta: str | None) -> None:
    """Call a request's text callback; one that raises is logged and dropped (the request
    goes on)."""
    callback = live.on_text
    if callback is None:
        return
    try:
        callback(delta)
    except Exception:
        log.exception("request %s: its text callback raised; streaming stops for it",
                      live.request.request_id)
        live.on_text = None
