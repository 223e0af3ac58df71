"""The contract between the engine core (engine/core/engine_core.py, driven by the front,
engine/engine.py: tokenising, futures, stop strings) and a generation backend (engine/backends:
the native paged engine, transformers, echo).

A backend works in token ids only. It owns EOS and max_tokens; the front owns stop strings
(it detokenises) and aborts a request once one is matched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from engine.request import FinishReason, SamplingParams


@dataclass(slots=True)
class StepOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None = None
    # True the first step this request was scheduled (for queue-time measurement).
    scheduled_first_time: bool = False


class GenerationBackend(ABC):
    """Runs token generation for many requests at once. Called from one thread only."""

    #: The tokenizer (a transformers PreTrainedTokenizerBase) loaded with the checkpoint.
    tokenizer: Any
    #: The checkpoint's EOS token ids.
    eos_token_ids: frozenset[int]
    #: Longest prompt + output a sequence may hold.
    max_model_len: int

    @abstractmethod
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, priority: int
    ) -> None:
        """Queue a request; priority is a rank, lower runs first (0 = high, 1 = low)."""

    @abstractmethod
    def abort_request(self, request_id: str) -> None:
        """Forget a request wherever it is (waiting or running); free its cache. Idempotent."""

    @abstractmethod
    def step(self) -> list[StepOutput]:
        """Run one scheduling step over every live request; return what each produced."""

    def drain(self) -> list[StepOutput]:
        """Finish a step still running (a backend that returns from `step` before the step
        it launched has finished, whose outputs the next call returns) without launching
        another; return what it produced."""
        return []

    @abstractmethod
    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""

    def last_step_request_ids(self) -> set[str] | None:
        """The requests the last `step` call ran (also when it raised), or None when the
        backend cannot tell. The front blames a failed step on these only; None blames every
        request the backend holds."""
        return None

    def stats(self) -> dict[str, Any]:
        """Counters for logs and metrics (running, waiting, cache use, ...)."""
        return {}
