"""The fixed sizes of the captured mixed steps (engine.executor.mixed_graphs) hold every step
the scheduler may make: pure layout arithmetic, no model."""

from __future__ import annotations

import random

import pytest

from engine.executor.mixed_graphs import MixedLayout, mixed_token_sizes


@pytest.mark.parametrize("max_tokens", [64, 100, 2048, 8192])
def test_the_sizes_rise_to_the_step_budget(max_tokens: int) -> None:
    sizes = mixed_token_sizes(max_tokens)
    assert sizes == sorted(set(sizes))
    assert sizes[-1] == max_tokens
    # Padding stays a bounded share of a step: no size is more than twice the one before.
    assert all(b <= 2 * a for a, b in zip(sizes, sizes[1:], strict=False))
    # Small steps (the fast lane's) are padded by at most 64 tokens.
    assert all(b - a <= 64 for a, b in zip([0, *sizes], sizes, strict=False) if b <= 512)


def test_every_composition_fits_its_layout() -> None:
    rng = random.Random(0)
    tile, max_seqs = 64, 256
    sizes = mixed_token_sizes(8192)
    for _ in range(2000):
        decode = rng.randint(0, max_seqs - 1)
        prefills = [rng.randint(2, 600) for _ in range(rng.randint(1, max_seqs - decode))]
        tokens = decode + sum(prefills)
        if tokens > sizes[-1]:
            continue
        layout = MixedLayout.for_tokens(
            next(s for s in sizes if s >= tokens), max_seqs, 32, tile
        )
        tiles = sum(-(-n // tile) for n in prefills)
        assert decode <= layout.decode
        assert len(prefills) <= layout.chunks - 1  # one chunk is the padding tiles' own
        assert tiles <= layout.tiles
        assert decode + len(prefills) <= layout.rows


def test_the_fields_do_not_overlap() -> None:
    layout = MixedLayout.for_tokens(512, 64, 16, 64)
    offsets = list(layout.offsets.values())
    assert offsets == sorted(offsets)
    assert layout.total == (
        3 * 512 + 2 * 64 + 64 * 16 + 1 + 2 * layout.tiles + 3 * layout.chunks
        + layout.chunks * 16 + 64
    )
