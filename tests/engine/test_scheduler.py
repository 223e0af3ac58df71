"""Scheduler logic without a model: admission, chunking, priorities, preemption. No torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.core.kv_cache import BlockManager
from engine.core.scheduler import Scheduler, SchedulerOutput
from engine.core.sequence import Sequence, SequenceStatus
from engine.request import KVCacheTooSmallError, SamplingParams

EOS = 1
TOKEN = 7  # any non-EOS token the fake model "samples"


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    reserved_high_slots: int = 0,
    max_model_len: int = 128,
    low_seqs_while_high: int | None = None,
    low_tokens_while_high: int | None = None,
    step_token_sizes: list[int] | None = None,
    lane_linger_steps: int = 0,
) -> Scheduler:
    return Scheduler(
        BlockManager(num_blocks, block_size),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        reserved_high_slots=reserved_high_slots,
        max_model_len=max_model_len,
        eos_token_ids=[EOS],
        low_seqs_while_high=low_seqs_while_high,
        low_tokens_while_high=low_tokens_while_high,
        step_token_sizes=step_token_sizes,
        lane_linger_steps=lane_linger_steps,
    )


def add(
    sched: Scheduler,
    seq_id: str,
    prompt_len: int,
    priority: int = 1,
    max_tokens: int = 16,
    ignore_eos: bool = False,
) -> Sequence:
    seq = Sequence(
        seq_id,
        list(range(2, 2 + prompt_len)),
        SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos),
        priority,
        sched.next_arrival(),
    )
    sched.add(seq)
    return seq


def step(sched: Scheduler, token: int = TOKEN) -> SchedulerOutput:
    out = sched.schedule()
    sched.postprocess(out, [token] * len(out.sampling_chunks))
    return out


def scheduled(out: SchedulerOutput) -> dict[str, int]:
    return {c.seq.seq_id: c.num_tokens for c in out.chunks}


def test_imports_no_torch() -> None:
    code = "import sys, engine.core.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_admission_within_token_budget_and_chunking() -> None:
    sched = make_scheduler(max_num_batched_tokens=10)
    add(sched, "a", 6)
    add(sched, "b", 7)
    out = step(sched)
    # a fits whole; b gets the 4 tokens left and continues next step.
    assert scheduled(out) == {"a": 6, "b": 4}
    assert out.num_tokens == 10
    assert [c.seq.seq_id for c in out.sampling_chunks] == ["a"]
    out = step(sched)
    # a decodes one token, b finishes its prompt and samples.
    assert scheduled(out) == {"a": 1, "b": 3}
    assert {c.seq.seq_id for c in out.sampling_chunks} == {"a", "b"}


def test_long_prompt_prefilled_in_chunks() -> None:
    sched = make_scheduler(max_num_batched_tokens=8)
    seq = add(sched, "long", 30, max_tokens=2)
    sizes = []
    while sched.has_unfinished():
        sizes.append(scheduled(step(sched))["long"])
    assert sizes == [8, 8, 8, 6, 1]
    assert seq.output_token_ids == [TOKEN, TOKEN]
    assert seq.finish_reason == "length"
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_max_num_seqs_and_retire_at_once() -> None:
    sched = make_scheduler(max_num_seqs=2)
    add(sched, "a", 3, max_tokens=1)
    add(sched, "b", 3, max_tokens=5)
    add(sched, "c", 3)
    out = step(sched)
    assert set(scheduled(out)) == {"a", "b"}
    # a finished with its first token, so c is admitted the very next step.
    out = step(sched)
    assert set(scheduled(out)) == {"b", "c"}


def test_priority_order_in_admission() -> None:
    sched = make_scheduler(max_num_seqs=2)
    add(sched, "low1", 3, priority=1)
    add(sched, "low2", 3, priority=1)
    add(sched, "high", 3, priority=0)
    out = step(sched)
    assert [c.seq.seq_id for c in out.chunks] == ["high", "low1"]


def test_reserved_high_slots() -> None:
    sched = make_scheduler(max_num_seqs=3, reserved_high_slots=1)
    for i in range(4):
        add(sched, f"low{i}", 3)
    out = step(sched)
    assert set(scheduled(out)) == {"low0", "low1"}  # the third slot is held for high work
    add(sched, "high", 3, priority=0)
    out = step(sched)
    assert set(scheduled(out)) == {"low0", "low1", "high"}
    assert [s.seq_id for s in sched.waiting] == ["low2", "low3"]


def test_admission_is_possible_only_where_the_head_has_a_slot() -> None:
    # The runner launches a decode step ahead only when the next batch cannot change.
    sched = make_scheduler(max_num_seqs=3, reserved_high_slots=1, max_num_batched_tokens=3)
    for i in range(3):
        add(sched, f"low{i}", 3)
    out = step(sched)
    assert scheduled(out) == {"low0": 3}
    assert out.admission_possible  # the budget is spent, and low1 has a low slot
    out = step(sched)
    assert scheduled(out) == {"low0": 1, "low1": 2}
    assert not out.admission_possible  # only the slot held for high work is free
    add(sched, "high", 3, priority=0)
    assert sched.schedule().admission_possible is False  # high took the last slot

def test_admission_is_not_possible_while_the_running_low_work_spends_the_lane() -> None:
    # With high work present, running low sequences take the fast lane first; a low head
    # behind them cannot be admitted next step, so that step may be launched ahead.
    sched = make_scheduler(max_num_seqs=8, low_seqs_while_high=2)
    for i in range(2):
        add(sched, f"low{i}", 3, max_tokens=30)
    step(sched)
    add(sched, "high", 3, priority=0, max_tokens=30)
    add(sched, "low2", 3, max_tokens=30)
    step(sched)  # the high prompt
    out = step(sched)
    assert sorted(scheduled_ids(out)) == ["high", "low0", "low1"]
    assert [s.seq_id for s in sched.waiting] == ["low2"]  # it has a slot, not the lane
    assert out.admission_possible is False
    # Once a lane place is free, the low head may be admitted again.
    sched.abort("low1")
    out = step(sched)
    assert sorted(scheduled_ids(out)) == ["high", "low0", "low2"]


def decoding(sched: Scheduler, ids: list[str], priority: int = 1) -> None:
    """Sequences `ids` running, each past its one-token prompt's prefill."""
    for seq_id in ids:
        add(sched, seq_id, 1, priority=priority, max_tokens=30)
    step(sched)


def test_a_step_just_over_a_padded_size_gives_its_excess_to_the_next_step() -> None:
    # Padded sizes 8, 16, 24, 32: three decode rows and a 14-token prompt make 17 tokens,
    # padded to 24; the prompt's chunk gives one token back and the step is exactly 16.
    sched = make_scheduler(step_token_sizes=[8, 16, 24, 32])
    decoding(sched, ["d0", "d1", "d2"])
    prompt = add(sched, "p", 14, max_tokens=4)
    out = step(sched)
    assert scheduled(out) == {"d0": 1, "d1": 1, "d2": 1, "p": 13}
    assert out.num_tokens == 16
    assert [c.seq.seq_id for c in out.sampling_chunks] == ["d0", "d1", "d2"]
    assert prompt.num_computed_tokens == 13 and prompt.num_output_tokens == 0
    out = step(sched)  # the prompt's last token, below the smallest size: nothing to fit
    assert scheduled(out)["p"] == 1 and out.num_tokens == 4
    assert prompt.num_computed_tokens == 14 and prompt.token_ids[14:] == [TOKEN]


def test_a_step_keeps_its_tokens_where_the_padding_is_smaller() -> None:
    # 3 + 20 = 23 tokens: padded to 24 costs one token, trimming to 16 would defer seven.
    sched = make_scheduler(step_token_sizes=[8, 16, 24, 32])
    decoding(sched, ["d0", "d1", "d2"])
    add(sched, "p", 20, max_tokens=4)
    out = step(sched)
    assert scheduled(out)["p"] == 20 and out.num_tokens == 23
    # Without padded sizes (eager steps on the CPU) nothing is ever trimmed.
    sched = make_scheduler()
    decoding(sched, ["d0", "d1", "d2"])
    add(sched, "p", 14, max_tokens=4)
    assert step(sched).num_tokens == 17


def test_a_high_prompt_is_never_cut_to_fit() -> None:
    sched = make_scheduler(step_token_sizes=[8, 16, 24, 32])
    decoding(sched, ["d0", "d1", "d2"])
    add(sched, "high", 14, priority=0, max_tokens=4)
    out = step(sched)
    assert scheduled(out)["high"] == 14 and out.num_tokens == 17
    assert "high" in [c.seq.seq_id for c in out.sampling_chunks]


def test_the_fast_lane_step_fits_its_padded_size() -> None:
    # The W-priority shape: the lane's 64 low sequences (63 decoding, one prefilling) and
    # 512 low tokens, and one high row; the captured sizes run every 64 up to 512, then 768.
    # 63 + 449 + 1 = 513 tokens would be padded to 768; the prompt's chunk gives one back.
    sizes = [*range(64, 513, 64), 768, 1024]
    sched = make_scheduler(num_blocks=4096, block_size=16, max_num_seqs=128,
                           max_num_batched_tokens=1024, max_model_len=1024,
                           low_seqs_while_high=64, low_tokens_while_high=512,
                           step_token_sizes=sizes)
    decoding(sched, [f"low{i}" for i in range(63)])
    add(sched, "high", 1, priority=0, max_tokens=30)
    step(sched)
    add(sched, "prompt", 600, max_tokens=4)
    out = step(sched)
    assert out.num_tokens == 512
    assert scheduled(out)["prompt"] == 448 and scheduled(out)["high"] == 1


def test_eos_and_max_tokens_and_max_model_len() -> None:
    sched = make_scheduler(max_model_len=6)
    eos = add(sched, "eos", 3)
    ignore = add(sched, "ignore", 2, max_tokens=2, ignore_eos=True)
    fills = add(sched, "fills", 4, ignore_eos=True)
    step(sched, token=EOS)
    assert eos.finish_reason == "stop" and eos.output_token_ids == [EOS]
    assert not ignore.is_finished
    step(sched, token=EOS)
    assert ignore.finish_reason == "length" and ignore.output_token_ids == [EOS, EOS]
    assert fills.finish_reason == "length" and fills.num_tokens == 6
    assert not sched.has_unfinished()


def test_preempts_newest_lowest_priority() -> None:
    # 8 blocks of 4 tokens: three growing sequences fit 2 blocks each, not 3.
    sched = make_scheduler(num_blocks=8, block_size=4, max_model_len=32)
    old_low = add(sched, "old_low", 4, max_tokens=12)
    high = add(sched, "high", 4, priority=0, max_tokens=12)
    new_low = add(sched, "new_low", 4, max_tokens=12)
    out = step(sched)
    assert set(scheduled(out)) == {"old_low", "high", "new_low"}
    while not out.preempted:
        out = step(sched)
    assert [s.seq_id for s in out.preempted] == ["new_low"]
    assert high.status is SequenceStatus.RUNNING and old_low.status is SequenceStatus.RUNNING
    assert new_low.num_computed_tokens == 0 and new_low.block_table == []
    assert new_low.output_token_ids == [TOKEN] * 5  # output kept across preemption
    assert sched.num_preemptions == 1
    # It resumes once there is room, recomputing prompt + output, and loses nothing.
    while sched.has_unfinished():
        step(sched)
    for seq in (old_low, high, new_low):
        assert seq.output_token_ids == [TOKEN] * 12
    assert sched.block_manager.num_free_blocks == 8


def test_admission_leaves_running_sequences_room_to_grow() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    add(sched, "a", 3, max_tokens=8)
    step(sched)
    add(sched, "b", 12, max_tokens=4)  # would take the 3 free blocks...
    out = step(sched)  # ...that a, filling its first block now, needs one of next step
    assert set(scheduled(out)) == {"a"} and not out.preempted
    assert [s.seq_id for s in sched.waiting] == ["b"]


def test_a_sequence_larger_than_the_whole_cache_is_refused() -> None:
    # 4 blocks of 4: a 5-token prompt with 12 new tokens holds 16 in the cache (the last
    # token is never computed); with 13 it would need a fifth block, which no preemption frees.
    sched = make_scheduler(num_blocks=4, block_size=4)
    with pytest.raises(KVCacheTooSmallError, match=r"room for 17 tokens.*holds 16 tokens"):
        add(sched, "big", 5, max_tokens=13, ignore_eos=True)
    assert not sched.has_unfinished() and "big" not in sched.seqs
    # max_model_len caps what max_tokens may ask for.
    capped = make_scheduler(num_blocks=4, block_size=4, max_model_len=17)
    add(capped, "capped", 5, max_tokens=10**6, ignore_eos=True)


def test_a_sequence_filling_the_whole_cache_finishes_without_preempting_itself() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=3)
    seq = add(sched, "fills", 5, max_tokens=12, ignore_eos=True)
    steps = 0
    while sched.has_unfinished():
        step(sched)
        steps += 1
        assert steps < 50, "livelock"
    assert seq.output_token_ids == [TOKEN] * 12 and sched.num_preemptions == 0
    # With a second sequence it is preempted (it is the newer) and still finishes.
    sched = make_scheduler(num_blocks=4, block_size=4)
    first = add(sched, "first", 5, max_tokens=8, ignore_eos=True)
    second = add(sched, "second", 5, max_tokens=12, ignore_eos=True)
    while sched.has_unfinished():
        step(sched)
        steps += 1
        assert steps < 200, "livelock"
    assert sched.num_preemptions > 0
    assert first.output_token_ids == [TOKEN] * 8 and second.output_token_ids == [TOKEN] * 12


def test_waiting_high_preempts_running_low_for_blocks() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4)
    low = add(sched, "low", 12, max_tokens=4)
    step(sched)
    # Three blocks of prompt, and the fourth its first output token needs, taken a step
    # early (for the decode lookahead).
    assert len(low.block_table) == 4 and sched.block_manager.num_free_blocks == 0
    add(sched, "high", 8, priority=0, max_tokens=2)
    out = step(sched)
    assert [s.seq_id for s in out.preempted] == ["low"]
    assert set(scheduled(out)) == {"high"}
    assert low.status is SequenceStatus.WAITING


def test_next_block_taken_one_step_early_only_at_a_block_boundary() -> None:
    sched = make_scheduler(num_blocks=8, block_size=4)
    seq = add(sched, "a", 6, max_tokens=8)
    tables = []
    for _ in range(6):
        step(sched)
        tables.append(len(seq.block_table))
    # Tokens computed after each step: 6, 7, 8, 9, 10, 11. The block for position 8 comes
    # with the step that computes position 7 (whose token lands at 8): one step before the
    # step that computes position 8, and no earlier.
    assert tables == [2, 2, 3, 3, 3, 3]


def test_no_starvation_of_low_fifo() -> None:
    sched = make_scheduler(max_num_seqs=1)
    add(sched, "low_a", 2, max_tokens=2)
    add(sched, "low_b", 2, max_tokens=2)
    add(sched, "high", 2, priority=0, max_tokens=2)
    order = []
    while sched.has_unfinished():
        for chunk in step(sched).chunks:
            if chunk.first_time:
                order.append(chunk.seq.seq_id)
    assert order == ["high", "low_a", "low_b"]


def test_abort_frees_blocks_and_is_idempotent() -> None:
    sched = make_scheduler()
    add(sched, "a", 9)
    add(sched, "b", 3)
    step(sched)
    assert sched.abort("a") is not None
    assert sched.abort("a") is None
    assert sched.abort("unknown") is None
    assert [s.seq_id for s in sched.running] == ["b"]
    sched.abort("b")
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_duplicate_request_id_rejected() -> None:
    sched = make_scheduler()
    add(sched, "a", 3)
    with pytest.raises(ValueError, match="already queued"):
        add(sched, "a", 3)


def test_first_time_reported_once_for_chunked_prompt() -> None:
    sched = make_scheduler(max_num_batched_tokens=4)
    add(sched, "a", 10, max_tokens=1)
    results = []
    while sched.has_unfinished():
        out = sched.schedule()
        results += sched.postprocess(out, [TOKEN] * len(out.sampling_chunks))
    assert [r.scheduled_first_time for r in results] == [True, False]
    assert results[0].new_token_ids == [] and results[-1].new_token_ids == [TOKEN]
    assert results[-1].finished and results[-1].finish_reason == "length"


def scheduled_ids(out: SchedulerOutput) -> list[str]:
    return [c.seq.seq_id for c in out.chunks]


def test_while_high_work_runs_low_work_keeps_to_the_fast_lane() -> None:
    sched = make_scheduler(max_num_seqs=8, low_seqs_while_high=2)
    lows = [add(sched, f"low{i}", 3, max_tokens=30) for i in range(5)]
    step(sched)
    assert len(step(sched).chunks) == 5  # no high work: every low sequence decodes
    add(sched, "high", 3, priority=0, max_tokens=3)
    blocks = {s.seq_id: list(s.block_table) for s in lows}
    for _ in range(3):
        out = step(sched)
        ids = scheduled_ids(out)
        assert "high" in ids
        # The two oldest low sequences go on; the rest sit the steps out, keeping their
        # cache blocks and their running slots (nothing is preempted).
        assert sorted(i for i in ids if i != "high") == ["low0", "low1"]
        assert not out.preempted
    assert all(s.status is SequenceStatus.RUNNING for s in lows)
    assert all(s.block_table[: len(blocks[s.seq_id])] == blocks[s.seq_id] for s in lows)
    assert "high" not in sched.seqs  # finished after its 3 tokens
    # High work gone: every low sequence decodes again.
    assert sorted(scheduled_ids(step(sched))) == [f"low{i}" for i in range(5)]


def test_the_lane_lingers_for_its_steps_after_high_work_leaves() -> None:
    sched = make_scheduler(max_num_seqs=8, low_seqs_while_high=2, lane_linger_steps=3)
    for i in range(5):
        add(sched, f"low{i}", 3, max_tokens=40)
    step(sched)
    assert not sched.high_work
    add(sched, "high", 3, priority=0, max_tokens=2)
    while "high" in sched.seqs:
        step(sched)
        assert sched.high_work
    # Gone, and for three more steps low work keeps to the lane (high work still counts as
    # present for a garbage collection to wait out); then full width again.
    for _ in range(3):
        assert sorted(scheduled_ids(step(sched))) == ["low0", "low1"]
        assert sched.high_work
    assert len(step(sched).chunks) == 5
    assert not sched.high_work
    # A high job arriving while the lane lingers restarts the count.
    add(sched, "high2", 3, priority=0, max_tokens=2)
    while "high2" in sched.seqs:
        step(sched)
    step(sched)
    add(sched, "high3", 3, priority=0, max_tokens=2)
    while "high3" in sched.seqs:
        step(sched)
    for _ in range(3):
        assert len(step(sched).chunks) == 2
    assert len(step(sched).chunks) == 5


def test_a_waiting_high_sequence_holds_low_admission_to_the_lane() -> None:
    sched = make_scheduler(max_num_seqs=8, max_num_batched_tokens=64,
                           low_seqs_while_high=1, low_tokens_while_high=4)
    add(sched, "high", 3, priority=0, max_tokens=8)
    add(sched, "low0", 10, max_tokens=8)
    add(sched, "low1", 10, max_tokens=8)
    out = sched.schedule()
    # The high prompt whole, one low sequence, its prefill cut to the lane's 4 tokens.
    assert [(c.seq.seq_id, c.num_tokens) for c in out.chunks] == [("high", 3), ("low0", 4)]
    assert [s.seq_id for s in sched.waiting] == ["low1"]


def test_without_high_work_the_lane_limits_nothing() -> None:
    sched = make_scheduler(max_num_seqs=8, max_num_batched_tokens=64,
                           low_seqs_while_high=1, low_tokens_while_high=4)
    for i in range(3):
        add(sched, f"low{i}", 10, max_tokens=8)
    out = sched.schedule()
    assert [(c.seq.seq_id, c.num_tokens) for c in out.chunks] == [
        ("low0", 10), ("low1", 10), ("low2", 10)]


def test_a_high_sequence_takes_the_slot_of_low_work_the_lane_holds_back() -> None:
    # Every slot taken by low work and none reserved for high: with the lane holding all but
    # one low sequence back, a waiting high sequence would wait for that one to finish. It
    # preempts the newest low sequence that sits the step out instead.
    sched = make_scheduler(max_num_seqs=4, low_seqs_while_high=1)
    decoding(sched, [f"low{i}" for i in range(4)])
    add(sched, "high", 3, priority=0, max_tokens=30)
    out = step(sched)
    assert scheduled(out) == {"low0": 1, "high": 3}
    assert [s.seq_id for s in out.preempted] == ["low3"]
    assert [s.seq_id for s in sched.waiting] == ["low3"]  # back first in line for a slot
    assert sorted(s.seq_id for s in sched.running) == ["high", "low0", "low1", "low2"]


def test_without_the_lane_a_high_sequence_waits_for_a_slot() -> None:
    # Without the lane every low sequence computes and frees its slot at its own end: no
    # preemption for a slot.
    sched = make_scheduler(max_num_seqs=4)
    decoding(sched, [f"low{i}" for i in range(4)])
    add(sched, "high", 3, priority=0, max_tokens=30)
    out = step(sched)
    assert "high" not in scheduled(out) and not out.preempted
    assert [s.seq_id for s in sched.waiting] == ["high"]


def test_a_low_sequence_on_its_last_token_is_not_preempted_for_a_slot() -> None:
    sched = make_scheduler(max_num_seqs=2, low_seqs_while_high=1)
    add(sched, "low0", 1, max_tokens=30)
    add(sched, "low1", 1, max_tokens=2)
    step(sched)  # both prefilled, one token each
    sched.schedule()  # low1's second and last token is on its way: it is finishing
    add(sched, "high", 3, priority=0, max_tokens=30)
    out = sched.schedule()
    # low0 takes the lane; low1 sits out but frees its slot at the next postprocess
    assert "high" not in scheduled(out) and not out.preempted
