"""A backend that answers every request at once, without a model: its output is the start of
its own prompt. It exists to measure and smoke-test everything around the engine (producer,
Redis, Celery workers, result records): `bench/bench_queue.py` (W-queue) runs the whole path
with it, and a deployment can check its queues and workers before loading a model.

It loads only the checkpoint's tokenizer and config (for EOS ids and max_model_len).
"""

from __future__ import annotations

from pathlib import Path

from engine.checkpoint import eos_token_ids
from engine.config import EngineConfig
from engine.core.backend import GenerationBackend, StepOutput
from engine.request import EngineError, SamplingParams


class EchoBackend(GenerationBackend):
    """Each step finishes every request added since the last one, with the first
    min(max_tokens, prompt length) prompt tokens as its output (finish reason "length")."""

    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoConfig, AutoTokenizer

        hf_config = AutoConfig.from_pretrained(config.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_path)
        self.eos_token_ids = eos_token_ids(Path(config.model_path), hf_config)
        self.max_model_len = config.max_model_len
        self._pending: dict[str, tuple[list[int], SamplingParams]] = {}

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, priority: int
    ) -> None:
        if request_id in self._pending:
            raise EngineError(f"request {request_id} is already queued")
        self._pending[request_id] = (prompt_token_ids, sampling)

    def abort_request(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def step(self) -> list[StepOutput]:
        done = [
            StepOutput(rid, prompt[: sampling.max_tokens], True, "length", True)
            for rid, (prompt, sampling) in self._pending.items()
        ]
        self._pending.clear()
        return done

    def has_unfinished(self) -> bool:
        return bool(self._pending)
