"""The engine's text callback (submit(..., on_text=)) over the scripted backend: deltas that
concatenate to the completion's text, held back before a stop string, a restart marker, and a
callback that raises."""

from __future__ import annotations

import threading
import time

from engine.engine import TEXT_RESTART
from engine.request import Request, SamplingParams
from tests.engine.test_engine_front import ScriptedBackend, make_engine


def _after_last_restart(deltas: list[str | None]) -> str:
    out = ""
    for d in deltas:
        out = "" if d is TEXT_RESTART else out + d
    return out


def test_deltas_concatenate_to_the_completion_text_one_step_at_a_time():
    engine = make_engine(ScriptedBackend("abcdefghij"))
    try:
        deltas: list[str | None] = []
        done = engine.submit(Request("r1", prompt="hi", sampling=SamplingParams(max_tokens=8)),
                             on_text=deltas.append).result(10)
        assert done.text == "abcdefgh"
        assert deltas == list("abcdefgh")
        # A request without a callback is served as before.
        plain = engine.submit(Request("r2", prompt="hi", sampling=SamplingParams(max_tokens=3)))
        assert plain.result(10).text == "abc"
    finally:
        engine.shutdown()


def test_text_that_a_stop_string_may_cover_is_held_back():
    engine = make_engine(ScriptedBackend("hello world. more"))
    try:
        deltas: list[str | None] = []
        sampling = SamplingParams(max_tokens=30, stop=["ld."])
        done = engine.submit(Request("r1", prompt="hi", sampling=sampling),
                             on_text=deltas.append).result(10)
        assert done.finish_reason == "stop" and done.text == "hello wor"
        assert "".join(d for d in deltas if d is not None) == "hello wor"
        assert all("l" not in d for d in deltas[-1:] if d)  # "l" of "ld." never went out
    finally:
        engine.shutdown()


def test_a_restart_tells_the_callback_and_the_text_starts_over():
    backend = ScriptedBackend("abcdefghijklmnop")
    backend.step_delay = 0.01
    engine = make_engine(backend)
    try:
        deltas: list[str | None] = []
        seen = threading.Event()

        def on_text(delta: str | None) -> None:
            deltas.append(delta)
            if delta is not None and len(deltas) == 3:
                seen.set()

        future = engine.submit(Request("r1", prompt="hi", sampling=SamplingParams(max_tokens=10)),
                               on_text=on_text)
        assert seen.wait(10)
        backend.fail_next = RuntimeError("transient")
        done = future.result(10)
        assert TEXT_RESTART in deltas
        assert _after_last_restart(deltas) == done.text == "abcdefghij"
    finally:
        engine.shutdown()


def test_a_callback_that_raises_is_dropped_and_the_request_completes():
    engine = make_engine(ScriptedBackend("abcdef"))
    try:
        calls: list[str | None] = []

        def bad(delta: str | None) -> None:
            calls.append(delta)
            raise ValueError("boom")

        done = engine.submit(Request("r1", prompt="hi", sampling=SamplingParams(max_tokens=5)),
                             on_text=bad).result(10)
        assert done.text == "abcde" and done.finish_reason == "length"
        assert calls == ["a"]
        time.sleep(0.05)
        assert engine.is_alive()
    finally:
        engine.shutdown()
