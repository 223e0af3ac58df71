"""The echo backend through the engine's front: every request answered at once with the start
of its own prompt, no model loaded."""

from __future__ import annotations

from pathlib import Path

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import Request, SamplingParams


def test_echo_answers_with_the_prompt_start(tiny_llama: Path) -> None:
    engine = Engine(EngineConfig(model_path=str(tiny_llama), backend="echo", device="cpu"))
    try:
        ids = [5, 6, 7, 8, 9]
        cut, whole = engine.generate([
            Request("a", prompt_token_ids=ids, sampling=SamplingParams(max_tokens=3)),
            Request("b", prompt_token_ids=ids[:2], sampling=SamplingParams(max_tokens=3)),
        ])  # fmt: skip
        assert cut.token_ids == ids[:3] and cut.finish_reason == "length"  # max_tokens
        assert whole.token_ids == ids[:2] and whole.completion_tokens == 2  # the whole prompt
        text = engine.generate([Request("c", prompt="hello there")])[0]
        assert text.prompt_tokens > 0 and text.token_ids
        assert "running" not in engine.stats()  # no scheduler, no cache behind it
    finally:
        engine.shutdown()
