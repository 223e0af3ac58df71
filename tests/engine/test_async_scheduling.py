"""Async scheduling (engine.config async_scheduling): each step is scheduled and launched
before the one ahead of it has been postprocessed, the tokens it has not seen yet taken from
that step's results. Whatever the batch does, every request gets the tokens it gets with
each step waiting for the one before: preemption, prefix sharing, priorities, EOS met while
the next step already runs, seeded sampling, aborts. The scheduler's side is checked step by
step with no model at all."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.backends.native import NativeBackend
from engine.config import EngineConfig
from engine.core.kv_cache import BlockManager
from engine.core.scheduler import Scheduler
from engine.core.sequence import PLACEHOLDER, Sequence, SequenceStatus
from engine.request import SamplingParams
from tests.engine.conftest import Drive, Submitted, make_prompts

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def make_backend(path: Path, async_scheduling: bool, **overrides: Any) -> NativeBackend:
    settings: dict[str, Any] = dict(dtype="float32", device="cpu", max_model_len=128,
                                    max_num_seqs=6, block_size=4, max_num_batched_tokens=48)
    settings.update(overrides)
    return NativeBackend(EngineConfig(model_path=str(path), async_scheduling=async_scheduling,
                                      **settings))


def count_device_inputs(backend: NativeBackend) -> list[int]:
    """Counts, in a list's one entry, the chunks launched with a token of the step before."""
    seen = [0]
    launch = backend.runner.launch

    def counting(out: Any, prev: Any = None) -> Any:
        seen[0] += sum(c.input_from is not None for c in out.chunks)
        return launch(out, prev)

    backend.runner.launch = counting  # type: ignore[method-assign]
    return seen


def both_ways(path: Path, drive: Drive, requests: list[Submitted], stagger: int = 1,
              setup: Callable[[NativeBackend], None] | None = None,
              **overrides: Any) -> tuple[dict[str, Any], dict[str, Any], NativeBackend]:
    results = []
    backends = []
    for mode in (False, True):
        backend = make_backend(path, mode, **overrides)
        if setup is not None:
            setup(backend)
        seen = count_device_inputs(backend)
        results.append(drive(backend, requests, stagger=stagger))
        backends.append(backend)
        # only async scheduling hands steps tokens the host has not seen
        assert (seen[0] > 0) is mode, (mode, seen[0])
    return results[0], results[1], backends[1]


@pytest.fixture(scope="module")
def llama(checkpoint: Callable[[str], Path]) -> Path:
    return checkpoint("llama")


def requests_of(prompts: list[list[int]], sampling: SamplingParams = GREEDY,
                priorities: list[int] | None = None) -> list[Submitted]:
    return [(f"r{i}", p, sampling, (priorities or [1] * len(prompts))[i])
            for i, p in enumerate(prompts)]


def test_same_tokens_as_waiting_for_each_step(llama: Path, drive: Drive) -> None:
    requests = requests_of(make_prompts(8, [3, 17, 40, 9, 30, 25], seed=1))
    sync, overlapped, _ = both_ways(llama, drive, requests, stagger=2)
    assert overlapped == sync
    assert all(len(r.token_ids) == 12 and r.finish_reason == "length" for r in sync.values())


def test_same_tokens_under_preemption_and_prefix_sharing(llama: Path, drive: Drive) -> None:
    shared = make_prompts(1, [24], seed=2)[0]
    prompts = [shared + tail for tail in make_prompts(6, [5, 9, 2], seed=3)]
    requests = requests_of(prompts, priorities=[1, 1, 0, 1, 0, 1])
    sync, overlapped, backend = both_ways(llama, drive, requests, stagger=1, num_kv_blocks=30)
    assert overlapped == sync
    stats = backend.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hit_tokens"] > 0


def test_same_tokens_with_a_fast_lane_for_high_work(llama: Path, drive: Drive) -> None:
    prompts = make_prompts(8, [20, 33, 7], seed=4)
    requests = requests_of(prompts, priorities=[1, 1, 1, 0, 1, 1, 0, 1])
    sync, overlapped, _ = both_ways(llama, drive, requests, stagger=1, reserved_high_slots=1,
                                    low_seqs_while_high=2, low_tokens_while_high=8)
    assert overlapped == sync


def test_eos_met_while_the_next_step_runs(llama: Path, drive: Drive) -> None:
    """A request finishes on EOS in a step after which the next one was already launched
    with it: its token there is dropped, its blocks freed, and nothing follows its EOS."""
    prompts = make_prompts(4, [11, 6, 19, 8], seed=5)
    sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=False)
    requests = requests_of(prompts, sampling)
    # the 4th token r0 produces (greedily) is made an EOS token
    probe = drive(make_backend(llama, False), requests_of(prompts))
    eos = probe["r0"].token_ids[3]

    def with_eos(backend: NativeBackend) -> None:
        backend.scheduler.eos_token_ids = frozenset({eos})

    sync, overlapped, backend = both_ways(llama, drive, requests, setup=with_eos)
    assert overlapped == sync
    assert sync["r0"].finish_reason == "stop" and sync["r0"].token_ids[-1] == eos
    assert len(sync["r0"].token_ids) <= 4
    assert backend.stats()["kv_blocks_free"] == backend.stats()["kv_blocks_total"]


def test_same_tokens_when_seeded_sampling(llama: Path, drive: Drive) -> None:
    """A seeded request's draws depend on its output positions only, which async scheduling
    must count the same way (placeholders are not outputs yet)."""
    seeded = SamplingParams(max_tokens=10, temperature=1.5, seed=7, ignore_eos=True)
    requests = requests_of(make_prompts(5, [12, 5, 21], seed=6), seeded)
    sync, overlapped, _ = both_ways(llama, drive, requests, stagger=1)
    assert overlapped == sync


def test_abort_while_a_step_runs(llama: Path) -> None:
    backend = make_backend(llama, True)
    a, b = make_prompts(2, [10, 14], seed=8)
    backend.add_request("a", a, GREEDY, 1)
    backend.add_request("b", b, GREEDY, 1)
    backend.step()  # launched; its results come with the next call
    backend.abort_request("a")
    produced: dict[str, list[int]] = {"a": [], "b": []}
    while backend.has_unfinished():
        for out in backend.step():
            produced[out.request_id].extend(out.new_token_ids)
    assert produced["a"] == [] and len(produced["b"]) == 12
    stats = backend.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


# ---- the scheduler alone ---------------------------------------------------------------


def scheduler(num_blocks: int = 64, eos: int = 99, **kwargs: Any) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, 4, True), max_num_seqs=8,
                     max_num_batched_tokens=64, reserved_high_slots=0, max_model_len=64,
                     eos_token_ids=[eos], **kwargs)


def add(s: Scheduler, seq_id: str, prompt: list[int], max_tokens: int = 5,
        priority: int = 1, ignore_eos: bool = False) -> Sequence:
    seq = Sequence(seq_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                  ignore_eos=ignore_eos),
                   priority, s.next_arrival())
    s.add(seq)
    return seq


def test_a_step_scheduled_ahead_takes_the_tokens_it_has_not_seen() -> None:
    s = scheduler()
    a = add(s, "a", [5, 6, 7])
    b = add(s, "b", [8, 9])
    first = s.schedule()  # both prompts
    assert a.token_ids[-1] == PLACEHOLDER and b.token_ids[-1] == PLACEHOLDER
    second = s.schedule()  # before the first's tokens are known
    assert [(c.seq.seq_id, c.start, c.num_tokens, c.input_from) for c in second.chunks] == [
        ("a", 3, 1, 0), ("b", 2, 1, 1)]
    outputs = s.postprocess(first, [40, 41])
    assert [o.new_token_ids for o in outputs] == [[40], [41]]
    assert a.token_ids == [5, 6, 7, 40, PLACEHOLDER]
    s.postprocess(second, [42, 43])
    assert a.token_ids == [5, 6, 7, 40, 42] and a.num_pending == 0


def test_eos_drops_the_next_steps_token_and_length_is_known_ahead() -> None:
    s = scheduler(eos=99)
    a = add(s, "a", [5, 6, 7], max_tokens=5)
    add(s, "b", [8, 9], max_tokens=2)
    first = s.schedule()
    second = s.schedule()
    outs = s.postprocess(first, [99, 50])  # a meets EOS; b has one token to go
    assert outs[0].finished and outs[0].finish_reason == "stop"
    assert a.status is SequenceStatus.FINISHED and a.token_ids == [5, 6, 7, 99]
    third = s.schedule()
    # b's second token (sampled by `second`) is its last: it is not scheduled again
    assert third.is_empty
    outs = s.postprocess(second, [60, 61])  # a's token from `second` is dropped
    assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in outs] == [
        ("b", [61], "length")]
    assert not s.has_unfinished()
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_a_sequence_preempted_before_its_token_is_known_waits_for_it() -> None:
    """A low sequence preempted by a high one while its last token is still on the device is
    not re-admitted before postprocess has written that token in."""
    s = scheduler(num_blocks=4)
    low = add(s, "low", list(range(10, 17)), max_tokens=8)  # 7 tokens: 2 blocks
    first = s.schedule()
    high = add(s, "high", list(range(20, 29)), priority=0)  # 9 tokens: 3 blocks
    second = s.schedule()
    assert low.status is SequenceStatus.WAITING and low.num_pending == 1
    assert [c.seq for c in second.chunks] == [high]
    third = s.schedule()  # high decodes; low may not come back yet
    assert [c.seq for c in third.chunks] == [high]
    s.postprocess(first, [70])
    assert low.token_ids[-1] == 70 and low.num_pending == 0
