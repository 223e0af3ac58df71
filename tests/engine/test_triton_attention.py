"""The Triton paged attention against the plain PyTorch one: decode (whole and split contexts),
prefill with and without history, mixed steps, grouped-query heads, sliding windows, ragged
lengths, keys and values passed or already cached.

On the CPU the kernels run in Triton's interpreter. TRITON_INTERPRET must be set before Triton
compiles anything and would leak into other tests, so the CPU check runs in a subprocess.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from triton_interpreter import run_in_interpreter  # noqa: E402

from engine.layers.attention import ChunkSpec, TorchPagedAttention  # noqa: E402

# (start, num_tokens) per chunk of one step: decode tokens at ragged lengths, prefills with no
# history, a prefill chunk with history, one longer than a prefill tile, many short ones; and
# single-sequence decodes (up to MAX_SPLITS parts allowed) whose context needs one part, a few,
# or all of them.
# More tiles than the launch has prefill programs per head: each program takes several.
MANY_SHORT_PREFILLS = [(i % 5, 2 + i % 3) for i in range(24)]
STEPS: list[list[tuple[int, int]]] = [
    [(0, 1), (4, 1), (16, 1), (37, 1), (70, 1)],  # decode only
    [(0, 5), (0, 17), (0, 70)],  # prefill only, no history
    [(9, 1), (0, 6), (20, 30), (3, 1), (45, 19), (66, 1)],  # mixed, prefills with history
    [(i % 13, 1) for i in range(40)],  # a decode batch large enough not to split contexts
    [(130 + 37 * i % 150, 1) for i in range(36)],  # ... whose contexts take several tiles
    MANY_SHORT_PREFILLS,
    [(36, 1)],  # one part
    [(299, 1)],  # two parts of the eight allowed
    [(2499, 1)],  # longer than MAX_SPLITS * MIN_SPLIT_TOKENS: every part
]


def make_chunks(
    step: list[tuple[int, int]], num_blocks: int, block_size: int, gen: torch.Generator
) -> list[ChunkSpec]:
    """The step's chunks over shuffled, disjoint blocks."""
    chunks = []
    free = torch.randperm(num_blocks, generator=gen).tolist()
    for start, n in step:
        need = -(-(start + n) // block_size) + 1  # one spare block, as allocated
        table, free = free[:need], free[need:]
        chunks.append(ChunkSpec(start, n, table))
    return chunks


# (query heads, key/value heads, head dim, sliding window)
LAYOUTS: list[tuple[int, int, int, int | None]] = [
    (8, 2, 32, None),  # GQA group of 4
    (4, 4, 16, None),  # no grouping
    (6, 2, 24, 7),  # group of 3, head_dim not a power of 2, sliding window
    (6, 2, 24, 600),  # a window wide enough to split
]


def check_against_torch(device: str, dtype: torch.dtype, atol: float,
                        layouts: list[int] | None = None) -> None:
    """Every step of STEPS, for each of LAYOUTS (or those at the indices given), compared with
    TorchPagedAttention; both also with the step's keys and values already in the cache
    (k = v = None); the Triton one launched twice, which must leave its split counters zero
    and give the same result."""
    from engine.layers.attention import TritonPagedAttention

    dev = torch.device(device)
    block_size = 4
    for index in range(len(LAYOUTS)) if layouts is None else layouts:
        num_heads, num_kv_heads, head_dim, window = LAYOUTS[index]
        gen = torch.Generator().manual_seed(index)
        num_blocks = 4096
        cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
        k_cache = torch.randn(cache_shape, generator=gen).to(dev, dtype)
        v_cache = torch.randn(cache_shape, generator=gen).to(dev, dtype)
        for step in STEPS:
            chunks = make_chunks(step, num_blocks, block_size, gen)
            total = sum(n for _, n in step)
            q = torch.randn(total, num_heads, head_dim, generator=gen).to(dev, dtype)
            k = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dev, dtype)
            v = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dev, dtype)
            scale = head_dim**-0.5
            results = []
            for impl in (TorchPagedAttention(), TritonPagedAttention()):
                kc, vc = k_cache.clone(), v_cache.clone()
                meta = impl.build_metadata(chunks, block_size, dev)
                got = impl(q, k, v, kc, vc, meta, scale, window)
                results.append((got, kc, vc))
                # Again, the keys and values now in the cache: the same result, bit for bit.
                again = impl(q, None, None, kc, vc, meta, scale, window)
                torch.testing.assert_close(again, got, atol=0, rtol=0)
                if isinstance(impl, TritonPagedAttention):
                    for counters in impl.split_counters.values():
                        assert not counters.any(), "split counters left non-zero"
            (want, kw, vw), (got, kg, vg) = results
            torch.testing.assert_close(kg, kw, atol=0, rtol=0)
            torch.testing.assert_close(vg, vw, atol=0, rtol=0)
            torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=atol)


def test_a_step_has_more_prefill_tiles_than_programs() -> None:
    from engine.kernels.attention import PREFILL_BLOCK_M, prefill_programs

    tiles = sum(-(-n // PREFILL_BLOCK_M) for _, n in MANY_SHORT_PREFILLS)
    assert tiles > prefill_programs(sum(n for _, n in MANY_SHORT_PREFILLS))


def test_triton_matches_torch_on_cpu_interpreter() -> None:
    # The layouts in two processes, side by side.
    run_in_interpreter(__file__, "t.check_against_torch('cpu', torch.float32, 1e-4, [0, 1])",
                       "t.check_against_torch('cpu', torch.float32, 1e-4, [2, 3])")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_matches_torch_on_gpu() -> None:
    check_against_torch("cuda", torch.float32, 1e-4)
    check_against_torch("cuda", torch.bfloat16, 3e-2)
