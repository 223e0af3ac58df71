"""The contract between the engine's front (engine/engine.py: tokenising, the loop thread,
futures, stop strings) and a generation backend (native paged engine or transformers).

A backend works in token ids only. It owns EOS and max_tokens; the front owns stop strings
(it detokenises) and aborts a request once one is matched.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from engine.request import FinishReason, SamplingParams


@dataclass
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


def create_backend(config: Any, group: Any = None) -> GenerationBackend:
    """The backend config.backend names (config: an EngineConfig); "auto" takes the native
    one where it supports the checkpoint's architecture, and says which it chose. `group`:
    the ParallelGroup of a sharded model (native backend only)."""
    import logging

    from engine.request import EngineError

    choice = config.backend
    if choice == "auto":
        from engine import native_backend

        choice = "native" if native_backend.supports(config.model_path) else "hf"
        logging.getLogger(__name__).info("backend auto: chose %s for %s", choice,
                                         config.model_path)
    if choice == "native":
        from engine.native_backend import NativeBackend

        return NativeBackend(config, group)
    if group is not None and group.world_size > 1:
        raise EngineError(f"backend {choice!r} cannot shard a model; use the native backend"
                          " (a Llama-family architecture) or gpus_per_worker: 1")
    if choice == "echo":
        from engine.echo_backend import EchoBackend

        return EchoBackend(config)
    from engine.hf_backend import HFBackend

    return HFBackend(config)
