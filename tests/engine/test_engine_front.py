"""The engine's front (loop thread, futures, stop strings, failures) over a scripted backend.

The backend here is a stand-in that emits a fixed token script: what is under test is the
front's logic, not generation (the native and transformers backends have their own tests).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import wait
from typing import Any

import pytest
import torch

from engine.config import EngineConfig
from engine.core.backend import GenerationBackend, StepOutput
from engine.engine import Engine
from engine.request import (
    EngineError,
    EngineOutOfMemoryError,
    EngineShutDownError,
    PromptTooLongError,
    Request,
    SamplingParams,
)


class CharTokenizer:
    """One token per character: ids are code points."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict[str, Any]], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class ScriptedBackend(GenerationBackend):
    """Emits `script` one character per step for every live request, in arrival order."""

    def __init__(self, script: str = "hello world. more", max_model_len: int = 64) -> None:
        self.tokenizer = CharTokenizer()
        self.eos_token_ids = frozenset()
        self.max_model_len = max_model_len
        self.script = script
        self.live: dict[str, list[Any]] = {}  # id -> [position, max_tokens, priority]
        self.added: list[tuple[str, int]] = []
        self.aborted: list[str] = []
        self.fail_next: BaseException | None = None
        # Raised by every step while set (an error that does not go away).
        self.fail_always: BaseException | None = None
        # Requests whose presence in a step makes it raise; requests add_request refuses;
        # requests given a token id the tokenizer cannot decode.
        self.poisoned: set[str] = set()
        self.refused: set[str] = set()
        self.undecodable: set[str] = set()
        # Requests that make a step raise once they have produced this many tokens.
        self.late_failure: dict[str, int] = {}
        self.step_sizes: list[int] = []
        # Seconds each step takes: the core runs ahead of the front, so a test that needs the
        # front's abort to arrive before the end of a request slows the steps down.
        self.step_delay = 0.0

    def add_request(self, request_id, prompt_token_ids, sampling, priority):
        if request_id in self.refused:
            raise ValueError(f"{request_id} refused")
        self.live[request_id] = [0, sampling.max_tokens, priority]
        self.added.append((request_id, len(prompt_token_ids)))

    def abort_request(self, request_id):
        self.aborted.append(request_id)
        self.live.pop(request_id, None)

    def has_unfinished(self):
        return bool(self.live)

    def step(self):
        time.sleep(self.step_delay)
        if self.fail_next is not None:
            err, self.fail_next = self.fail_next, None
            raise err
        if self.fail_always is not None:
            raise self.fail_always
        bad = sorted(self.poisoned & set(self.live)) + [
            rid for rid, at in self.late_failure.items() if self.live.get(rid, [-1])[0] >= at
        ]
        if bad:
            raise RuntimeError(f"poisoned {bad[0]}")
        self.step_sizes.append(len(self.live))
        outs = []
        for rid, state in list(self.live.items()):
            pos, max_tokens, _ = state
            token = ord(self.script[pos % len(self.script)])
            if rid in self.undecodable:
                token = -1
            state[0] += 1
            done = state[0] >= max_tokens
            if done:
                del self.live[rid]
            outs.append(StepOutput(rid, [token], done, "length" if done else None,
                                   scheduled_first_time=pos == 0))
        return outs


def make_engine(backend: ScriptedBackend, **kw: Any) -> Engine:
    return Engine(EngineConfig(model_path="unused", **kw), backend=backend)


@pytest.fixture
def engine_and_backend():
    backend = ScriptedBackend()
    engine = make_engine(backend)
    yield engine, backend
    engine.shutdown()


def req(rid: str, prompt: str = "hi", **sampling: Any) -> Request:
    return Request(rid, prompt=prompt, sampling=SamplingParams(**sampling))


def test_text_tokens_and_counts(engine_and_backend):
    engine, _ = engine_and_backend
    out = engine.submit(req("a", "abc", max_tokens=5)).result(5)
    assert (out.text, out.finish_reason) == ("hello", "length")
    assert (out.prompt_tokens, out.completion_tokens) == (3, 5)
    assert 0 <= out.queued_s <= out.first_token_s <= out.total_s


def test_stop_string_cuts_text_and_aborts(engine_and_backend):
    engine, backend = engine_and_backend
    backend.step_delay = 0.02
    out = engine.submit(req("a", max_tokens=60, stop=[" wor", "xyz"])).result(5)
    assert (out.text, out.finish_reason) == ("hello", "stop")
    eventually(lambda: "a" in backend.aborted)  # the abort reaches the core after the result


def test_chat_messages_use_the_template(engine_and_backend):
    engine, backend = engine_and_backend
    messages = [{"role": "user", "content": "hey"}]
    engine.submit(Request("c", messages=messages, sampling=SamplingParams(max_tokens=1))).result(5)
    assert backend.added[-1] == ("c", len("<user>hey<assistant>"))


def test_prompt_too_long_fails_only_that_request(engine_and_backend):
    engine, _ = engine_and_backend
    bad = engine.submit(req("long", "x" * 64))
    with pytest.raises(PromptTooLongError, match="prompt has 64 tokens, at most 63"):
        bad.result(5)
    assert engine.submit(req("ok", max_tokens=2)).result(5).text == "he"


def test_requests_live_at_once_share_steps():
    backend = ScriptedBackend()
    gate = threading.Event()
    original = backend.step

    def slow_first_step():
        gate.wait(5)
        return original()

    backend.step = slow_first_step  # type: ignore[method-assign]
    engine = make_engine(backend)
    try:
        first = engine.submit(req("r0", max_tokens=3))
        # Arrive while the first step is held: they must join the next step, not queue behind.
        rest = [engine.submit(req(f"r{i}", max_tokens=3)) for i in range(1, 6)]
        gate.set()
        wait([first, *rest], timeout=5)
        assert max(backend.step_sizes) == 6
    finally:
        engine.shutdown()


def test_cancel_resolves_cancelled():
    backend = ScriptedBackend()
    engine = make_engine(backend)
    try:
        gate = threading.Event()
        original = backend.step
        backend.step = lambda: (gate.wait(5), original())[1]  # type: ignore[method-assign]
        future = engine.submit(req("a", max_tokens=50))
        engine.cancel("a")
        gate.set()
        assert future.result(5).finish_reason == "cancelled"
        eventually(lambda: "a" in backend.aborted)
    finally:
        engine.shutdown()


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for something another thread does (the core applies messages asynchronously)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def hold_steps(backend: ScriptedBackend) -> threading.Event:
    """Make the backend's next step wait for the returned event, so that requests submitted
    meanwhile share the step after it."""
    gate = threading.Event()
    original = backend.step
    backend.step = lambda: (gate.wait(5), original())[1]  # type: ignore[method-assign]
    return gate


def test_out_of_memory_once_is_retried_from_scratch(engine_and_backend):
    engine, backend = engine_and_backend
    backend.fail_next = torch.OutOfMemoryError("CUDA out of memory (simulated)")
    out = engine.submit(req("a", max_tokens=5)).result(5)
    # The retry starts over: the text is whole, not the script shifted by a lost step.
    assert (out.text, out.completion_tokens, out.finish_reason) == ("hello", 5, "length")
    assert "a" in backend.aborted
    assert engine.stats()["out_of_memory"] == 1


def test_out_of_memory_twice_fails_with_advice_and_the_engine_goes_on(engine_and_backend):
    engine, backend = engine_and_backend
    backend.fail_always = torch.OutOfMemoryError("CUDA out of memory (simulated)")
    futures = [engine.submit(req(rid, max_tokens=5)) for rid in ("a", "b")]
    for future in futures:
        with pytest.raises(EngineOutOfMemoryError) as info:
            future.result(5)
        message = str(info.value)
        for setting in ("batch_size_per_gpu", "float16", "int8", "kv_cache_memory_fraction",
                        "max_num_batched_tokens", "gpus_per_worker", "CUDA out of memory"):
            assert setting in message
    assert engine.stats()["out_of_memory"] == 2
    backend.fail_always = None
    assert engine.submit(req("c", max_tokens=2)).result(5).text == "he"


def test_a_one_off_step_error_is_retried(engine_and_backend):
    engine, backend = engine_and_backend
    backend.fail_next = RuntimeError("boom")
    out = engine.submit(req("a", max_tokens=5)).result(5)
    assert (out.text, out.completion_tokens) == ("hello", 5)
    assert engine.stats()["step_errors"] == 1 and engine.stats()["failed"] == 0


def test_a_request_that_breaks_steps_fails_alone():
    backend = ScriptedBackend()
    backend.poisoned = {"bad"}
    gate = hold_steps(backend)
    engine = make_engine(backend)
    try:
        first = engine.submit(req("first", max_tokens=5))
        rest = {rid: engine.submit(req(rid, max_tokens=4)) for rid in ("x", "bad", "y")}
        gate.set()
        with pytest.raises(EngineError, match="request bad: engine step failed: RuntimeError"):
            rest["bad"].result(5)
        assert first.result(5).text == "hello"
        assert [rest[rid].result(5).text for rid in ("x", "y")] == ["hell", "hell"]
        assert engine.stats()["failed"] == 1
    finally:
        engine.shutdown()


def test_a_failure_no_probe_shows_fails_its_request_after_three_steps(engine_and_backend):
    engine, backend = engine_and_backend
    backend.late_failure = {"late": 3}  # its one-step probe passes every time
    with pytest.raises(EngineError, match="request late: 3 engine steps failed.*poisoned late"):
        engine.submit(req("late", max_tokens=5)).result(5)
    assert engine.stats()["step_errors"] == 3
    assert engine.submit(req("b", max_tokens=2)).result(5).text == "he"


def test_a_refused_request_fails_alone(engine_and_backend):
    engine, backend = engine_and_backend
    backend.refused = {"no"}
    with pytest.raises(EngineError, match="no refused"):
        engine.submit(req("no", max_tokens=2)).result(5)
    assert engine.submit(req("yes", max_tokens=2)).result(5).text == "he"


def test_an_error_handling_one_output_fails_only_that_request():
    backend = ScriptedBackend()
    backend.undecodable = {"bad"}
    backend.step_delay = 0.02
    gate = hold_steps(backend)
    engine = make_engine(backend)
    try:
        good = engine.submit(req("good", max_tokens=3))
        bad = engine.submit(req("bad", max_tokens=60, stop=["x"]))
        gate.set()
        with pytest.raises(EngineError, match="request bad"):
            bad.result(5)
        assert good.result(5).text == "hel"
        eventually(lambda: "bad" in backend.aborted)
    finally:
        engine.shutdown()


def test_duplicate_live_id_is_refused(engine_and_backend):
    engine, backend = engine_and_backend
    gate = threading.Event()
    original = backend.step
    backend.step = lambda: (gate.wait(5), original())[1]  # type: ignore[method-assign]
    first = engine.submit(req("same", max_tokens=3))
    second = engine.submit(req("same", max_tokens=3))
    gate.set()
    with pytest.raises(EngineError, match="already live"):
        second.result(5)
    assert first.result(5).text == "hel"


def test_is_alive_until_shutdown_and_through_failures():
    backend = ScriptedBackend()
    engine = make_engine(backend)
    assert engine.is_alive()
    backend.fail_always = torch.OutOfMemoryError("CUDA out of memory (simulated)")
    with pytest.raises(EngineOutOfMemoryError):
        engine.submit(req("a", max_tokens=3)).result(5)
    backend.fail_always = RuntimeError("boom")
    with pytest.raises(EngineError):
        engine.submit(req("b", max_tokens=3)).result(5)
    assert engine.is_alive()
    engine.shutdown()
    assert not engine.is_alive()


def test_when_the_core_dies_live_requests_fail_and_is_alive_turns_false():
    backend = ScriptedBackend()
    engine = make_engine(backend)
    # An error no recovery catches ends the core's loop, as a killed core process would.
    backend.fail_always = SystemExit("core killed")
    with pytest.raises(EngineShutDownError, match="engine core"):
        engine.submit(req("a", max_tokens=3)).result(5)
    eventually(lambda: not engine.is_alive())
    with pytest.raises(EngineShutDownError):
        engine.submit(req("b", max_tokens=3)).result(5)
    engine.shutdown()


def test_shutdown_fails_pending_and_refuses_new():
    backend = ScriptedBackend()
    engine = make_engine(backend)
    gate = threading.Event()
    original = backend.step
    backend.step = lambda: (gate.wait(0.5), original())[1]  # type: ignore[method-assign]
    pending = engine.submit(req("a", max_tokens=1000))
    engine.shutdown(timeout=0.1)
    gate.set()
    with pytest.raises(EngineError, match="shut down"):
        pending.result(5)
    with pytest.raises(EngineError, match="shut down"):
        engine.submit(req("b")).result(1)
