"""A push all-reduce for the small sums of a tensor-parallel decode step, optionally with the
residual add and RMSNorm that follow it, in one kernel.

Why: at batch 1 a sharded decode step sums a few KB twice per layer, and what that costs is
latency, not bandwidth: a barrier on a signal pad before and after reading the peers' buffers
(PyTorch's one-shot sum), plus the copy of the partial into the shared buffer, plus the norm
kernel after it. Here the data is its own signal. Every rank owns a buffer that every rank of
the group maps (PyTorch's symmetric memory), laid out as [SLOTS, world, capacity] and kept
filled with a sentinel (negative zero's bit pattern) wherever nothing is pending. A call:

1. writes this rank's partial, with any -0.0 turned into +0.0 (equal as a number, but not the
   sentinel), straight into its own segment of every peer's buffer, at the call's slot;
2. reads its own buffer's peer segments, again and again, until no element holds the sentinel:
   each element turns from sentinel to value exactly once, so nothing else needs to arrive;
3. sums the partials in rank order (every rank gets the same bits), writes the sentinel back
   over what it read, and with `NORM` adds the residual and normalises, rounding where
   engine.kernels.elementwise.rms_norm rounds.

Which slot a call uses comes from an epoch in device memory (so a captured CUDA graph replays
correctly): the last program of a call to arrive advances it. A rank can be at most one call
ahead of its slowest peer (it cannot finish a call without every peer's partial of that call),
so the slot it writes is never the one a peer is still reading, with slots to spare.

A program sums one row ([tokens, hidden] inputs, one row per token), so the norm has its whole
row. The wait spins on the device: a rank that dies leaves its peers spinning until the group
is torn down, which the processes around the group do (engine.core_process).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import replace
from typing import Any, cast

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from engine.distributed import ParallelGroup
from engine.kernels import pdl
from engine.kernels.pdl import allow_next_then_wait

log = logging.getLogger(__name__)

# Calls in flight a buffer has room for: the current call and the one a faster peer may
# already be writing, plus one spare.
SLOTS = 3
# "Nothing here yet": the bit pattern of -0.0, read as a signed integer of the float's width.
SENTINELS = {2: -(1 << 15), 4: -(1 << 31)}
_BITS = {2: torch.int16, 4: torch.int32}
# The largest sum taken by the push path: up to 256 tokens of an 8B model's hidden states
# (2 MB); prefill steps above it go to NCCL, which is bandwidth-bound there anyway.
MAX_BYTES = 2 << 20
# The widest row the kernel sums (a program holds one row).
MAX_ROW = 16384


@triton.jit
def _push_all_reduce_kernel(
    x_ptr,  # [rows, n] this rank's partial
    out_ptr,  # [rows, n] the sum (NORM: the normalised sum + residual)
    res_ptr,  # [rows, n] residual (NORM)
    norm_w_ptr,  # [n] norm weight (NORM)
    res_out_ptr,  # [rows, n] sum + residual (NORM)
    buffers_ptr,  # int64 [world]: every rank's buffer, as addresses in this process
    state_ptr,  # int32 [2]: epoch (the slot of the current call), programs arrived in it
    n,
    capacity,  # elements of one rank's segment of one slot
    eps,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    SLOTS_: tl.constexpr,
    SENTINEL: tl.constexpr,
    BITS: tl.constexpr,  # the signed integer type of the float's width
    BLOCK: tl.constexpr,
    NORM: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    allow_next_then_wait(USE_PDL)  # engine.kernels.pdl
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    dtype = x_ptr.dtype.element_ty
    slot = tl.load(state_ptr)  # the epoch, kept in [0, SLOTS)
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0)
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 -> +0.0: the sentinel must mean "not yet"
    offset = (slot * WORLD * capacity + row * n + cols).to(tl.int64)
    # 1. This rank's partial into its segment of every peer's buffer.
    for r in tl.static_range(WORLD):
        if r != RANK:
            # (Buffers are allocated at least 16-byte aligned: stores can be vectorised.)
            peer = tl.multiple_of(tl.load(buffers_ptr + r).to(tl.pointer_type(dtype)), 16)
            tl.store(peer + offset + RANK * capacity, x, mask=mask)
    # 2. Every peer's partial from this rank's own buffer, once all of it has landed; summed in
    # rank order so that every rank rounds the same.
    own = tl.multiple_of(tl.load(buffers_ptr + RANK).to(tl.pointer_type(BITS)), 16)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(WORLD):
        if r == RANK:
            acc += x.to(tl.float32)
        else:
            src = own + offset + r * capacity
            bits = tl.load(src, mask=mask, other=0, volatile=True)
            while tl.sum((bits == SENTINEL).to(tl.int32), axis=0) > 0:
                bits = tl.load(src, mask=mask, other=0, volatile=True)
            acc += bits.to(dtype, bitcast=True).to(tl.float32)
            # 3. Nothing pending here again until a peer's call SLOTS calls from now.
            tl.store(src, tl.full([BLOCK], SENTINEL, BITS), mask=mask)
    total = acc.to(dtype)  # the sum in the model dtype, as any all-reduce returns it
    if NORM:
        r_in = tl.load(res_ptr + row * n + cols, mask=mask, other=0.0).to(tl.float32)
        s = (total.to(tl.float32) + r_in).to(dtype)  # the residual stream, model dtype
        tl.store(res_out_ptr + row * n + cols, s, mask=mask)
        sf = s.to(tl.float32)
        var = tl.sum(sf * sf, axis=0) / n
        y = (sf * tl.rsqrt(var + eps)).to(dtype)
        w = tl.load(norm_w_ptr + cols, mask=mask, other=0.0)
        tl.store(out_ptr + row * n + cols, y.to(tl.float32) * w.to(tl.float32), mask=mask)
    else:
        tl.store(out_ptr + row * n + cols, total, mask=mask)
    # The last program of the call moves the epoch on: every program has read it by then.
    tl.debug_barrier()
    arrived = tl.atomic_add(state_ptr + 1, 1, sem="acq_rel")
    if arrived == tl.num_programs(0) - 1:
        tl.store(state_ptr + 1, 0)
        tl.store(state_ptr, (slot + 1) % SLOTS_)  # never overflows, however long it runs


def new_buffer_state(device: torch.device) -> torch.Tensor:
    """The epoch and arrival count a group's calls share (zero on every rank at the start)."""
    return torch.zeros(2, dtype=torch.int32, device=device)


def as_bits(buffer: torch.Tensor) -> torch.Tensor:
    """A float buffer's elements as the signed integers the sentinel is written in."""
    return buffer.view(_BITS[buffer.element_size()])


def clear(buffer: torch.Tensor) -> None:
    """Fill a buffer with the sentinel: nothing pending."""
    as_bits(buffer).fill_(SENTINELS[buffer.element_size()])


def push_all_reduce(
    x: torch.Tensor,
    buffers: torch.Tensor,
    state: torch.Tensor,
    capacity: int,
    rank: int,
    world: int,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sum of every rank's x ([rows, n], 16- or 32-bit floats, rows * n <= capacity) over the
    group: (sum, None); with norm_weight and residual: (norm(sum + residual) * norm_weight,
    sum + residual).

    buffers: int64 [world], each rank's buffer ([SLOTS, world, capacity] of x's dtype,
    all sentinel at the start) as an address in this process; state: new_buffer_state().
    Every rank of the group must make the same calls in the same order."""
    rows, n = x.shape
    if not x.is_floating_point() or x.element_size() not in SENTINELS:
        raise ValueError(f"push_all_reduce sums 16- or 32-bit floats, got {x.dtype}")
    if rows * n > capacity:
        raise ValueError(f"push_all_reduce: {rows * n} elements over a capacity of {capacity}")
    norm = norm_weight is not None
    if norm and residual is None:
        raise ValueError("push_all_reduce: the norm comes with the residual add")
    x = x.contiguous()
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if norm else None
    if rows:
        _push_all_reduce_kernel[(rows,)](
            x, out, residual.contiguous() if residual is not None else x,
            norm_weight if norm_weight is not None else x,
            res_out if res_out is not None else out, buffers, state, n, capacity, eps,
            RANK=rank, WORLD=world, SLOTS_=SLOTS, SENTINEL=SENTINELS[x.element_size()],
            BITS=tl.int16 if x.element_size() == 2 else tl.int32,
            BLOCK=triton.next_power_of_2(n), NORM=norm,
            num_warps=4, **pdl.launch_options(x.device),
        )  # fmt: skip
    return out, res_out


class PushAllReduce:
    """The group's buffers for push_all_reduce, and the calls the layers make
    (engine.distributed.FastSum).

    Why: a decode step of a sharded model makes two all-reduces per layer (64 a token on an
    8B Llama) of a few KB each, and at that size what counts is latency: NCCL's ring costs
    ~21 us each inside a CUDA graph on a pair of H200s, PyTorch's one-shot sum ~8.5 us with
    its copy in (bench/bench_allreduce.py). Here a call needs no barrier, no staging copy and,
    after the attention block, no norm kernel of its own. No multicast is used (NVLink
    multicast stays off).
    """

    def __init__(self, group: Any, device: torch.device, dtype: torch.dtype,
                 max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.dtype = dtype
        self.capacity = max_bytes // dtype.itemsize
        size = SLOTS * self.world_size * self.capacity
        self.buffer = symm_mem.empty(size, dtype=dtype, device=device)
        clear(self.buffer)
        handle = symm_mem.rendezvous(self.buffer, cast(Any, group.group_name))
        self.buffers = torch.tensor(
            [handle.get_buffer(r, (size,), dtype).data_ptr() for r in range(self.world_size)],
            dtype=torch.int64, device=device,
        )  # fmt: skip
        self.state = new_buffer_state(device)
        # No peer may push into a buffer before its owner has cleared it.
        torch.cuda.synchronize(device)
        dist.barrier(group=group)

    def fits(self, x: torch.Tensor) -> bool:
        """Whether x ([rows, hidden]) takes this path: the same answer on every rank."""
        return (x.dtype == self.dtype and x.is_cuda and x.dim() == 2
                and x.numel() <= self.capacity and x.shape[1] <= MAX_ROW)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = push_all_reduce(
            x, self.buffers, self.state, self.capacity, self.rank, self.world_size
        )
        return out

    def all_reduce_add_norm(self, x: torch.Tensor, residual: torch.Tensor,
                            weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        out, summed = push_all_reduce(
            x, self.buffers, self.state, self.capacity, self.rank, self.world_size,
            norm_weight=weight, eps=eps, residual=residual,
        )  # fmt: skip
        assert summed is not None
        return out, summed


def with_push_all_reduce(group: ParallelGroup, device: torch.device,
                         dtype: torch.dtype) -> ParallelGroup:
    """`group` with the push path for small sums where every rank can take it: GPUs under
    NCCL, a float dtype of 16 or 32 bits, PyTorch's symmetric memory present. The ranks agree first,
    so either all of them take it or none does. Collective: every rank of the group must call
    it at the same point."""
    if group.world_size == 1 or device.type != "cuda":
        return group
    if dist.get_backend(group.process_group) != "nccl":
        return group
    able = dtype in (torch.bfloat16, torch.float16, torch.float32)
    try:
        importlib.import_module("torch.distributed._symmetric_memory")
    except (ImportError, AttributeError, RuntimeError):
        able = False
    if not group.min(int(able), device):
        log.info("all-reduce: NCCL for every sum (push path not available on every rank)")
        return group
    fast = PushAllReduce(group.process_group, device, dtype, MAX_BYTES)
    log.info("all-reduce: pushed over symmetric memory up to %d KB, NCCL above",
             MAX_BYTES >> 10)
    return replace(group, symmetric=fast)
