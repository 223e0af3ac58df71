"""Faults through the whole engine (front and native backend, tiny Llama on the CPU): a request
that breaks a step fails alone, out-of-memory steps are retried, a request too large for the
KV cache is refused alone, a cache too small for the batch preempts; and the other requests'
greedy outputs are those of an undisturbed run."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.backends.native import NativeBackend
from engine.config import EngineConfig
from engine.core.scheduler import SchedulerOutput
from engine.engine import Engine
from engine.request import (
    EngineError,
    EngineOutOfMemoryError,
    KVCacheTooSmallError,
    Request,
    SamplingParams,
)

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def engine_config(path: Path, **overrides: Any) -> EngineConfig:
    settings: dict[str, Any] = dict(
        dtype="float32", device="cpu", max_model_len=64, max_num_seqs=8, block_size=4,
        backend="native",
    )
    settings.update(overrides)
    return EngineConfig(model_path=str(path), **settings)


class FaultyBackend(NativeBackend):
    """The native backend, whose steps raise `error(request_id)` while they run a marked
    request that has produced at least `from_token` tokens, `times` times (None: always)."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.marked: set[str] = set()
        self.from_token = 0
        self.times: int | None = None
        self.error: Callable[[str], Exception] = lambda rid: RuntimeError(f"poisoned {rid}")
        self.raised = 0
        launch = self.runner.launch

        def guarded(out: SchedulerOutput, prev: Any = None) -> Any:
            for chunk in out.chunks:
                seq = chunk.seq
                if (
                    seq.seq_id in self.marked
                    # tokens produced: those sampled by steps still running do not count
                    and seq.num_output_tokens - seq.num_pending >= self.from_token
                    and (self.times is None or self.raised < self.times)
                ):
                    self.raised += 1
                    raise self.error(seq.seq_id)
            return launch(out, prev)

        self.runner.launch = guarded  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def llama(checkpoint: Callable[[str], Path]) -> Path:
    return checkpoint("llama")


@pytest.fixture
def faulty(llama: Path) -> Iterator[tuple[Engine, FaultyBackend]]:
    config = engine_config(llama)
    backend = FaultyBackend(config)
    engine = Engine(config, backend=backend)
    yield engine, backend
    engine.shutdown()


def requests(count: int, sampling: SamplingParams = GREEDY) -> list[Request]:
    """r0, r1, ...: prompts of mixed lengths (shorter and longer than a block)."""
    rng = random.Random(3)
    lengths = [5, 17, 9, 26, 3]
    return [
        Request(
            f"r{i}",
            prompt_token_ids=[rng.randrange(4, 1000) for _ in range(lengths[i % len(lengths)])],
            sampling=sampling,
        )
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def clean_tokens(llama: Path) -> dict[str, list[int]]:
    """Every request's greedy tokens from an undisturbed engine."""
    engine = Engine(engine_config(llama))
    try:
        return {c.request_id: c.token_ids for c in engine.generate(requests(8))}
    finally:
        engine.shutdown()


def submit_all(engine: Engine, batch: list[Request]) -> dict[str, Any]:
    return {r.request_id: engine.submit(r) for r in batch}


def test_a_request_that_breaks_its_step_fails_alone(
    faulty: tuple[Engine, FaultyBackend], clean_tokens: dict[str, list[int]]
) -> None:
    engine, backend = faulty
    backend.marked = {"r3"}
    futures = submit_all(engine, requests(6))
    with pytest.raises(EngineError, match="request r3: engine step failed: RuntimeError: poisoned"):
        futures.pop("r3").result(60)
    for rid, future in futures.items():
        completion = future.result(60)
        assert completion.token_ids == clean_tokens[rid], rid
        assert completion.completion_tokens == GREEDY.max_tokens
    stats = engine.stats()
    assert stats["failed"] == 1 and stats["step_errors"] >= 1
    assert stats["running"] == stats["waiting"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_a_late_failure_fails_its_request_after_three_steps_and_serving_goes_on(
    faulty: tuple[Engine, FaultyBackend], clean_tokens: dict[str, list[int]]
) -> None:
    """A failure from the request's 4th token on: its one-step probe passes, so it fails on
    its third failed step, not in an endless retry."""
    engine, backend = faulty
    backend.marked = {"r1"}
    backend.from_token = 3
    batch = requests(2)
    with pytest.raises(EngineError, match="request r1: 3 engine steps failed.*poisoned r1"):
        engine.submit(batch[1]).result(60)
    assert backend.raised == 3 and engine.stats()["step_errors"] == 3
    assert engine.submit(batch[0]).result(60).token_ids == clean_tokens["r0"]


def test_out_of_memory_once_is_retried(
    faulty: tuple[Engine, FaultyBackend], clean_tokens: dict[str, list[int]]
) -> None:
    engine, backend = faulty
    backend.marked = {f"r{i}" for i in range(6)}
    backend.from_token = 2  # mid-decode, when the batch has tokens to lose
    backend.times = 1
    backend.error = lambda rid: torch.OutOfMemoryError("CUDA out of memory (simulated)")
    futures = submit_all(engine, requests(6))
    for rid, future in futures.items():
        assert future.result(60).token_ids == clean_tokens[rid], rid
    assert engine.stats()["out_of_memory"] == 1 and engine.stats()["failed"] == 0


def test_out_of_memory_again_fails_with_advice_then_serving_goes_on(
    faulty: tuple[Engine, FaultyBackend], clean_tokens: dict[str, list[int]]
) -> None:
    engine, backend = faulty
    batch = requests(3)
    backend.marked = {"r0", "r1"}
    backend.error = lambda rid: torch.OutOfMemoryError("CUDA out of memory (simulated)")
    futures = submit_all(engine, batch[:2])
    for future in futures.values():
        with pytest.raises(EngineOutOfMemoryError, match="batch_size_per_gpu.*gpus_per_worker"):
            future.result(60)
    assert engine.stats()["out_of_memory"] == 2
    assert engine.submit(batch[2]).result(60).token_ids == clean_tokens["r2"]


def test_a_request_too_large_for_the_kv_cache_fails_alone(
    llama: Path, clean_tokens: dict[str, list[int]]
) -> None:
    # 8 blocks of 4 = 32 tokens of cache, less than max_model_len (64).
    engine = Engine(engine_config(llama, num_kv_blocks=8))
    try:
        batch = requests(2)  # prompts of 5 and 17 tokens, 12 new: 16 and 28 tokens
        prompt = batch[1].prompt_token_ids or []
        sixteen = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        fits = Request("big", prompt_token_ids=prompt, sampling=sixteen)  # 17 + 16 - 1 = 32
        larger = Request("bigger", prompt_token_ids=[*prompt, 5], sampling=sixteen)  # 33
        futures = submit_all(engine, [batch[0], fits, larger, batch[1]])
        with pytest.raises(KVCacheTooSmallError, match="room for 33 tokens.*holds 32 tokens"):
            futures["bigger"].result(60)
        assert futures["big"].result(60).completion_tokens == 16
        for rid in ("r0", "r1"):
            assert futures[rid].result(60).token_ids == clean_tokens[rid]
    finally:
        engine.shutdown()


def test_a_kv_cache_too_small_for_the_batch_preempts_and_outputs_are_unchanged(
    llama: Path, clean_tokens: dict[str, list[int]]
) -> None:
    # The longest request holds 26 + 12 - 1 = 37 tokens: 10 blocks of 4; the cache has 12.
    engine = Engine(engine_config(llama, num_kv_blocks=12))
    try:
        completions = engine.generate(requests(8))
        stats = engine.stats()
    finally:
        engine.shutdown()
    assert {c.request_id: c.token_ids for c in completions} == clean_tokens
    assert stats["num_preemptions"] > 0 and stats["failed"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] == 12


def _real_out_of_memory(request_id: str) -> Exception:
    """A genuine torch.OutOfMemoryError from the CUDA allocator (a petabyte asked for)."""
    try:
        torch.empty(1 << 50, dtype=torch.uint8, device="cuda")
    except torch.OutOfMemoryError as err:
        return err
    raise AssertionError("a petabyte was allocated")


@pytest.mark.gpu
def test_recovery_on_the_gpu_keeps_graph_decoding_outputs(llama: Path) -> None:
    """With CUDA graphs and the decode lookahead: a real out-of-memory error mid-decode, then a
    request that breaks its steps; the other requests' outputs are an undisturbed run's."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    config = engine_config(llama, device="cuda")
    clean_engine = Engine(config)
    try:
        clean = {c.request_id: c.token_ids for c in clean_engine.generate(requests(6))}
    finally:
        clean_engine.shutdown()
    backend = FaultyBackend(config)
    assert backend.runner.graphs is not None
    engine = Engine(config, backend=backend)
    try:
        backend.marked = {f"r{i}" for i in range(6)}
        backend.from_token, backend.times, backend.error = 3, 1, _real_out_of_memory
        futures = submit_all(engine, requests(6))
        assert {rid: f.result(120).token_ids for rid, f in futures.items()} == clean
        assert engine.stats()["out_of_memory"] == 1

        backend.marked, backend.from_token, backend.times = {"r2"}, 0, None
        backend.error = lambda rid: RuntimeError(f"poisoned {rid}")
        futures = submit_all(engine, requests(6))
        with pytest.raises(EngineError, match="request r2: engine step failed"):
            futures.pop("r2").result(120)
        assert {rid: f.result(120).token_ids for rid, f in futures.items()} == {
            rid: tokens for rid, tokens in clean.items() if rid != "r2"
        }
        assert engine.is_alive()
    finally:
        engine.shutdown()
