"""Decode rows' block tables in the captured graphs' host buffers (DecodeGraphs._fill and
MixedGraphs._fill, which keep them from step to step): each row holds the first blocks of its
sequence's table after every step, whether the row kept its sequence, grew, changed hands,
was padding in between or belongs to a sequence that was preempted and got new blocks. Pure
host arithmetic: no model runs."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from engine.core.scheduler import ScheduledChunk
from engine.executor.cuda_graphs import DecodeGraphs
from engine.executor.mixed_graphs import MixedGraphs

BLOCK = 4
SCRATCH = 99


def graphs() -> DecodeGraphs:
    return DecodeGraphs(model=None, kv_caches=[], max_num_seqs=8, max_blocks=6,  # type: ignore[arg-type]
                        block_size=BLOCK, scratch_block=SCRATCH, device=torch.device("cpu"),
                        replay=False)


def fill(g: DecodeGraphs, turn: int, tables: list[list[int]]) -> np.ndarray:
    """One decode step of len(tables) sequences, each at its table's last position, written
    into host buffer `turn`; returns that buffer's block-table rows."""
    positions = [len(t) * BLOCK - 1 for t in tables]
    slots = [t[-1] * BLOCK + BLOCK - 1 for t in tables]
    bs = g.batch_size_for(len(tables))
    assert bs is not None
    g._fill(turn, [5] * len(tables), positions, slots, tables, bs)
    h = g.staging.inputs_np[turn]
    return h[g.o_tab : g.o_tab + bs * g.max_blocks].reshape(bs, g.max_blocks)


def assert_rows(rows: np.ndarray, tables: list[list[int]]) -> None:
    for i, table in enumerate(tables):
        assert rows[i, : len(table)].tolist() == table, (i, rows[i].tolist(), table)


def test_rows_follow_their_tables_step_after_step() -> None:
    g = graphs()
    a, b, c = [1, 2], [3], [4, 5, 6]
    assert_rows(fill(g, 0, [a, b, c]), [a, b, c])
    fill(g, 1, [a, b, c])  # the other buffer, as decode lookahead alternates them

    a.append(7)  # a sequence's table grows in place
    d = [8, 9, 10, 11]  # another sequence takes b's row
    assert_rows(fill(g, 0, [a, d, c]), [a, d, c])

    # Three sequences run in the graph of four: the last row is padding that writes into the
    # scratch block.
    rows = fill(g, 1, [c, a, d])
    assert_rows(rows, [c, a, d])
    assert rows.shape[0] == 4 and rows[3, 0] == SCRATCH
    # The row that was padding holds a sequence again afterwards, b's whole table.
    b.extend([13, 14])
    assert_rows(fill(g, 1, [c, a, d, b]), [c, a, d, b])
    # b's row is padding for a step, then b's again: written again, though b did not change.
    assert fill(g, 1, [c, a, d])[3, 0] == SCRATCH
    assert_rows(fill(g, 1, [c, a, d, b]), [c, a, d, b])

    # A preempted sequence is re-admitted with a new list of other blocks; the row that held
    # its old list gets the new one, even though the old list is longer.
    a_again = [12]
    assert_rows(fill(g, 0, [a_again, d, c]), [a_again, d, c])


def test_a_step_writes_only_the_blocks_that_changed() -> None:
    g = graphs()
    a, b = [1, 2], [3, 4]
    fill(g, 0, [a, b])
    h = g.staging.inputs_np[0]
    rows = h[g.o_tab : g.o_tab + 2 * g.max_blocks].reshape(2, g.max_blocks)
    rows[1, 0] = -1  # if b's row were written again, this would be overwritten
    a.append(5)
    rows = fill(g, 0, [a, b])
    assert rows[0, :3].tolist() == [1, 2, 5]
    assert rows[1, 0] == -1


# ---- mixed steps (MixedGraphs._fill) -------------------------------------------------------


class _Seq:
    """What a mixed step's fill reads of a sequence."""

    def __init__(self, table: list[int], num_tokens: int) -> None:
        self.block_table = table
        self.token_ids = [(7 * i) % 50 + 1 for i in range(num_tokens)]


def mixed_graphs() -> MixedGraphs:
    return MixedGraphs(model=None, kv_caches=[], max_tokens=96, max_num_seqs=8,  # type: ignore[arg-type]
                       max_blocks=6, block_size=BLOCK, scratch_block=SCRATCH, tile=4,
                       device=torch.device("cpu"), replay=False)


def mixed_inputs(g: MixedGraphs, turn: int, chunks: list[ScheduledChunk]) -> dict[str, list]:
    """Fill one mixed step into buffer `turn` and return what the kernels read of it: the
    flat rows, the decode entries (each table up to its context) and the sampling rows."""
    layout = g.layout_for(sum(c.num_tokens for c in chunks), len(chunks))
    assert layout is not None
    n = g._fill(turn, layout, chunks)
    h, o = g.staging.inputs_np[turn], layout.offsets

    def part(name: str, size: int) -> list[int]:
        return h[o[name] : o[name] + size].tolist()

    lens = part("d_lens", layout.decode)
    tables = h[o["d_tab"] : o["d_tab"] + layout.decode * layout.blocks].reshape(
        layout.decode, layout.blocks)
    return {
        "flat": [part(f, layout.tokens) for f in ("ids", "pos", "slots")],
        "decode": [(row, ln, tables[i, : -(-ln // BLOCK)].tolist())
                   for i, (row, ln) in enumerate(zip(part("d_rows", layout.decode), lens,
                                                     strict=True)) if ln],
        "sampling": part("s_rows", n),
    }


def decode_chunk(seq: _Seq, position: int) -> ScheduledChunk:
    return ScheduledChunk(seq, position, 1, True, False)  # type: ignore[arg-type]


def prefill_chunk(seq: _Seq, start: int, tokens: int) -> ScheduledChunk:
    return ScheduledChunk(seq, start, tokens, True, start == 0)  # type: ignore[arg-type]


def test_mixed_steps_keep_tables_yet_match_a_fresh_fill() -> None:
    """Decode rows' tables are kept from step to step (only new blocks written) across
    layouts of different sizes, rows changing hands and preempted sequences re-admitted; each
    step's inputs equal those of a fill from nothing."""
    g = mixed_graphs()
    a, b, c = _Seq([1, 2], 24), _Seq([3], 24), _Seq([4, 5, 6], 24)
    prompt = _Seq([7, 8, 9], 24)

    def steps() -> Iterator[list[ScheduledChunk]]:  # each step's tables as the scheduler left them
        yield [decode_chunk(a, 6), decode_chunk(b, 2), prefill_chunk(prompt, 0, 9)]
        yield [decode_chunk(a, 7), decode_chunk(b, 3), prefill_chunk(prompt, 9, 3)]
        a.block_table.append(10)  # a grows in place; c takes b's row; a much larger step
        prompt.block_table.append(20)
        yield [decode_chunk(a, 8), decode_chunk(c, 11), decode_chunk(prompt, 12),
               prefill_chunk(_Seq([11, 12, 13, 14, 15, 16], 24), 0, 21)]
        a_again = _Seq([17, 18, 19], 24)  # a preempted and re-admitted: a new, longer list
        yield [decode_chunk(c, 11), decode_chunk(a_again, 9), prefill_chunk(b, 0, 4)]
        yield [decode_chunk(b, 3), prefill_chunk(c, 0, 12)]

    for i, chunks in enumerate(steps()):
        turn = i % 2
        kept = mixed_inputs(g, turn, chunks)
        fresh = mixed_inputs(mixed_graphs(), turn, chunks)
        assert kept == fresh, i
        # and the decode rows hold their sequences' tables (not a stale one)
        decode_seqs = [c.seq for c in chunks if c.num_tokens == 1]
        for (_, length, table), seq in zip(kept["decode"], decode_seqs, strict=True):
            assert table == seq.block_table[: -(-length // BLOCK)], i


def test_a_mixed_step_writes_only_the_decode_blocks_that_changed() -> None:
    g = mixed_graphs()
    a, b = _Seq([1, 2], 24), _Seq([3, 4], 24)
    prompt = _Seq([5, 6], 24)
    mixed_inputs(g, 0, [decode_chunk(a, 6), decode_chunk(b, 6), prefill_chunk(prompt, 0, 5)])
    g._decode_tables[1, 0] = -1  # if b's kept row were written again, this would go
    a.block_table.append(9)
    inputs = mixed_inputs(g, 1, [decode_chunk(a, 8), decode_chunk(b, 7),
                                 prefill_chunk(prompt, 5, 3)])
    assert inputs["decode"][0][2] == [1, 2, 9]
    assert inputs["decode"][1][2] == [-1, 4]
