"""The transformers backend: for architectures the native engine does not cover.

Static batching: when no batch is running, every waiting request (high first, up to
max_num_seqs) forms one batch, left-padded, decoded together step by step with a dynamic KV
cache until all of its rows finish; requests arriving meanwhile wait for the next batch.
Slower than the native engine (no paged cache, finished rows keep their place), but it runs
any causal LM that transformers can load.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.checkpoint import eos_token_ids
from engine.config import EngineConfig
from engine.core.backend import GenerationBackend, StepOutput
from engine.devices import resolve_device
from engine.executor.sampler import make_generator, sample
from engine.request import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class _Row:
    request_id: str
    prompt_len: int
    sampling: SamplingParams
    generator: torch.Generator | None
    generated: int = 0
    finished: bool = False


@dataclass
class _Waiting:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: int
    arrival: int


class HFBackend(GenerationBackend):
    def __init__(self, config: EngineConfig) -> None:
        if config.dtype == "int8":
            raise ValueError("dtype int8 needs the native backend")
        self.config = config
        self.device = resolve_device(config.device)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_path)
        model = AutoModelForCausalLM.from_pretrained(
            config.model_path, dtype=getattr(torch, config.dtype)
        )
        self.model = model.to(self.device)  # type: ignore[arg-type]  # transformers' stub
        self.model.eval()
        # transformers renamed the cache argument (past_key_values -> cache) during 5.x.
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.eos_token_ids = eos_token_ids(config.model_path, model.config, self.tokenizer)
        limit = getattr(self.model.config, "max_position_embeddings", config.max_model_len)
        self.max_model_len = min(config.max_model_len, limit)
        self._pad_id = self.tokenizer.pad_token_id or 0
        self._waiting: list[_Waiting] = []
        self._arrivals = 0
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [B, T] 1 = real token
        self._last: torch.Tensor | None = None  # [B] last sampled token per row
        self._generated_total = 0
        self._last_step_ids: set[str] | None = None
        log.info("hf backend: %s on %s (%s)", config.model_path, self.device, config.dtype)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, priority: int
    ) -> None:
        self._arrivals += 1
        self._waiting.append(
            _Waiting(request_id, prompt_token_ids, sampling, priority, self._arrivals)
        )

    def abort_request(self, request_id: str) -> None:
        self._waiting = [w for w in self._waiting if w.request_id != request_id]
        for row in self._rows:
            if row.request_id == request_id:
                row.finished = True

    def has_unfinished(self) -> bool:
        return bool(self._waiting) or any(not r.finished for r in self._rows)

    def stats(self) -> dict[str, Any]:
        return {
            "backend": "hf",
            "running": sum(not r.finished for r in self._rows),
            "waiting": len(self._waiting),
            "generated_tokens": self._generated_total,
        }

    def last_step_request_ids(self) -> set[str] | None:
        return self._last_step_ids

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        self._last_step_ids = None
        if not any(not r.finished for r in self._rows):
            return self._start_batch()
        self._last_step_ids = {r.request_id for r in self._rows if not r.finished}
        return self._decode()

    def _start_batch(self) -> list[StepOutput]:
        self._waiting.sort(key=lambda w: (w.priority, w.arrival))
        batch = self._waiting[: self.config.max_num_seqs]
        self._waiting = self._waiting[len(batch) :]
        if not batch:
            return []
        self._last_step_ids = {w.request_id for w in batch}
        width = max(len(w.prompt_token_ids) for w in batch)
        ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
        for i, w in enumerate(batch):
            n = len(w.prompt_token_ids)
            ids[i, width - n :] = torch.tensor(w.prompt_token_ids)
            mask[i, width - n :] = 1
        self._rows = [
            _Row(w.request_id, len(w.prompt_token_ids), w.sampling,
                 make_generator(w.sampling.seed, self.device))
            for w in batch
        ]
        from transformers import DynamicCache

        self._cache = DynamicCache()
        self._mask = mask.to(self.device)
        positions = (self._mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        logits = self.model(
            input_ids=ids.to(self.device), attention_mask=self._mask, position_ids=positions,
            use_cache=True, logits_to_keep=1, **{self._cache_arg: self._cache},
        ).logits[:, -1]  # [B, V]
        outputs = self._sample_and_emit(logits)
        for out in outputs:
            out.scheduled_first_time = True
        return outputs

    def _decode(self) -> list[StepOutput]:
        assert self._mask is not None and self._last is not None
        self._mask = torch.cat(
            [self._mask, torch.ones((len(self._rows), 1), dtype=torch.long, device=self.device)],
            dim=1,
        )
        positions = self._mask.sum(-1, keepdim=True) - 1  # [B, 1]
        logits = self.model(
            input_ids=self._last.unsqueeze(1), attention_mask=self._mask, position_ids=positions,
            use_cache=True, **{self._cache_arg: self._cache},
        ).logits[:, -1]  # [B, V]
        return self._sample_and_emit(logits)

    def _sample_and_emit(self, logits: torch.Tensor) -> list[StepOutput]:
        tokens = sample(logits, [r.sampling for r in self._rows], [r.generator for r in self._rows])
        self._last = tokens
        outputs = []
        for row, token in zip(self._rows, tokens.tolist(), strict=False):
            if row.finished:
                continue
            row.generated += 1
            self._generated_total += 1
            reason = None
            if token in self.eos_token_ids and not row.sampling.ignore_eos:
                reason = "stop"
            elif (
                row.generated >= row.sampling.max_tokens
                or row.prompt_len + row.generated >= self.max_model_len
            ):
                reason = "length"
            row.finished = reason is not None
            # The EOS token is part of the output ids (as in transformers' generate); the front
            # leaves it out of the text.
            outputs.append(StepOutput(row.request_id, [token], row.finished, reason))  # type: ignore[arg-type]
        if all(r.finished for r in self._rows):
            self._rows, self._cache, self._mask, self._last = [], None, None, None
        return outputs


