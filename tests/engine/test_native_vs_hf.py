"""The native backend's greedy outputs are token-identical to transformers' generate on the
same tiny float32 model, however the batch is formed: staggered arrivals, preemption, chunked
prefill."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.backends.native import NativeBackend
from engine.config import EngineConfig
from engine.request import SamplingParams

MAX_TOKENS = 24
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)

HFGreedy = Callable[[Path, list[list[int]], int], list[list[int]]]


def make_backend(path: Path, **overrides: object) -> NativeBackend:
    settings: dict[str, object] = dict(
        dtype="float32", device="cpu", max_model_len=128, max_num_seqs=8, block_size=4
    )
    settings.update(overrides)
    return NativeBackend(EngineConfig(model_path=str(path), **settings))  # type: ignore[arg-type]


def greedy_requests(prompts: list[list[int]]) -> list[tuple[str, list[int], SamplingParams, int]]:
    # Alternate priorities so both queues are exercised.
    return [(f"r{i}", p, GREEDY, i % 2) for i, p in enumerate(prompts)]


def check_against_hf(
    backend: NativeBackend,
    path: Path,
    prompts: list[list[int]],
    hf_greedy: HFGreedy,
    drive: Callable[..., Any],
    stagger: int = 2,
) -> None:
    expected = hf_greedy(path, prompts, MAX_TOKENS)
    results = drive(backend, greedy_requests(prompts), stagger=stagger)
    for i, want in enumerate(expected):
        got = results[f"r{i}"]
        assert got.token_ids == want, f"prompt {i} (length {len(prompts[i])}) differs"
        eos_hit = len(want) < MAX_TOKENS
        assert got.finish_reason == ("stop" if eos_hit else "length")
    stats = backend.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


@pytest.mark.parametrize("variant", ["llama", "qwen2", "mistral", "llama3_rope"])
def test_greedy_matches_hf(
    variant: str,
    checkpoint: Callable[[str], Path],
    prompts: list[list[int]],
    hf_greedy: HFGreedy,
    drive: Callable[..., Any],
) -> None:
    path = checkpoint(variant)
    check_against_hf(make_backend(path), path, prompts, hf_greedy, drive)


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_greedy_matches_hf_under_preemption(
    variant: str,
    checkpoint: Callable[[str], Path],
    prompts: list[list[int]],
    hf_greedy: HFGreedy,
    drive: Callable[..., Any],
) -> None:
    path = checkpoint(variant)
    # 34 blocks of 4 tokens: room for one full-length sequence, not for the whole batch.
    backend = make_backend(path, num_kv_blocks=34)
    check_against_hf(backend, path, prompts, hf_greedy, drive, stagger=0)
    assert backend.stats()["num_preemptions"] > 0


@pytest.mark.parametrize("budget", [1, 7])
def test_greedy_matches_hf_with_chunked_prefill(
    budget: int,
    checkpoint: Callable[[str], Path],
    prompts: list[list[int]],
    hf_greedy: HFGreedy,
    drive: Callable[..., Any],
) -> None:
    path = checkpoint("qwen2")
    backend = make_backend(path, max_num_batched_tokens=budget, max_num_seqs=4)
    check_against_hf(backend, path, prompts, hf_greedy, drive)
