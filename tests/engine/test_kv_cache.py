"""Block manager bookkeeping and cache sizing. No torch."""

from __future__ import annotations

import pytest

from engine.core.kv_cache import BlockManager
from engine.core.sequence import Sequence
from engine.request import SamplingParams


def make_seq(seq_id: str = "s", prompt_len: int = 5) -> Sequence:
    return Sequence(seq_id, list(range(prompt_len)), SamplingParams(), priority=1, arrival=0)


def test_grow_allocates_whole_blocks() -> None:
    manager = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq()
    assert manager.blocks_needed(seq, 5) == 2
    manager.grow(seq, 5)
    assert len(seq.block_table) == 2 and manager.num_free_blocks == 2
    manager.grow(seq, 8)  # still fits in two blocks
    assert len(seq.block_table) == 2
    manager.grow(seq, 9)
    assert len(seq.block_table) == 3
    assert len(set(seq.block_table)) == 3


def test_cannot_grow_past_pool_and_free_returns_blocks() -> None:
    manager = BlockManager(num_blocks=2, block_size=4)
    a, b = make_seq("a"), make_seq("b")
    manager.grow(a, 8)
    assert not manager.can_grow(b, 1)
    with pytest.raises(RuntimeError, match="only 0 free"):
        manager.grow(b, 1)
    manager.free(a)
    assert a.block_table == [] and manager.num_free_blocks == 2
    assert manager.can_grow(b, 8)


def test_sizing_helpers() -> None:
    from engine.executor.runner import block_bytes, blocks_for_sequences  # the cache tensors

    assert blocks_for_sequences(num_seqs=3, max_model_len=33, block_size=16) == 9
    # keys + values, 2 layers, 16 tokens, 2 heads of 8, 4-byte floats
    assert block_bytes(2, 16, 2, 8, 4) == 2 * 2 * 16 * 2 * 8 * 4


def test_empty_pool_rejected() -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=16)
