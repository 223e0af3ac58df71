"""A decode step's block tables in the captured graphs' host buffer (DecodeGraphs._fill): each
row holds the first blocks of its sequence's table after every step, whether the row kept its
sequence, grew, changed hands, was padding in between or belongs to a sequence that was
preempted and got new blocks. Pure host arithmetic: no model runs."""

from __future__ import annotations

import numpy as np
import torch

from engine.executor.cuda_graphs import DecodeGraphs

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
