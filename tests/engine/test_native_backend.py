"""The native backend's contract beyond greedy equality: limits, aborts, errors, stats."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.backends.native import NativeBackend, supports
from engine.config import EngineConfig
from engine.request import (
    EngineError,
    KVCacheTooSmallError,
    PromptTooLongError,
    SamplingParams,
)


def make_backend(path: Path, **overrides: object) -> NativeBackend:
    settings: dict[str, object] = dict(
        dtype="float32", device="cpu", max_model_len=64, max_num_seqs=4, block_size=4
    )
    settings.update(overrides)
    return NativeBackend(EngineConfig(model_path=str(path), **settings))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def llama(checkpoint: Callable[[str], Path]) -> Path:
    return checkpoint("llama")


def test_supports(checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    for variant in ("llama", "qwen2", "mistral"):
        assert supports(checkpoint(variant))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert not supports(tmp_path)
    assert not supports(tmp_path / "missing")


def test_max_model_len_finishes_with_length(llama: Path, drive: Callable[..., Any]) -> None:
    backend = make_backend(llama, max_model_len=40)
    long = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    result = drive(backend, [("r", list(range(10, 40)), long, 1)])["r"]
    assert len(result.token_ids) == 10 and result.finish_reason == "length"
    with pytest.raises(PromptTooLongError):
        backend.add_request("too-long", list(range(10, 50)), long, 1)
    with pytest.raises(EngineError, match="vocabulary"):
        backend.add_request("bad-id", [5, 10**6], long, 1)


def test_abort_frees_cache_and_is_idempotent(llama: Path) -> None:
    backend = make_backend(llama)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    backend.add_request("a", list(range(10, 30)), params, 1)
    backend.add_request("b", list(range(10, 15)), params, 0)
    backend.step()
    stats = backend.stats()
    assert stats["running"] == 2 and stats["kv_blocks_free"] < stats["kv_blocks_total"]
    backend.abort_request("a")
    backend.abort_request("a")
    backend.abort_request("never-added")
    assert backend.stats()["running"] == 1
    backend.abort_request("b")
    stats = backend.stats()
    assert not backend.has_unfinished()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert backend.step() == []


def test_step_outputs_and_stats(llama: Path) -> None:
    backend = make_backend(llama, max_num_batched_tokens=8)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    backend.add_request("r", list(range(10, 30)), params, 1)  # 20 tokens: 3 prefill chunks
    outputs = []
    while backend.has_unfinished():
        outputs += backend.step()
    # The first chunk reports the request scheduled; the second, silent, produces nothing.
    assert [o.scheduled_first_time for o in outputs] == [True, False, False, False]
    assert [len(o.new_token_ids) for o in outputs] == [0, 1, 1, 1]
    assert outputs[-1].finished and outputs[-1].finish_reason == "length"
    stats = backend.stats()
    assert stats["tokens_generated"] == 3 and stats["num_preemptions"] == 0
    assert backend.eos_token_ids >= {backend.tokenizer.eos_token_id}


def test_a_cache_shorter_than_max_model_len_refuses_only_what_cannot_fit(
    llama: Path, drive: Callable[..., Any]
) -> None:
    # 3 blocks of 4 tokens, max_model_len 64: a 5-token prompt with 8 new tokens holds 12
    # tokens in the cache (its last one is never computed), exactly the whole cache.
    backend = make_backend(llama, num_kv_blocks=3)
    fits = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    result = drive(backend, [("fits", list(range(10, 15)), fits, 1)])["fits"]
    assert len(result.token_ids) == 8 and backend.stats()["num_preemptions"] == 0
    too_many = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    with pytest.raises(KVCacheTooSmallError, match="room for 13 tokens.*holds 12 tokens"):
        backend.add_request("too-long", list(range(10, 15)), too_many, 1)
    assert not backend.has_unfinished()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs(llama: Path, dtype: str, drive: Callable[..., Any]) -> None:
    backend = make_backend(llama, dtype=dtype)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    results = drive(
        backend, [("a", list(range(10, 30)), params, 1), ("b", list(range(40, 45)), params, 1)]
    )
    assert all(len(r.token_ids) == 8 for r in results.values())


@pytest.mark.parametrize("case", ["distinct", "shared-prefix", "preempting"])
def test_steps_fitted_to_padded_sizes_give_the_same_tokens(
    llama: Path, drive: Callable[..., Any], case: str
) -> None:
    # On a GPU the scheduler trims a step that lands just above a captured size
    # (Scheduler.step_token_sizes); here the CPU backend is given sizes to fit, and every
    # request must come out as it does without them: with distinct prompts, with prompts
    # sharing cached blocks, and with a cache small enough to preempt.
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    lengths = [5, 14, 9, 21, 3, 17, 11, 26]
    shared = list(range(40, 52)) if case == "shared-prefix" else []
    requests = [(f"r{i}", shared + list(range(10 + i, 10 + i + n)), params, 1)
                for i, n in enumerate(lengths)]
    settings: dict[str, object] = {"max_num_batched_tokens": 32}
    if case == "preempting":
        settings["num_kv_blocks"] = 12
    plain_backend = make_backend(llama, **settings)
    plain = drive(plain_backend, requests)
    fitted = make_backend(llama, **settings)
    sched = fitted.scheduler
    sched.step_token_sizes = [8, 16, 24, 32]
    trims: list[tuple[int, int]] = []
    fit = sched._fit_step_size

    def recording(out: Any, total: int) -> None:
        before = out.num_tokens
        fit(out, total)
        if out.num_tokens != before:
            trims.append((before, out.num_tokens))

    sched._fit_step_size = recording  # type: ignore[method-assign]
    got = drive(fitted, requests)
    assert trims, "no step was trimmed: the test does not exercise the fitting"
    assert all(after in sched.step_token_sizes for _, after in trims)
    assert {k: v.token_ids for k, v in got.items()} == {k: v.token_ids for k, v in plain.items()}
    if case == "shared-prefix":
        assert fitted.stats()["prefix_cache_hit_tokens"] > 0
    if case == "preempting":
        assert fitted.stats()["num_preemptions"] > 0


def test_step_trace_records_every_step(llama: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With TIDEQ_STEP_TRACE set, each step is one line saying what it computed: the prompts'
    tokens as prefill, then a one-token chunk per decode, high chunks counted apart."""
    monkeypatch.setenv("TIDEQ_STEP_TRACE", str(tmp_path / "trace"))
    backend = make_backend(llama, max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    backend.add_request("low", list(range(10, 30)), params, 1)  # 20 tokens: two chunks
    backend.add_request("high", list(range(10, 16)), params, 0)
    steps = 0
    while backend.has_unfinished():
        backend.step()
        steps += 1
    backend.close()
    (path,) = (tmp_path / "trace").iterdir()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    # (the last call only collects the results of the step launched by the one before)
    assert len(lines) == steps - 1
    assert sum(r["prefill"] for r in lines) == 26
    # each sequence samples 5 tokens: the first after its prompt, 4 more after decode chunks
    assert sum(r["decode"] for r in lines) == 2 * 4
    assert sum(r["high"] for r in lines) == 1 + 4
    assert all(r["tokens"] <= 16 and r["ms"] >= 0 for r in lines)
    # the call's time split: scheduling and launching, then waiting for the step before
    assert all(0 <= r["launch_ms"] <= r["ms"] and 0 <= r["wait_ms"] <= r["ms"] for r in lines)
    assert all(r["launch_ms"] + r["wait_ms"] <= r["ms"] + 2e-3 for r in lines)
    assert lines[0]["running"] == 2 and lines[-1]["waiting"] == 0
    assert [r["t"] for r in lines] == sorted(r["t"] for r in lines)
