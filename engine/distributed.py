"""The ranks a model is sharded over: a process-group wrapper with the collectives the layers
and the runner use, and the layer split (consecutive layers per rank).

At group size 1 every collective is a no-op, so the same code serves one GPU, CPU tests and a
sharded group. A sharded group runs SPMD: every rank makes the same calls in the same order,
so the collectives here line up without any coordination of their own.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.distributed_c10d import GroupName

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelGroup:
    """The ranks one model is sharded over. `process_group` is None for a group of one."""

    rank: int = 0
    world_size: int = 1
    process_group: Any = None
    # The one-shot path for small sums on GPUs (with_symmetric_all_reduce); None: NCCL only.
    symmetric: SymmetricAllReduce | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a group of {self.world_size}")
        if self.world_size > 1 and self.process_group is None:
            raise ValueError("a group of several ranks needs a torch.distributed process group")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the group, in place (capturable in a CUDA graph under NCCL)."""
        if self.world_size == 1:
            return x
        if self.symmetric is not None and self.symmetric.fits(x):
            return self.symmetric.all_reduce(x)
        dist.all_reduce(x, group=self.process_group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's x along dim.

        One collective into a single preallocated [world, *x.shape] buffer (not a list of
        tensors), which NCCL runs inside a captured CUDA graph like any other kernel."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        out = torch.empty((self.world_size, *x.shape), dtype=x.dtype, device=x.device)
        # Written as the ranks' x one after another along dim 0 ([world * x.shape[0], ...],
        # the layout every backend takes), read as [world, *x.shape].
        _all_gather_single(out.flatten(0, 1), x, group=self.process_group)
        return torch.cat(out.unbind(0), dim=dim)

    def split(self, size: int, what: str) -> int:
        """This rank's share of `size`, which must divide evenly."""
        if size % self.world_size:
            raise ValueError(f"{what} ({size}) does not divide over {self.world_size} ranks")
        return size // self.world_size

    # ---- host-level agreement and point-to-point (eager steps only) ------------------------

    def comm_device(self, device: torch.device) -> torch.device:
        """Where tensors for this group's collectives must live: CPU for gloo, `device` (the
        rank's GPU) for NCCL."""
        if self.world_size > 1 and dist.get_backend(self.process_group) == "nccl":
            return device
        return torch.device("cpu")

    def min(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's `value` (every rank gets the same answer)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.comm_device(device))
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.process_group)
        return int(t.item())

    def global_rank(self, rank: int) -> int:
        """The torch.distributed rank of this group's rank `rank` (send/recv/broadcast take
        global ranks; the group may be a subgroup of the world)."""
        return int(dist.get_global_rank(self.process_group, rank))

    # These three stage a GPU tensor through host memory when the group runs gloo (which
    # sends only host tensors), so that a layer split also runs over gloo on GPUs.

    def broadcast(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """Every rank's x becomes group rank src's x, in place."""
        if self.world_size == 1:
            return x
        staged = x.to(self.comm_device(x.device))
        dist.broadcast(staged, self.global_rank(src), group=self.process_group)
        if staged is not x:
            x.copy_(staged)
        return x

    def send(self, x: torch.Tensor, dst: int) -> None:
        """Send x to group rank dst, which must `recv` a tensor of its shape and dtype."""
        staged = x.to(self.comm_device(x.device)).contiguous()
        dist.send(staged, self.global_rank(dst), group=self.process_group)

    def recv(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """Fill x (preallocated, contiguous, the sender's shape and dtype) from group rank
        src."""
        where = self.comm_device(x.device)
        staged = x if x.device == where else torch.empty_like(x, device=where)
        dist.recv(staged, self.global_rank(src), group=self.process_group)
        if staged is not x:
            x.copy_(staged)
        return x


class SymmetricAllReduce:
    """A one-shot all-reduce through PyTorch's symmetric memory, for the small sums of
    tensor-parallel decode steps.

    Why: a decode step of a sharded model makes two all-reduces per layer (64 a token on an
    8B Llama) of a few KB each, and at that size NCCL's ring costs ~21 us each inside a CUDA
    graph on a pair of H200s, against ~8.5 us for a one-shot sum, copies in and out included
    (bench/bench_allreduce.py): a third of the step's time at batch 1. Each rank copies its
    partial sum into a buffer that every rank of the group maps, and after one barrier on the
    buffer's signal pad reads the peers' buffers over NVLink and adds them. No multicast is
    used (NVLink multicast stays off).

    The buffer is shared by every call: the calls of one rank run in order on its stream, and
    the barrier inside each keeps a peer from overwriting a buffer still being read.
    """

    def __init__(self, group_name: str, device: torch.device, dtype: torch.dtype,
                 max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = group_name
        self.dtype = dtype
        self.max_numel = max_bytes // dtype.itemsize
        self.buffer = symm_mem.empty(self.max_numel, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, cast("GroupName", group_name))

    def fits(self, x: torch.Tensor) -> bool:
        # 16-byte multiples: the kernel moves 16 bytes per load.
        return (x.dtype == self.dtype and x.is_cuda and x.is_contiguous()
                and x.numel() <= self.max_numel and x.numel() * x.element_size() % 16 == 0)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        staged = self.buffer[: x.numel()].view_as(x)
        staged.copy_(x)
        torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, x)
        return x


# The largest sum taken by the one-shot path: measured faster than NCCL up to 256 tokens of an
# 8B model's hidden states (2 MB) on H200s; prefill steps above it go to NCCL, which is
# bandwidth-bound there anyway.
SYMMETRIC_ALL_REDUCE_MAX_BYTES = 2 << 20


def with_symmetric_all_reduce(group: ParallelGroup, device: torch.device,
                              dtype: torch.dtype) -> ParallelGroup:
    """`group` with the one-shot path for small sums where every rank can take it: GPUs under
    NCCL, a dtype the kernel sums (bfloat16, float32), PyTorch's symmetric memory present.
    The ranks agree first, so either all of them take it or none does. Collective: every rank
    of the group must call it at the same point."""
    if group.world_size == 1 or device.type != "cuda":
        return group
    if dist.get_backend(group.process_group) != "nccl":
        return group
    able = dtype in (torch.bfloat16, torch.float32)
    try:
        importlib.import_module("torch.distributed._symmetric_memory")
        able = able and hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out")
    except (ImportError, AttributeError, RuntimeError):
        able = False
    if not group.min(int(able), device):
        log.info("all-reduce: NCCL for every sum (one-shot path not available on every rank)")
        return group
    symmetric = SymmetricAllReduce(group.process_group.group_name, device, dtype,
                                   SYMMETRIC_ALL_REDUCE_MAX_BYTES)
    log.info("all-reduce: one-shot over symmetric memory up to %d KB, NCCL above",
             SYMMETRIC_ALL_REDUCE_MAX_BYTES >> 10)
    return replace(group, symmetric=symmetric)


def _all_gather_single(out: torch.Tensor, x: torch.Tensor, group: Any) -> None:
    """dist.all_gather_single where torch has it (it replaced all_gather_into_tensor, which
    now warns), else the older name; out: [world * x.shape[0], *x.shape[1:]]."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)


def layer_range(num_layers: int, rank: int, world_size: int) -> tuple[int, int]:
    """The layers [start, end) of rank `rank` in a balanced split: consecutive layers on
    consecutive ranks, counts differing by at most one (the first ranks take the extra ones;
    the first rank also embeds and the last computes the logits, so neither end gets more
    than the middle)."""
    if num_layers < world_size:
        raise ValueError(
            f"a layer split needs at least one layer per rank: {num_layers} layers over"
            f" {world_size} ranks"
        )
    base, extra = divmod(num_layers, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclass(frozen=True)
class LayerSplit:
    """Which consecutive layers [start, end) of `num_layers` this rank holds, and the group
    the hidden states pass through (rank r hands its output to rank r + 1). A model that is
    not split holds every layer in a group of one."""

    group: ParallelGroup
    num_layers: int
    start: int
    end: int

    @classmethod
    def whole(cls, num_layers: int) -> LayerSplit:
        return cls(ParallelGroup(), num_layers, 0, num_layers)

    @classmethod
    def of(cls, group: ParallelGroup, num_layers: int) -> LayerSplit:
        start, end = layer_range(num_layers, group.rank, group.world_size)
        return cls(group, num_layers, start, end)

    @property
    def num_local_layers(self) -> int:
        return self.end - self.start

    @property
    def is_first(self) -> bool:
        """Whether this rank embeds the tokens."""
        return self.group.rank == 0

    @property
    def is_last(self) -> bool:
        """Whether this rank holds the final norm and the vocabulary head."""
        return self.group.rank == self.group.world_size - 1

    @property
    def last_rank(self) -> int:
        return self.group.world_size - 1

    def holds(self, layer: int) -> bool:
        return self.start <= layer < self.end

    def recv_hidden(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """The previous rank's hidden states ([T, D], as its send_hidden sent them)."""
        x = torch.empty(shape, dtype=dtype, device=device)
        return self.group.recv(x, self.group.rank - 1)

    def send_hidden(self, hidden: torch.Tensor) -> None:
        """Hand this rank's output ([T, D]) to the next rank."""
        self.group.send(hidden, self.group.rank + 1)
