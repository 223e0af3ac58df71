"""Sampling: the checks on a request's sampling parameters, the sampler's edge cases (huge
top_k, vanishing top_p and temperature), and seeded sampling through the native backend (the
same seed gives the same output whatever else shares the batch, across preemption and
recomputation)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.backends.native import NativeBackend
from engine.config import EngineConfig
from engine.executor.runner import token_seed
from engine.executor.sampler import apply_top_k_top_p, sample
from engine.request import MAX_SEED, MAX_TOP_K, SamplingParams

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


# ---- parameter checks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", -0.5),
        ("temperature", "hot"),
        ("temperature", True),
        ("top_p", float("nan")),
        ("top_p", float("inf")),
        ("top_p", 0.0),
        ("top_p", -0.1),
        ("top_p", 1.0000001),
        ("top_k", -1),
        ("top_k", 2**70),
        ("top_k", MAX_TOP_K + 1),
        ("top_k", 3.0),
        ("top_k", True),
        ("seed", -1),
        ("seed", MAX_SEED + 1),
        ("seed", 1.5),
        ("seed", False),
        ("max_tokens", 0),
        ("max_tokens", -3),
        ("max_tokens", 2.0),
        ("max_tokens", True),
        ("ignore_eos", 1),
    ],
)
def test_bad_values_name_their_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_dict({field: value})


@pytest.mark.parametrize(
    "values",
    [
        dict(temperature=0, top_p=1, top_k=0, seed=0, max_tokens=1),
        dict(temperature=2.5, top_p=5e-324, top_k=MAX_TOP_K, seed=MAX_SEED),
        dict(temperature=1e-300, stop="x"),
        dict(stop=["a", "b"]),
        dict(stop=None),
    ],
)
def test_edge_values_are_accepted(values: dict[str, Any]) -> None:
    params = SamplingParams.from_dict(values)
    assert isinstance(params.stop, tuple)
    assert SamplingParams(stop=["a"]).stop == ("a",)  # type: ignore[arg-type]


@pytest.mark.parametrize("stop", [5, [""], ["ok", 3]])
def test_bad_stop_is_a_value_error(stop: object) -> None:
    with pytest.raises(ValueError, match="stop"):
        SamplingParams.from_dict({"stop": stop})


def test_tiny_temperatures_are_greedy() -> None:
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=1e-300).greedy
    assert SamplingParams(temperature=9e-6).greedy
    assert not SamplingParams(temperature=1e-5).greedy


# ---- the sampler ---------------------------------------------------------------------------


def _logits(vocab: int = 50, winner: int = 17) -> torch.Tensor:
    """[1, vocab] logits whose most probable token is `winner` (not token 0), with a flat
    enough tail that an unrestricted draw often picks something else."""
    logits = torch.linspace(0.0, 1.0, vocab).flip(0).unsqueeze(0)
    logits[0, winner] = 1.5
    return logits


def _draws(params: SamplingParams, logits: torch.Tensor, count: int = 40) -> list[int]:
    """`count` draws, each with its own seeded generator."""
    tokens = []
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        tokens.append(int(sample(logits, [params], [generator])[0]))
    return tokens


def test_vanishing_top_p_keeps_the_most_probable_token() -> None:
    logits = _logits()
    draws = _draws(SamplingParams(temperature=1.0, top_p=5e-324), logits)
    assert set(draws) == {17}
    # Without the cut-off the same draws do vary: the test would see a wrong nucleus.
    assert len(set(_draws(SamplingParams(temperature=1.0), logits))) > 1
    # Directly: a float32 top_p of 0 leaves exactly the top token finite.
    masked = apply_top_k_top_p(logits, torch.tensor([0]), torch.tensor([5e-324]))
    assert torch.isfinite(masked).nonzero()[:, 1].tolist() == [17]


def test_tiny_temperature_takes_the_argmax() -> None:
    logits = _logits()
    assert set(_draws(SamplingParams(temperature=1e-300), logits)) == {17}


def test_top_k_above_the_vocabulary_keeps_every_token() -> None:
    logits = _logits()
    huge = _draws(SamplingParams(temperature=1.0, top_k=MAX_TOP_K), logits)
    off = _draws(SamplingParams(temperature=1.0, top_k=0), logits)
    assert huge == off
    # and a top_k below the vocabulary does cut: top_k=1 is the argmax.
    assert set(_draws(SamplingParams(temperature=1.0, top_k=1), logits)) == {17}


def test_mixed_batch_with_extreme_values_samples_every_row(
    llama: Path, prompts: list[list[int]], drive: Callable[..., Any]
) -> None:
    """Extreme (but valid) values in one batch: every request finishes, and the top-1 cut-offs
    give the greedy output."""
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    extremes = {
        "greedy": greedy,
        "tiny_p": SamplingParams(max_tokens=6, temperature=1.0, top_p=5e-324, ignore_eos=True),
        "tiny_t": SamplingParams(max_tokens=6, temperature=1e-300, ignore_eos=True),
        "huge_k": SamplingParams(max_tokens=6, top_k=MAX_TOP_K, seed=MAX_SEED, ignore_eos=True),
    }
    results = drive(make_backend(llama), [(rid, prompts[1], p, 1) for rid, p in extremes.items()])
    assert all(len(r.token_ids) == 6 for r in results.values())
    assert results["tiny_p"].token_ids == results["greedy"].token_ids
    assert results["tiny_t"].token_ids == results["greedy"].token_ids
