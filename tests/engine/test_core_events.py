"""What the engine core tells the front: every step's tokens only for requests whose text is
read before the end; the others hear when they are scheduled, their first token and the end."""

from __future__ import annotations

from typing import Any

from engine.core.backend import GenerationBackend, StepOutput
from engine.core.engine_core import EngineCore
from engine.request import SamplingParams


class CountingBackend(GenerationBackend):
    """One prefill step without a token, then one token a step (the step number) until
    max_tokens."""

    tokenizer = None
    eos_token_ids = frozenset()
    max_model_len = 64

    def __init__(self) -> None:
        self.live: dict[str, list[int]] = {}
        self.limits: dict[str, int] = {}
        self.prefilled: set[str] = set()

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling: SamplingParams, priority: int) -> None:
        self.live[request_id] = []
        self.limits[request_id] = sampling.max_tokens

    def abort_request(self, request_id: str) -> None:
        self.live.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.live)

    def step(self) -> list[StepOutput]:
        outputs = []
        for rid, tokens in list(self.live.items()):
            if not tokens and rid not in self.prefilled:
                self.prefilled.add(rid)
                outputs.append(StepOutput(rid, [], False, None, True))
                continue
            tokens.append(100 + len(tokens))
            done = len(tokens) >= self.limits[rid]
            if done:
                del self.live[rid]
            outputs.append(StepOutput(rid, [tokens[-1]], done, "length" if done else None))
        return outputs


def run(per_step: bool, max_tokens: int = 5) -> list[tuple[Any, ...]]:
    core = EngineCore(CountingBackend())
    events: list[tuple[Any, ...]] = []
    core.handle(("add", "r", [1, 2, 3], SamplingParams(max_tokens=max_tokens), 1, per_step),
                events)
    while core.has_unfinished():
        core.step(events)
    return [e for e in events if e[0] == "out"]


def test_a_request_read_only_at_the_end_hears_three_times_with_every_token():
    events = run(per_step=False)
    assert events == [
        ("out", "r", [], False, None),  # scheduled (its queue time)
        ("out", "r", [100], False, None),  # its first token (time to first token)
        ("out", "r", [101, 102, 103, 104], True, "length"),  # the rest, at the end
    ]


def test_a_streamed_request_hears_every_step():
    events = run(per_step=True)
    assert [e[2] for e in events] == [[], [100], [101], [102], [103], [104]]
    assert events[-1][3:] == (True, "length")


def test_a_one_token_request_ends_with_its_token():
    assert run(per_step=False, max_tokens=1) == [
        ("out", "r", [], False, None), ("out", "r", [100], True, "length")]
