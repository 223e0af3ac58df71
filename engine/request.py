"""What a caller hands the engine, and what it gets back. Plain data; imports no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Priority = Literal["high", "low"]
FinishReason = Literal["stop", "length", "cancelled"]

# Scheduling rank of each priority: lower runs first.
PRIORITY_RANK: dict[str, int] = {"high": 0, "low": 1}


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature 0 means greedy; top_k 0 and top_p 1.0 mean no cut-off.

    A request with a seed draws from its own generator, so its output does not depend on what
    else shares the batch.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # Benchmarks decode a fixed number of tokens whatever the model says.
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Build from a JSON-like dict (the wire format of a job); unknown keys are an error."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {sorted(unknown)}")
        values = dict(data)
        if "stop" in values:
            stop = values["stop"]
            values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return cls(**values)


@dataclass
class Request:
    """One generation request. Exactly one of prompt, messages, prompt_token_ids is set.

    messages are chat turns ({"role", "content"}) rendered with the model's chat template.
    """

    request_id: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_token_ids: list[int] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    priority: Priority = "low"

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.prompt, self.messages, self.prompt_token_ids))
        if given != 1:
            raise ValueError(
                f"request {self.request_id}: exactly one of prompt, messages, prompt_token_ids"
                f" must be given ({given} were)"
            )
        if self.priority not in PRIORITY_RANK:
            raise ValueError(f"request {self.request_id}: unknown priority {self.priority!r}")


@dataclass
class Completion:
    """The engine's answer to one request. Times are seconds, measured by the engine."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    queued_s: float = 0.0  # submit -> first scheduled
    first_token_s: float = 0.0  # submit -> first output token
    total_s: float = 0.0  # submit -> finished

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "queued_s": round(self.queued_s, 6),
            "first_token_s": round(self.first_token_s, 6),
            "total_s": round(self.total_s, 6),
        }


class EngineError(RuntimeError):
    """A request the engine cannot serve (too long a prompt, engine shut down, ...)."""


class PromptTooLongError(EngineError):
    pass


class EngineOutOfMemoryError(EngineError):
    """The device ran out of memory serving this request."""
