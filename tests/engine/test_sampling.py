"""Seeded sampling through the native backend: the same seed gives the same output whatever
else shares the batch, and across preemption and recomputation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.config import EngineConfig
from engine.native_backend import NativeBackend
from engine.request import SamplingParams
from engine.runner import token_seed

SEEDED = SamplingParams(
    max_tokens=20, temperature=0.9, top_p=0.95, top_k=200, seed=1234, ignore_eos=True
)


def make_backend(path: Path, **overrides: object) -> NativeBackend:
    settings: dict[str, object] = dict(
        dtype="float32", device="cpu", max_model_len=128, max_num_seqs=8, block_size=4
    )
    settings.update(overrides)
    return NativeBackend(EngineConfig(model_path=str(path), **settings))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def llama(checkpoint: Callable[[str], Path]) -> Path:
    return checkpoint("llama")


def test_seeded_output_independent_of_batch(
    llama: Path, prompts: list[list[int]], drive: Callable[..., Any]
) -> None:
    target = prompts[2]
    alone = drive(make_backend(llama), [("t", target, SEEDED, 1)])["t"].token_ids
    assert len(alone) == SEEDED.max_tokens

    # In a crowd of unseeded samplers, greedy requests and other seeds, arriving staggered.
    crowd: list[tuple[str, list[int], SamplingParams, int]] = [
        (
            f"c{i}",
            p,
            SamplingParams(max_tokens=15, temperature=1.0, seed=i if i % 2 else None),
            i % 2,
        )
        for i, p in enumerate(prompts)
    ]
    crowd.insert(3, ("t", target, SEEDED, 1))
    crowded = drive(make_backend(llama), crowd, stagger=1)["t"].token_ids
    assert crowded == alone

    # Under preemption (a tiny cache) and chunked prefill.
    backend = make_backend(llama, num_kv_blocks=34, max_num_batched_tokens=9)
    squeezed = drive(backend, crowd, stagger=0)["t"].token_ids
    assert backend.stats()["num_preemptions"] > 0
    assert squeezed == alone


def test_different_seeds_differ_and_greedy_ignores_seed(
    llama: Path, prompts: list[list[int]], drive: Callable[..., Any]
) -> None:
    other = SamplingParams(max_tokens=20, temperature=0.9, seed=99, ignore_eos=True)
    greedy = SamplingParams(max_tokens=20, temperature=0.0, seed=5, ignore_eos=True)
    plain = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    top1 = SamplingParams(max_tokens=20, temperature=1.5, top_k=1, seed=7, ignore_eos=True)
    results = drive(
        make_backend(llama),
        [
            ("a", prompts[0], SEEDED, 1),
            ("b", prompts[0], other, 1),
            ("g", prompts[0], greedy, 1),
            ("p", prompts[0], plain, 1),
            ("k", prompts[0], top1, 1),
        ],
    )
    assert results["a"].token_ids != results["b"].token_ids
    assert results["g"].token_ids == results["p"].token_ids == results["k"].token_ids


def test_token_seed_mixes_positions_and_seeds() -> None:
    seeds = {token_seed(s, p) for s in range(20) for p in range(50)}
    assert len(seeds) == 1000
    assert all(0 <= s < 2**63 for s in seeds)
