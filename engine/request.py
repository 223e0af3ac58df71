"""What a caller hands the engine, and what it gets back. Plain data; imports no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

Priority = Literal["high", "low"]
FinishReason = Literal["stop", "length", "cancelled"]

# Scheduling rank of each priority: lower runs first.
PRIORITY_RANK: dict[str, int] = {"high": 0, "low": 1}


# Temperatures below this sample greedily (vLLM draws the same line): dividing float32 logits
# by a smaller one overflows to inf, and the softmax of that is NaN.
GREEDY_TEMPERATURE = 1e-5
# top_k reaches torch (and kernels) as a 32-bit int at most; any k above the vocabulary keeps
# every token anyway (the sampler clamps it).
MAX_TOP_K = 2**31 - 1
# torch.Generator.manual_seed takes a 64-bit integer; the runner mixes the seed in 64 bits.
MAX_SEED = 2**63 - 1


def _is_int(value: Any) -> bool:
    # bool is an int subclass, but `"top_k": true` in a job is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}")


def _check_finite(name: str, value: Any) -> None:
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature 0 (or below GREEDY_TEMPERATURE) means greedy; top_k 0
    and top_p 1.0 mean no cut-off.

    A request with a seed draws from its own generator, so its output does not depend on what
    else shares the batch. Every field is checked here, since a job's values come from a client:
    one bad value must fail its own request, not a batch step.
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
        _check_int("max_tokens", self.max_tokens, 1)
        _check_finite("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        _check_finite("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, 0, MAX_TOP_K)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        stop = self.stop
        if isinstance(stop, str) or not isinstance(stop, tuple | list):
            raise ValueError(f"stop must be a list of strings, got {stop!r}")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        object.__setattr__(self, "stop", tuple(stop))  # a list given directly stays hashable
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

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
            if stop is None or isinstance(stop, str):
                values["stop"] = () if stop is None else (stop,)
            elif isinstance(stop, list):
                values["stop"] = tuple(stop)
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


class KVCacheTooSmallError(EngineError):
    """The request's prompt and output could never fit the KV cache, even alone."""


class EngineShutDownError(EngineError):
    """The engine stopped (worker shutdown, or its loop died): not the request's fault, so a
    worker hands the job back instead of failing it."""
