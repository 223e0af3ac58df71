"""Linear layers that hold their tensor-parallel slice, and the checkpoint slicing they load
through.

Each layer knows which part of the full checkpoint tensor belongs to its rank and loads just
that part through `weight_loader`. At group size 1 every collective is a no-op, so the same
model code serves one GPU, CPU tests and a sharded group (engine.distributed).

Kernels are the layer's choice, made when it is built: with `triton`, decode-sized inputs run
through engine.kernels.gemv where it suits the weight (with the norm or the activation before
the layer computed inside the kernel: `norm_forward`, `silu_mul_forward`); otherwise, and on
the CPU, torch's matmul (int8 weights through engine.layers.quant).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import ParallelGroup
from engine.layers.activation import SiluAndMul
from engine.layers.norm import RMSNorm
from engine.layers.quant import int8_linear

# A checkpoint tensor as the loader hands it over: a torch.Tensor, or a lazily read
# safetensors slice (anything indexable by a tuple of slices that yields a torch.Tensor).
CheckpointTensor = Any


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


def _gemv_kernels() -> Any:
    """engine.kernels.gemv, imported on first use (the CPU path never needs Triton)."""
    from engine.kernels import gemv

    return gemv


class LinearBase(nn.Module):
    """y = x W^T + b with W: [output_size, input_size] as stored locally.

    After `quantize_int8` the weight is int8 with one scale per output row (weight-only
    quantisation: activations stay in the model dtype).

    With `triton` (the GPU path), decode-sized inputs take engine.kernels.gemv where it suits
    the weight; the CPU path never imports Triton.
    """

    weight_scale: nn.Parameter | None

    def __init__(self, input_size: int, output_size: int, bias: bool, triton: bool = False):
        super().__init__()
        self.triton = triton
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

    def takes_gemv(self, x: torch.Tensor, silu_mul: bool = False) -> bool:
        """Whether x ([T, in]; [T, 2 * in], gate | up, with silu_mul) runs through the GEMV
        kernel (see gemv_forward)."""
        return (
            self.triton and x.dim() == 2
            and _gemv_kernels().suits(x.shape[0], self.weight, silu_mul)
        )  # fmt: skip

    def takes_fused_gemv(self, x: torch.Tensor, silu_mul: bool = False) -> bool:
        """Whether x runs through the GEMV kernel with the layer before fused in."""
        return self.takes_gemv(x, silu_mul) and _gemv_kernels().fuses_input(self.weight)

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
        norm_weight, or SiLU(gate) * up (engine.kernels.gemv.gemv).

        x: [T, in] ([T, 2 * in] with silu_mul) -> ([T, out], x + residual or None)."""
        return _gemv_kernels().gemv(
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

    def norm_forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer applied to norm(x + residual) (norm(x) when residual is None), and the
        residual stream x + residual (x itself when None): the add and the norm run inside the
        GEMV kernel where it takes x (decode), else as the norm's own.

        x, residual: [T, in] -> ([T, out], [T, in])"""
        if self.takes_fused_gemv(x):
            y, summed = self.gemv_forward(
                x, norm_weight=norm.weight, eps=norm.eps, residual=residual
            )
            return y, x if summed is None else summed
        if residual is None:
            return self(norm(x)), x
        h, residual = norm.add_forward(x, residual)
        return self(h), residual


class ColumnParallelLinear(LinearBase):
    """Output features split over ranks; no communication (the next layer takes the slice)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        group: ParallelGroup,
        triton: bool = False,
    ):
        self.group = group
        super().__init__(input_size, group.split(output_size, "output features"), bias, triton)

    def weight_loader(
        self, param: torch.Tensor, loaded: CheckpointTensor, shard_id: Any = None
    ) -> None:
        size = param.shape[0]
        self.load_part(param, loaded, 0, self.group.rank * size, size)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate and up).

    The checkpoint stores them apart; shard_id i is the i-th of `output_sizes`.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool,
        group: ParallelGroup,
        triton: bool = False,
    ):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, group, triton)

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
        triton: bool = False,
    ):
        self.num_heads = group.split(num_heads, "attention heads")
        self.num_kv_heads = group.split(num_kv_heads, "key/value heads")
        self.head_dim = head_dim
        size = (num_heads + 2 * num_kv_heads) * head_dim
        super().__init__(hidden_size, size, bias, group, triton)

    def weight_loader(
        self, param: torch.Tensor, loaded: CheckpointTensor, shard_id: Any = None
    ) -> None:
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        self.load_part(param, loaded, 0, self.group.rank * size, size, offset)


class RowParallelLinear(LinearBase):
    """Input features split over ranks; partial outputs summed over the group."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool,
        group: ParallelGroup,
        triton: bool = False,
    ):
        self.group = group
        super().__init__(group.split(input_size, "input features"), output_size, bias, triton)

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

    def silu_mul_forward(self, gate_up: torch.Tensor, act: SiluAndMul) -> torch.Tensor:
        """This layer applied to act(gate_up) = SiLU(gate) * up: computed inside the GEMV
        kernel where it takes the input (decode), else by the activation layer.

        gate_up: [T, 2 * in / world] -> [T, out]"""
        if self.takes_fused_gemv(gate_up, silu_mul=True):
            return self._reduce(self.gemv_forward(gate_up, with_bias=False, silu_mul=True)[0])
        return self(act(gate_up))

    def add_norm_forward(
        self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(y + residual), y + residual) for y = this layer applied to x: where the
        group's push all-reduce takes the partial sum, the sum, the residual add and the norm
        are one kernel (engine.kernels.all_reduce), else the norm's own after the sum.

        x: [T, in / world], residual: [T, out] -> ([T, out], [T, out])"""
        partial = self.matmul(x)
        if self.bias is None and norm.triton and self.group.fuses_add_norm(partial):
            return self.group.all_reduce_add_norm(partial, residual, norm.weight, norm.eps)
        return norm.add_forward(self._reduce(partial), residual)

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        # partial: [T, out], this rank's share -> the sum over the group, plus the bias once
        y = self.group.all_reduce(partial)
        if self.bias is not None:
            y = y + self.bias
        return y
