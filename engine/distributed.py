"""The ranks a model is sharded over: a process-group wrapper with the collectives the layers
and the runner use, and the layer split (consecutive layers per rank).

At group size 1 every collective is a no-op, so the same code serves one GPU, CPU tests and a
sharded group. A sharded group runs SPMD: every rank makes the same calls in the same order,
so the collectives here line up without any coordination of their own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelGroup:
    """The ranks one model is sharded over. `process_group` is None for a group of one."""

    rank: int = 0
    world_size: int = 1
    process_group: Any = None
    # The push path for small sums on GPUs (engine.kernels.all_reduce.with_push_all_reduce);
    # None: NCCL only.
    symmetric: FastSum | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a group of {self.world_size}")
        if self.world_size > 1 and self.process_group is None:
            raise ValueError("a group of several ranks needs a torch.distributed process group")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the group: x itself, summed in place, under NCCL; a new tensor on
        the push path. Capturable in a CUDA graph either way."""
        if self.world_size == 1:
            return x
        if self.symmetric is not None and self.symmetric.fits(x):
            return self.symmetric.all_reduce(x)
        dist.all_reduce(x, group=self.process_group)
        return x

    def fuses_add_norm(self, x: torch.Tensor) -> bool:
        """Whether all_reduce_add_norm sums x, adds and normalises in one kernel."""
        return self.symmetric is not None and self.symmetric.fits(x)

    def all_reduce_add_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(sum + residual) * weight, sum + residual), the sum of x over the group, in
        one kernel; only where fuses_add_norm(x)."""
        assert self.symmetric is not None
        return self.symmetric.all_reduce_add_norm(x, residual, weight, eps)

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


class FastSum(Protocol):
    """A faster path for a group's small sums, which every rank takes for the same tensors
    (engine.kernels.all_reduce.PushAllReduce)."""

    def fits(self, x: torch.Tensor) -> bool: ...

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...

    def all_reduce_add_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


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
