"""Sharding building blocks: a process-group wrapper, layers that hold their tensor-parallel
slice, and the layer split (consecutive layers per rank).

Tensor parallel: each layer knows which part of the full checkpoint tensor belongs to its rank
and loads just that part through `weight_loader`. At group size 1 every collective is a no-op,
so the same model code serves one GPU, CPU tests and a sharded group.

Layer split: `LayerSplit` says which consecutive layers a rank holds and passes the hidden
states from one rank to the next; the tensor-parallel layers then get a group of one.

A sharded group runs SPMD: every rank makes the same calls in the same order, so the
collectives here line up without any coordination of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.quant import int8_linear

# A checkpoint tensor as the loader hands it over: a torch.Tensor, or a lazily read
# safetensors slice (anything indexable by a tuple of slices that yields a torch.Tensor).
CheckpointTensor = Any


@dataclass(frozen=True)
class ParallelGroup:
    """The ranks one model is sharded over. `process_group` is None for a group of one."""

    rank: int = 0
    world_size: int = 1
    process_group: Any = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside a group of {self.world_size}")
        if self.world_size > 1 and self.process_group is None:
            raise ValueError("a group of several ranks needs a torch.distributed process group")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the group, in place (capturable in a CUDA graph under NCCL)."""
        if self.world_size > 1:
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


def read_slice(
    loaded: CheckpointTensor, ndim: int, dim: int | None, start: int, size: int
) -> torch.Tensor:
    """loaded[start:start+size] along dim (the whole tensor when dim is None), reading only
    that part from the file."""
    if dim is None:
        return loaded[:]
    index: list[slice] = [slice(None)] * ndim
    index[dim] = slice(start, start + size)
    part: torch.Tensor = loaded[tuple(index)]
    return part


def load_slice(
    param: torch.Tensor,
    loaded: CheckpointTensor,
    dim: int | None,
    start: int,
    size: int,
    offset: int = 0,
) -> None:
    """Copy loaded[start:start+size] along dim into param[offset:offset+size] along dim.

    dim None copies the whole tensor into param.
    """
    part = read_slice(loaded, param.dim(), dim, start, size)
    target = param if dim is None else param.narrow(dim, offset, part.shape[dim])
    target.copy_(part)


INT8_MAX = torch.iinfo(torch.int8).max


def _triton_gemv() -> Any:
    """engine.triton_gemv, imported on first use (the CPU path never needs Triton)."""
    from engine import triton_gemv

    return triton_gemv


class LinearBase(nn.Module):
    """y = x W^T + b with W: [output_size, input_size] as stored locally.

    After `quantize_int8` the weight is int8 with one scale per output row (weight-only
    quantisation: activations stay in the model dtype).
    """

    weight_scale: nn.Parameter | None

    def __init__(self, input_size: int, output_size: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False) if bias else None
        self.register_parameter("weight_scale", None)

    def quantize_int8(self) -> None:
        """Hold the weight as int8 plus per-row scales; call before the weights are loaded."""
        rows, cols = self.weight.shape
        device = self.weight.device
        self.weight = nn.Parameter(
            torch.empty(rows, cols, dtype=torch.int8, device=device), requires_grad=False
        )
        self.weight_scale = nn.Parameter(torch.empty(rows, device=device), requires_grad=False)

    def load_part(
        self,
        param: torch.Tensor,
        loaded: CheckpointTensor,
        dim: int | None,
        start: int,
        size: int,
        offset: int = 0,
    ) -> None:
        """load_slice, quantising on the way when param is an int8 weight.

        Each output row is scaled by its own absolute maximum, so a rank's rows (or, for a
        row-parallel layer, its column slice of every row) quantise on their own.
        """
        if param is not self.weight or self.weight_scale is None:
            load_slice(param, loaded, dim, start, size, offset)
            return
        part = read_slice(loaded, 2, dim, start, size).to(param.device, torch.float32)
        scale = part.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / INT8_MAX
        q = torch.round(part / scale.unsqueeze(1)).clamp(-INT8_MAX, INT8_MAX)
        first = offset if dim == 0 else 0
        self.weight.narrow(0, first, q.shape[0]).copy_(q)
        self.weight_scale.narrow(0, first, q.shape[0]).copy_(scale)

    # Decode-sized inputs take engine.triton_gemv where it suits the weight (set on the GPU
    # path by the model's use_triton_kernels; the CPU path never imports Triton).
    gemv = False

    def takes_gemv(self, x: torch.Tensor) -> bool:
        """Whether x ([T, in]) runs through the GEMV kernel (see gemv_forward)."""
        return self.gemv and x.dim() == 2 and _triton_gemv().suits(x.shape[0], self.weight)

    def takes_fused_gemv(self, x: torch.Tensor) -> bool:
        """Whether x runs through the GEMV kernel with the layer before fused in."""
        return self.takes_gemv(x) and _triton_gemv().fuses_input(self.weight)

    def gemv_forward(
        self,
        x: torch.Tensor,
        *,
        with_bias: bool = True,
        norm_weight: torch.Tensor | None = None,
        eps: float = 0.0,
        residual: torch.Tensor | None = None,
        silu_mul: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The GEMV kernel with its input computed on the way in: RMSNorm(x + residual) *
        norm_weight, or SiLU(gate) * up (engine.triton_gemv.gemv).

        x: [T, in] ([T, 2 * in] with silu_mul) -> ([T, out], x + residual or None)."""
        return _triton_gemv().gemv(
            x, self.weight, self.bias if with_bias else None, self.weight_scale,
            norm_weight=norm_weight, eps=eps, residual=residual, silu_mul=silu_mul,
        )  # fmt: skip

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out], without the bias
        if self.takes_gemv(x):
            return self.gemv_forward(x, with_bias=False)[0]
        if self.weight_scale is None:
            return F.linear(x, self.weight)
        return int8_linear(x, self.weight, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out]
        if self.takes_gemv(x):
            return self.gemv_forward(x)[0]
        if self.weight_scale is None:
            return F.linear(x, self.weight, self.bias)
        return int8_linear(x, self.weight, self.weight_scale, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split over ranks; no communication (the next layer takes the slice)."""

    def __init__(self, input_size: int, output_size: int, bias: bool, group: ParallelGroup):
        self.group = group
        super().__init__(input_size, group.split(output_size, "output features"), bias)

    def weight_loader(
        self, param: torch.Tensor, loaded: CheckpointTensor, shard_id: Any = None
    ) -> None:
        size = param.shape[0]
        self.load_part(param, loaded, 0, self.group.rank * size, size)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate and up).

    The checkpoint stores them apart; shard_id i is the i-th of `output_sizes`.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, group: ParallelGroup):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, group)

    def weight_loader(
        self, param: torch.Tensor, loaded: CheckpointTensor, shard_id: Any = None
    ) -> None:
        world = self.group.world_size
        offset = sum(self.output_sizes[:shard_id]) // world
        size = self.output_sizes[shard_id] // world
        self.load_part(param, loaded, 0, self.group.rank * size, size, offset)


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matmul, split by heads over ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        group: ParallelGroup,
    ):
        self.num_heads = group.split(num_heads, "attention heads")
        self.num_kv_heads = group.split(num_kv_heads, "key/value heads")
        self.head_dim = head_dim
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias, group)

    def weight_loader(
        self, param: torch.Tensor, loaded: CheckpointTensor, shard_id: Any = None
    ) -> None:
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        self.load_part(param, loaded, 0, self.group.rank * size, size, offset)


class RowParallelLinear(LinearBase):
    """Input features split over ranks; partial outputs summed over the group."""

    def __init__(self, input_size: int, output_size: int, bias: bool, group: ParallelGroup):
        self.group = group
        super().__init__(group.split(input_size, "input features"), output_size, bias)

    def weight_loader(
        self, param: torch.Tensor, loaded: CheckpointTensor, shard_id: Any = None
    ) -> None:
        if param is self.bias:  # whole on every rank, added once after the sum
            load_slice(param, loaded, None, 0, 0)
            return
        size = param.shape[1]
        self.load_part(param, loaded, 1, self.group.rank * size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in / world] -> [T, out]
        return self._reduce(self.matmul(x))

    def silu_mul_forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """This layer applied to SiLU(gate) * up, computed inside the GEMV kernel (callers
        check takes_gemv on the activation's shape first).

        gate_up: [T, 2 * in / world] -> [T, out]"""
        return self._reduce(self.gemv_forward(gate_up, with_bias=False, silu_mul=True)[0])

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        # partial: [T, out], this rank's share -> the sum over the group, plus the bias once
        y = self.group.all_reduce(partial)
        if self.bias is not None:
            y = y + self.bias
        return y


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over ranks (the last rank's share may be padded)."""

    def __init__(self, vocab_size: int, dim: int, group: ParallelGroup):
        super().__init__()
        self.group = group
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // group.world_size)
        self.vocab_start = group.rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, dim), requires_grad=False)

    def weight_loader(
        self, param: torch.Tensor, loaded: CheckpointTensor, shard_id: Any = None
    ) -> None:
        size = max(0, min(self.rows_per_rank, self.vocab_size - self.vocab_start))
        if size < self.rows_per_rank:
            param[size:].zero_()
        if size:
            load_slice(param, loaded, 0, self.vocab_start, size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [T] -> [T, D]
        if self.group.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.group.all_reduce(x)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits, split by vocabulary rows like the embedding
    (so the two can share one weight when the checkpoint ties them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, D] -> logits [N, V]
        logits = F.linear(x, self.weight)  # [N, V / world]
        return self.group.all_gather(logits, dim=-1)[:, : self.vocab_size]
