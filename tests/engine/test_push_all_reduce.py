"""The push all-reduce (engine.kernels.all_reduce) between two real processes on the CPU.

Each rank runs the kernel in Triton's interpreter over buffers in shared memory, mapped at a
different address in each process, as symmetric memory maps GPU buffers: each pushes its
partial into the other's buffer and spins until the other's has landed in its own. Checked:
the sums (and the residual add and norm after them) equal the unfused computation, a -0.0 in
a partial neither hangs the peer nor changes the sum, calls cycle through every slot and
back, and each call leaves the buffers all sentinel again.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import traceback
from pathlib import Path

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from triton_interpreter import run_in_interpreter  # noqa: E402

WORLD = 2
CAPACITY = 512
EPS = 1e-5
# (rows, hidden, with the norm): more calls than slots, rows and widths that vary, a width
# that is not a power of two.
CALLS = [(1, 64, False), (3, 40, True), (5, 64, False), (2, 48, True), (1, 40, False),
         (4, 64, True), (3, 64, False)]


def partial(rank: int, call: int, rows: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """What rank `rank` sums in call `call` (every rank can compute every rank's)."""
    gen = torch.Generator().manual_seed(100 * call + rank)
    x = torch.randn(rows, n, generator=gen).to(dtype)
    x[0, :3] = -0.0  # negative zeros look like the sentinel until the kernel turns them
    return x


def _rank_main(rank: int, buffers: list[torch.Tensor], failed: Path) -> None:
    faulthandler.dump_traceback_later(120, exit=True)  # a spin that never ends fails, loudly
    try:
        check_rank(rank, buffers)
        faulthandler.cancel_dump_traceback_later()
    except BaseException:
        traceback.print_exc()
        failed.write_text(f"rank {rank} failed")
        sys.stderr.flush()
        os._exit(1)


def check_rank(rank: int, buffers: list[torch.Tensor]) -> None:
    from engine.kernels import all_reduce, elementwise

    dtype = buffers[0].dtype
    addresses = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    state = all_reduce.new_buffer_state(torch.device("cpu"))
    weight = torch.randn(64, generator=torch.Generator().manual_seed(7)).to(dtype)
    for call, (rows, n, norm) in enumerate(CALLS):
        parts = [partial(r, call, rows, n, dtype) for r in range(WORLD)]
        want = (parts[0].float() + parts[1].float()).to(dtype)
        gen = torch.Generator().manual_seed(call)
        residual = torch.randn(rows, n, generator=gen).to(dtype)
        if norm:
            got, summed = all_reduce.push_all_reduce(
                parts[rank], addresses, state, CAPACITY, rank, WORLD,
                norm_weight=weight[:n], eps=EPS, residual=residual,
            )  # fmt: skip
            want_norm, want_sum = elementwise.rms_norm(want, weight[:n], EPS, residual)
            torch.testing.assert_close(summed, want_sum, rtol=0, atol=0)
            torch.testing.assert_close(got, want_norm, rtol=1e-3, atol=1e-3)
        else:
            got, summed = all_reduce.push_all_reduce(
                parts[rank], addresses, state, CAPACITY, rank, WORLD
            )
            assert summed is None
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        # One epoch a call, counted modulo the slots; arrivals back to zero.
        assert state.tolist() == [(call + 1) % all_reduce.SLOTS, 0]
        # This rank's buffer: what it read is sentinel again. (The peer may already be
        # pushing its next call into the next slot, so only this call's slot is checked.)
        slot = call % all_reduce.SLOTS
        own = buffers[rank].view(all_reduce.SLOTS, WORLD, CAPACITY)[slot]
        sentinel = all_reduce.SENTINELS[own.element_size()]
        assert bool((all_reduce.as_bits(own) == sentinel).all()), call


def check_two_ranks(tmp: str, dtype_name: str) -> None:
    from engine.kernels import all_reduce

    buffers = []
    for _ in range(WORLD):
        b = torch.empty(all_reduce.SLOTS * WORLD * CAPACITY, dtype=getattr(torch, dtype_name))
        all_reduce.clear(b)
        buffers.append(b.share_memory_())
    failed = Path(tmp) / "failed"
    mp.spawn(_rank_main, args=(buffers, failed), nprocs=WORLD, join=True)
    assert not failed.exists(), failed.read_text()


# float16, not bfloat16: the interpreter computes in numpy, which has no bfloat16 and rounds
# it differently from torch.
@pytest.mark.parametrize("dtype_name", ["float16", "float32"])
def test_push_all_reduce_between_two_processes(tmp_path: Path, dtype_name: str) -> None:
    run_in_interpreter(
        __file__, f"t.check_two_ranks({str(tmp_path)!r}, {dtype_name!r})", timeout=300
    )


def test_bad_inputs_are_refused() -> None:
    from engine.kernels import all_reduce

    addresses = torch.zeros(WORLD, dtype=torch.int64)
    state = all_reduce.new_buffer_state(torch.device("cpu"))
    with pytest.raises(ValueError, match="16- or 32-bit floats"):
        all_reduce.push_all_reduce(
            torch.zeros(1, 8, dtype=torch.float64), addresses, state, CAPACITY, 0, WORLD
        )
    with pytest.raises(ValueError, match="capacity"):
        all_reduce.push_all_reduce(
            torch.zeros(2, CAPACITY, dtype=torch.float16), addresses, state, CAPACITY, 0, WORLD
        )
    with pytest.raises(ValueError, match="residual"):
        all_reduce.push_all_reduce(
            torch.zeros(1, 8, dtype=torch.float16), addresses, state, CAPACITY, 0, WORLD,
            norm_weight=torch.ones(8, dtype=torch.float16),
        )  # fmt: skip


class RecordingSum:
    """A stand-in for the push path (engine.distributed.FastSum) that records its calls and
    answers as the real one would for a group whose other ranks sent zeros."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def fits(self, x: torch.Tensor) -> bool:
        return x.dim() == 2

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append("sum")
        return x.clone()

    def all_reduce_add_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append("sum+norm")
        summed = x + residual
        return summed * weight, summed


def test_the_output_projection_takes_the_fused_sum_where_the_group_offers_it() -> None:
    """RowParallelLinear.add_norm_forward: one fused call (sum, residual add, norm) where the
    group's fast path takes the partial and the norm runs on the GPU path; the sum and then
    the norm's own add_forward otherwise (a bias to add after the sum, or the CPU norm)."""
    from engine.distributed import ParallelGroup
    from engine.layers.linear import RowParallelLinear
    from engine.layers.norm import RMSNorm

    fast = RecordingSum()
    group = ParallelGroup(0, 2, process_group=object(), symmetric=fast)
    torch.manual_seed(0)
    x, residual = torch.randn(3, 4), torch.randn(3, 8)
    gpu_norm = RMSNorm(8, 1e-5, triton=True)
    gpu_norm.weight.data = torch.randn(8)

    o_proj = RowParallelLinear(8, 8, bias=False, group=group)
    o_proj.weight.data = torch.randn(8, 4)
    h, summed = o_proj.add_norm_forward(x, residual, gpu_norm)
    assert fast.calls == ["sum+norm"]
    torch.testing.assert_close(summed, x @ o_proj.weight.T + residual)
    torch.testing.assert_close(h, summed * gpu_norm.weight)

    cpu_norm = RMSNorm(8, 1e-5)
    cpu_norm.weight.data = gpu_norm.weight.data.clone()
    h, summed = o_proj.add_norm_forward(x, residual, cpu_norm)
    assert fast.calls == ["sum+norm", "sum"]
    torch.testing.assert_close(summed, x @ o_proj.weight.T + residual)
    torch.testing.assert_close(h, cpu_norm(summed))

    with_bias = RowParallelLinear(8, 8, bias=True, group=group)
    assert with_bias.bias is not None
    with_bias.weight.data, with_bias.bias.data = o_proj.weight.data, torch.randn(8)
    gpu_norm.add_forward = cpu_norm.add_forward  # type: ignore[method-assign]  # no Triton here
    fast.calls.clear()
    _, summed = with_bias.add_norm_forward(x, residual, gpu_norm)
    assert fast.calls == ["sum"]  # the bias is added once, after the sum
    torch.testing.assert_close(summed, x @ o_proj.weight.T + with_bias.bias + residual)
