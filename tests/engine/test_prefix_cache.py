"""Prefix caching: shared, reference-counted, evictable KV blocks. The block manager and the
scheduler without a model (no torch), then the native backend on the tiny Llama, whose greedy
outputs must not change."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.core import kv_cache
from engine.core.kv_cache import BlockManager
from engine.core.scheduler import Scheduler, SchedulerOutput
from engine.core.sequence import Sequence, SequenceStatus
from engine.request import SamplingParams

EOS = 1


def make_seq(seq_id: str, tokens: list[int], priority: int = 1, max_tokens: int = 8) -> Sequence:
    return Sequence(
        seq_id, tokens, SamplingParams(max_tokens=max_tokens, temperature=0.0), priority, 0
    )


def compute(manager: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """What the scheduler does around a step that computes `seq` up to `num_tokens`."""
    manager.grow(seq, num_tokens)
    seq.num_computed_tokens = num_tokens
    manager.register_computed(seq)


def admit(manager: BlockManager, seq: Sequence) -> int:
    """Share `seq`'s cached prefix; return the tokens found cached."""
    cached = manager.match_prefix(seq)
    manager.share(seq, cached)
    seq.num_computed_tokens = len(cached) * manager.block_size
    return seq.num_computed_tokens


# ---- block manager -------------------------------------------------------------------------


def test_full_computed_blocks_are_shared_with_refcounts() -> None:
    manager = BlockManager(num_blocks=8, block_size=4, enable_caching=True)
    a = make_seq("a", list(range(10, 20)))  # 2 full blocks + 2 tokens
    compute(manager, a, 10)
    assert manager.num_cached_blocks == 2  # the partial third block is not cached
    b = make_seq("b", list(range(10, 18)) + [99, 98, 97])
    assert admit(manager, b) == 8
    assert b.block_table == a.block_table[:2]
    assert [manager.ref_count(x) for x in a.block_table] == [2, 2, 1]
    compute(manager, b, b.num_tokens)
    assert b.block_table[2] != a.block_table[2]  # the written tail is its own
    manager.free(a)
    assert [manager.ref_count(x) for x in b.block_table] == [1, 1, 1]
    manager.free(b)
    assert manager.num_free_blocks == 8 and manager.num_cached_blocks == 2


def test_cached_entries_are_out_of_the_garbage_collector_s_sight() -> None:
    # A full cache holds hundreds of thousands of entries; were they tracked, every full
    # collection in the step loop would walk them all.
    import gc

    manager = BlockManager(num_blocks=64, block_size=4, enable_caching=True)
    for i in range(8):
        seq = make_seq(f"s{i}", [100 * i + t for t in range(17)])
        admit(manager, seq)
        compute(manager, seq, 17)
        manager.free(seq)
    assert manager.num_cached_blocks == 32
    # A tuple is untracked in the pass that finds its items untracked: the token tuples in the
    # first collection, the entries holding them in the next.
    gc.collect()
    gc.collect()
    assert not any(gc.is_tracked(entry) for entry in manager._cached.values())


def test_match_leaves_the_last_token_to_compute() -> None:
    manager = BlockManager(num_blocks=8, block_size=4, enable_caching=True)
    a = make_seq("a", list(range(10, 18)))  # exactly two blocks
    compute(manager, a, 8)
    again = make_seq("again", list(range(10, 18)))
    assert admit(manager, again) == 4  # the second block is recomputed for the logits
    single = make_seq("single", list(range(10, 13)))  # shorter than a block
    assert admit(manager, single) == 0


def test_uncomputed_tokens_are_never_cached() -> None:
    manager = BlockManager(num_blocks=8, block_size=4, enable_caching=True)
    a = make_seq("a", list(range(10, 22)))
    manager.grow(a, 12)  # blocks for the whole prompt, but only 6 tokens computed
    a.num_computed_tokens = 6
    manager.register_computed(a)
    assert manager.num_cached_blocks == 1
    b = make_seq("b", list(range(10, 22)))
    assert manager.match_prefix(b) == a.block_table[:1]


def test_generated_tokens_fill_cached_blocks() -> None:
    manager = BlockManager(num_blocks=8, block_size=4, enable_caching=True)
    a = make_seq("a", [5, 6, 7])
    compute(manager, a, 3)
    assert manager.num_cached_blocks == 0
    a.token_ids.append(8)  # sampled, then computed by the next decode step
    compute(manager, a, 4)
    assert manager.num_cached_blocks == 1
    b = make_seq("b", [5, 6, 7, 8, 9])
    assert admit(manager, b) == 4


def test_freed_blocks_are_evicted_lru_tail_first_only_when_needed() -> None:
    manager = BlockManager(num_blocks=4, block_size=4, enable_caching=True)
    a = make_seq("a", list(range(10, 19)))  # blocks A0 A1 full, A2 partial
    compute(manager, a, 9)
    a0, a1, a2 = a.block_table
    manager.free(a)
    assert manager.num_free_blocks == 4 and manager.num_cached_blocks == 2
    # The free block and the uncached A2 go first; the cache survives.
    other = make_seq("other", [1] * 8)
    manager.grow(other, 8)
    assert set(other.block_table) == {a2, 3}
    assert manager.num_cached_blocks == 2 and manager.num_evictions == 0
    # Then the least recently freed cached block: A1 (a sequence's tail goes before its head).
    manager.grow(other, 12)
    assert other.block_table[-1] == a1 and manager.num_evictions == 1
    probe = make_seq("probe", list(range(10, 19)))
    assert manager.match_prefix(probe) == [a0]
    assert manager.num_free_blocks == 1
    assert manager.share_cost([a0]) == 1  # sharing an evictable block takes it from the pool
    admit(manager, probe)
    assert manager.num_free_blocks == 0 and manager.ref_count(a0) == 1
    assert not manager.can_grow(probe, 9)


def test_a_shared_block_is_never_evicted() -> None:
    manager = BlockManager(num_blocks=3, block_size=4, enable_caching=True)
    a = make_seq("a", list(range(10, 19)))
    compute(manager, a, 9)
    b = make_seq("b", list(range(10, 14)) + [50])
    admit(manager, b)  # holds A0 with a
    manager.free(a)  # A1 evictable, A2 free; A0 still held by b
    manager.grow(b, 5)
    manager.grow(b, 8)  # b's second block is the free A2...
    c = make_seq("c", [1] * 4)
    manager.grow(c, 4)  # ...so c evicts A1, never the held A0
    assert manager.ref_count(b.block_table[0]) == 1 and manager.is_cached(b.block_table[0])
    assert len({*b.block_table, *c.block_table}) == 3


def test_hash_collisions_never_share_wrong_contents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_cache, "block_hash", lambda parent, tokens: 42)
    manager = BlockManager(num_blocks=16, block_size=4, enable_caching=True)
    a = make_seq("a", list(range(10, 19)))
    compute(manager, a, 9)  # A0 takes hash 42; A1 collides with it and stays uncached
    assert manager.num_cached_blocks == 1
    b = make_seq("b", list(range(30, 39)))
    assert manager.match_prefix(b) == []  # same hash, other tokens
    compute(manager, b, 9)
    same = make_seq("same", list(range(10, 19)))
    assert manager.match_prefix(same) == a.block_table[:1]


def test_a_hash_blind_to_the_parent_still_never_shares_across_prefixes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kv_cache, "block_hash", lambda parent, tokens: hash(tokens))
    manager = BlockManager(num_blocks=16, block_size=4, enable_caching=True)
    a = make_seq("a", [1, 2, 3, 4, 7, 7, 7, 7, 0])
    compute(manager, a, 9)
    b = make_seq("b", [7, 7, 7, 7, 7, 7, 7, 7, 0])  # its first block's tokens are a's second
    assert manager.match_prefix(b) == []


def test_equal_tokens_after_a_different_prefix_are_not_shared() -> None:
    manager = BlockManager(num_blocks=16, block_size=4, enable_caching=True)
    a = make_seq("a", [1, 2, 3, 4, 7, 7, 7, 7, 0])
    compute(manager, a, 9)
    b = make_seq("b", [5, 6, 7, 8, 7, 7, 7, 7, 0])  # the same second block, another first
    assert manager.match_prefix(b) == []


def test_content_ids_chain_through_a_duplicate_block() -> None:
    """Two sequences that computed the same prefix in the same step: the second copy stays
    private, and the blocks after it still chain to the cached contents."""
    manager = BlockManager(num_blocks=16, block_size=4, enable_caching=True)
    a = make_seq("a", list(range(10, 19)))
    b = make_seq("b", list(range(10, 19)))
    manager.grow(a, 9)
    manager.grow(b, 9)
    for seq in (a, b):
        seq.num_computed_tokens = 9
        manager.register_computed(seq)
    assert a.block_content_ids == b.block_content_ids
    assert manager.num_cached_blocks == 2
    manager.free(a)
    manager.free(b)
    assert manager.num_free_blocks == 16 and manager.num_cached_blocks == 2


def test_disabled_caching_shares_nothing() -> None:
    manager = BlockManager(num_blocks=8, block_size=4, enable_caching=False)
    a = make_seq("a", list(range(10, 19)))
    compute(manager, a, 9)
    assert manager.num_cached_blocks == 0
    assert manager.match_prefix(make_seq("b", list(range(10, 19)))) == []
    manager.free(a)
    assert manager.num_free_blocks == 8


# ---- scheduler -----------------------------------------------------------------------------


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 128,
    enable_caching: bool = True,
) -> Scheduler:
    return Scheduler(
        BlockManager(num_blocks, block_size, enable_caching),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        reserved_high_slots=0,
        max_model_len=max_model_len,
        eos_token_ids=[EOS],
    )


def add(sched: Scheduler, seq_id: str, tokens: list[int], priority: int = 1, **kw: Any) -> Sequence:
    seq = Sequence(
        seq_id,
        tokens,
        SamplingParams(temperature=0.0, **{"max_tokens": 8, **kw}),
        priority,
        sched.next_arrival(),
    )
    sched.add(seq)
    return seq


def step(sched: Scheduler, token: int = 7) -> SchedulerOutput:
    out = sched.schedule()
    sched.postprocess(out, [token] * len(out.sampling_chunks))
    return out


PREFIX = list(range(100, 112))  # three blocks of 4


def test_same_three_block_prefix_schedules_only_the_uncached_tail() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    add(sched, "a", PREFIX + [5, 6])
    while sched.running == [] or sched.running[0].num_computed_tokens < 14:
        step(sched)
    b = add(sched, "b", PREFIX + [7, 8, 9])
    c = add(sched, "c", PREFIX + [10, 11])
    out = step(sched)
    chunks = {ch.seq.seq_id: (ch.start, ch.num_tokens) for ch in out.chunks}
    # The budget of 8 counts computed tokens only: a's decode, b's and c's tails.
    assert chunks == {"a": (14, 1), "b": (12, 3), "c": (12, 2)}
    assert all(ch.samples for ch in out.chunks)
    assert b.block_table[:3] == c.block_table[:3] == sched.seqs["a"].block_table[:3]
    assert sched.prefix_cache_hit_tokens == 24
    assert sched.prefix_cache_query_tokens == 14 + 15 + 14


def test_without_caching_the_whole_prompt_is_computed() -> None:
    sched = make_scheduler(max_num_batched_tokens=8, enable_caching=False)
    add(sched, "a", PREFIX + [5, 6])
    for _ in range(3):
        step(sched)
    add(sched, "b", PREFIX + [7, 8, 9])
    out = step(sched)
    assert {ch.seq.seq_id: (ch.start, ch.num_tokens) for ch in out.chunks} == {
        "a": (15, 1),
        "b": (0, 7),
    }
    assert sched.prefix_cache_hit_tokens == 0


def test_a_batch_arriving_at_once_computes_its_prefix_once() -> None:
    sched = make_scheduler(max_num_batched_tokens=64)
    other = add(sched, "other", [9, 9, 9, 9, 9])  # ahead of them, nothing to share
    seqs = [add(sched, f"q{i}", PREFIX + [i + 20, 30]) for i in range(4)]
    out = step(sched)
    # q0 computes the prefix; the others wait for it rather than compute it again.
    assert {ch.seq.seq_id: (ch.start, ch.num_tokens) for ch in out.chunks} == {
        "other": (0, 5),
        "q0": (0, 14),
    }
    out = step(sched)
    assert {ch.seq.seq_id: (ch.start, ch.num_tokens) for ch in out.chunks} == {
        "other": (5, 1),
        "q0": (14, 1),
        **{f"q{i}": (12, 2) for i in range(1, 4)},
    }
    while sched.has_unfinished():
        step(sched)
    assert all(s.output_token_ids == [7] * 8 for s in [other, *seqs])
    assert sched.prefix_cache_hit_tokens == 3 * 12


def test_a_waiting_sequence_waits_only_for_blocks_it_can_share() -> None:
    sched = make_scheduler(max_num_batched_tokens=64)
    add(sched, "a", PREFIX + [1, 2, 3, 4])
    same = add(sched, "same", PREFIX[:4])  # its only block holds its last token: no wait
    short = add(sched, "short", PREFIX[:5])  # shares a's first block once computed
    out = step(sched)
    assert {ch.seq.seq_id: (ch.start, ch.num_tokens) for ch in out.chunks} == {
        "a": (0, 16),
        "same": (0, 4),
    }
    assert short.status is SequenceStatus.WAITING and same.output_token_ids == [7]
    out = step(sched)
    (chunk,) = [ch for ch in out.chunks if ch.seq is short]
    assert (chunk.start, chunk.num_tokens) == (4, 1)


def test_a_short_common_start_is_not_waited_for() -> None:
    sched = make_scheduler(max_num_batched_tokens=64)
    add(sched, "a", PREFIX + [1, 2, 3, 4])
    add(sched, "b", PREFIX[:4] + list(range(50, 60)))  # would share 4 tokens, compute 10
    out = step(sched)
    assert {ch.seq.seq_id: (ch.start, ch.num_tokens) for ch in out.chunks} == {
        "a": (0, 16),
        "b": (0, 14),
    }


def test_preempted_sequence_resumes_from_its_cached_blocks() -> None:
    sched = make_scheduler(num_blocks=6)
    low = add(sched, "low", list(range(20, 32)))  # three blocks, all computed in one step
    step(sched)
    add(sched, "high", list(range(40, 52)), priority=0, max_tokens=2)
    out = step(sched)
    assert out.preempted == [low] and low.block_table == []
    # high took the three free blocks; its second step evicts low's tail block, not its head.
    while low.status is SequenceStatus.WAITING:
        out = step(sched)
    (chunk,) = [ch for ch in out.chunks if ch.seq is low]
    assert (chunk.start, chunk.num_tokens) == (8, 5)  # 13 tokens, 2 blocks still cached
    while sched.has_unfinished():
        step(sched)
    assert low.output_token_ids == [7] * 8
    assert sched.block_manager.num_free_blocks == 6


def test_abort_of_a_sharing_sequence_keeps_the_others_blocks() -> None:
    sched = make_scheduler()
    a = add(sched, "a", PREFIX + [1], max_tokens=4)
    step(sched)
    b = add(sched, "b", PREFIX + [2], max_tokens=4)
    step(sched)
    shared = a.block_table[:3]
    assert b.block_table[:3] == shared
    sched.abort("a")
    assert [sched.block_manager.ref_count(x) for x in shared] == [1, 1, 1]
    while sched.has_unfinished():
        step(sched)
    assert b.output_token_ids == [7] * 4
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


# ---- random operations against a fake KV cache ---------------------------------------------


def check_invariants(sched: Scheduler) -> None:
    manager = sched.block_manager
    holders: Counter[int] = Counter()
    for seq in sched.running:
        assert len(set(seq.block_table)) == len(seq.block_table)
        assert len(seq.block_content_ids) <= len(seq.block_table)
        holders.update(seq.block_table)
    for seq in sched.waiting:
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    for block in range(manager.num_blocks):
        assert manager.ref_count(block) == holders[block], f"block {block}"
    assert manager.num_free_blocks + len(holders) == manager.num_blocks
    assert manager.num_used_blocks == len(holders)


def fake_run(
    sched: Scheduler, out: SchedulerOutput, kv: dict[tuple[int, int], tuple[int, ...]]
) -> None:
    """Check every chunk reads KV computed for exactly its own prefix, and writes only blocks
    that nothing else holds and the cache does not hold; record what it writes."""
    manager = sched.block_manager
    size = manager.block_size
    for chunk in out.chunks:
        seq, table = chunk.seq, chunk.seq.block_table
        for p in range(chunk.start):
            assert kv.get((table[p // size], p % size)) == tuple(seq.token_ids[: p + 1])
        for p in range(chunk.start, chunk.start + chunk.num_tokens):
            block = table[p // size]
            assert manager.ref_count(block) == 1 and not manager.is_cached(block)
            kv[(block, p % size)] = tuple(seq.token_ids[: p + 1])


@pytest.mark.parametrize("seed", range(12))
def test_random_operations_keep_refcounts_and_contents_right(seed: int) -> None:
    rng = random.Random(seed)
    sched = make_scheduler(
        num_blocks=rng.choice([10, 12, 24]),
        max_num_seqs=rng.choice([3, 4, 6]),
        max_num_batched_tokens=rng.choice([5, 12, 40]),
        max_model_len=40,
    )
    prefixes = [[rng.randrange(2, 6) for _ in range(rng.randrange(0, 14))] for _ in range(3)]
    kv: dict[tuple[int, int], tuple[int, ...]] = {}
    n = 0
    for _ in range(250):
        if rng.random() < 0.3:
            tokens = rng.choice(prefixes) + [
                rng.randrange(2, 6) for _ in range(rng.randrange(1, 8))
            ]
            add(sched, f"s{n}", tokens, priority=rng.randrange(2), max_tokens=rng.randrange(1, 30))
            n += 1
        if rng.random() < 0.05 and sched.seqs:
            sched.abort(rng.choice(sorted(sched.seqs)))
        check_invariants(sched)
        out = sched.schedule()
        check_invariants(sched)
        fake_run(sched, out, kv)
        # A small alphabet, so generated blocks repeat too; EOS now and then.
        sched.postprocess(out, [rng.choice([EOS, 2, 3, 3]) for _ in out.sampling_chunks])
        check_invariants(sched)
    while sched.has_unfinished():
        out = sched.schedule()
        fake_run(sched, out, kv)
        sched.postprocess(out, [3] * len(out.sampling_chunks))
        check_invariants(sched)
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    assert sched.prefix_cache_hit_tokens > 0


# ---- the native backend on the tiny Llama --------------------------------------------------

MAX_TOKENS = 16
HFGreedy = Callable[[Path, list[list[int]], int], list[list[int]]]


def shared_prefix_prompts() -> list[list[int]]:
    """A 41-token prefix (ten blocks of 4 and one token), questions of 1-16 tokens after it,
    one prompt twice, and the bare prefix."""
    rng = random.Random(7)
    prefix = [rng.randrange(4, 1000) for _ in range(41)]
    prompts = [prefix + [rng.randrange(4, 1000) for _ in range(n)] for n in (5, 1, 12, 3, 16, 8)]
    return [*prompts, prompts[2], prefix]


@pytest.mark.parametrize(
    "settings",
    [
        dict(stagger=2),
        dict(stagger=0),  # all at once: later ones wait for the first to compute the prefix
        dict(stagger=1, max_num_batched_tokens=16),  # chunked prefill after the cached part
        # 24 blocks of 4: not enough for the batch, so preemption and eviction happen.
        dict(stagger=0, num_kv_blocks=24, max_num_seqs=4),
    ],
    ids=["staggered", "at_once", "chunked", "small_cache"],
)
def test_greedy_outputs_unchanged_with_shared_prefixes(
    settings: dict[str, Any],
    checkpoint: Callable[[str], Path],
    hf_greedy: HFGreedy,
    drive: Callable[..., Any],
) -> None:
    from engine.backends.native import NativeBackend
    from engine.config import EngineConfig

    path = checkpoint("llama")
    prompts = shared_prefix_prompts()
    expected = hf_greedy(path, prompts, MAX_TOKENS)
    stagger = settings.pop("stagger")
    config = EngineConfig(
        model_path=str(path),
        dtype="float32",
        device="cpu",
        max_model_len=96,
        block_size=4,
        **{"max_num_seqs": 8, **settings},
    )
    backend = NativeBackend(config)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    requests = [(f"r{i}", p, greedy, i % 2) for i, p in enumerate(prompts)]
    results = drive(backend, requests, stagger=stagger)
    for i, want in enumerate(expected):
        assert results[f"r{i}"].token_ids == want, f"prompt {i} differs"
    stats = backend.stats()
    assert stats["prefix_cache_hit_tokens"] > 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    if "num_kv_blocks" in settings:
        assert stats["num_preemptions"] > 0 and stats["kv_blocks_evicted"] > 0


def test_bench_prefix_quick_smoke(tmp_path: Path) -> None:
    """bench/bench_prefix.py end to end on the CPU, at the smallest sizes."""
    import json

    from bench import bench_prefix

    code = bench_prefix.main(
        ["--model", "tiny", "--device", "cpu", "--quick", "--num-requests", "4",
         "--output-tokens", "2", "--reps", "1", "--warmup", "0",
         "--out", str(tmp_path / "out"), "--model-dir", str(tmp_path / "models")]
    )  # fmt: skip
    assert code == 0
    (path,) = (tmp_path / "out").glob("*_w-prefix_tiny.json")
    record = json.loads(path.read_text())
    assert record["workload"] == "W-prefix" and record["ratios"]["vs_no_prefix_caching"] > 0
    assert record["details"]["prefix_caching"]["runs"][0]["prefix_cache_hit_tokens"] > 0
