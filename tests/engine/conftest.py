"""Fixtures for the engine tests: tiny random checkpoints (built once per session), greedy
references from transformers, and a driver that feeds requests to a backend step by step."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from engine.core.backend import GenerationBackend
from engine.random_checkpoint import build_checkpoint
from engine.request import SamplingParams

# Checkpoint variants by name: build_checkpoint arguments.
VARIANTS: dict[str, dict[str, Any]] = {
    "llama": dict(arch="llama"),  # tied embeddings
    "qwen2": dict(arch="qwen2"),  # QKV bias, untied embeddings
    # A window shorter than the test sequences, so the sliding-window masks matter.
    "mistral": dict(arch="mistral", sliding_window=12),
    # Llama 3 frequency scaling with a short original context, so the scaling matters.
    "llama3_rope": dict(
        arch="llama",
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """checkpoint(name) -> folder of the tiny float32 checkpoint VARIANTS[name]."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            out = tmp_path_factory.mktemp(f"ckpt_{name}")
            built[name] = build_checkpoint(out, shape="tiny", dtype="float32", **VARIANTS[name])
        return built[name]

    return get


def make_prompts(count: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Token-id prompts of the given lengths, avoiding the special tokens (ids 0..3)."""
    rng = random.Random(seed)
    return [
        [rng.randrange(4, 1000) for _ in range(lengths[i % len(lengths)])] for i in range(count)
    ]


# Mixed lengths: shorter and longer than a block, one longer than the small prefill budgets.
PROMPT_LENGTHS = [3, 17, 40, 9, 64, 25]


@pytest.fixture(scope="session")
def prompts() -> list[list[int]]:
    return make_prompts(len(PROMPT_LENGTHS), PROMPT_LENGTHS)


@pytest.fixture(scope="session")
def hf_greedy() -> Callable[[Path, list[list[int]], int], list[list[int]]]:
    """hf_greedy(path, prompts, max_new_tokens) -> each prompt's greedy continuation from
    transformers' own generate, one prompt at a time (cached per session)."""
    import torch
    from transformers import AutoModelForCausalLM

    cache: dict[tuple[Path, tuple[tuple[int, ...], ...], int], list[list[int]]] = {}

    def run(path: Path, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        key = (path, tuple(tuple(p) for p in prompt_ids), max_new_tokens)
        if key not in cache:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
            results = []
            for ids in prompt_ids:
                out = model.generate(
                    torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False
                )
                results.append(out[0, len(ids) :].tolist())
            cache[key] = results
        return cache[key]

    return run


# (request_id, prompt_token_ids, sampling, priority rank)
Submitted = tuple[str, list[int], SamplingParams, int]


@dataclass
class Finished:
    token_ids: list[int]
    finish_reason: str | None


def drive_backend(
    backend: GenerationBackend, requests: list[Submitted], stagger: int = 1, max_steps: int = 10_000
) -> dict[str, Finished]:
    """Add request i at step i * stagger and step until everything finished."""
    results = {r[0]: Finished([], None) for r in requests}
    pending = list(requests)
    step = 0
    while pending or backend.has_unfinished():
        while pending and step >= (len(requests) - len(pending)) * stagger:
            backend.add_request(*pending.pop(0))
        for out in backend.step():
            done = results[out.request_id]
            assert done.finish_reason is None, f"{out.request_id} produced after finishing"
            done.token_ids.extend(out.new_token_ids)
            if out.finished:
                done.finish_reason = out.finish_reason
        step += 1
        assert step < max_steps, "backend did not finish"
    return results


Drive = Callable[..., dict[str, Finished]]


@pytest.fixture(scope="session")
def drive() -> Drive:
    """drive(backend, [(request_id, prompt_ids, sampling, priority), ...], stagger=1)
    -> {request_id: Finished(token_ids, finish_reason)}."""
    return drive_backend
