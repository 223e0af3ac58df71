"""RMSNorm, with the residual add before it (`add_forward`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _elementwise() -> Any:
    """engine.kernels.elementwise, imported on first use (the CPU path never needs Triton)."""
    from engine.kernels import elementwise

    return elementwise


class RMSNorm(nn.Module):
    """weight * x / rms(x) over the last dim: normalised in float32, scaled in the model dtype.

    With `triton` (the GPU path) one kernel of engine.kernels.elementwise does the add and the
    norm; it rounds where this PyTorch code rounds.
    """

    def __init__(self, dim: int, eps: float, triton: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.triton = triton
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D]; normalised in float32, scaled in the model dtype.
        if self.triton:
            return _elementwise().rms_norm(x, self.weight, self.eps)[0]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual: [T, D] -> (norm(x + residual), x + residual)."""
        if self.triton:
            out, summed = _elementwise().rms_norm(x, self.weight, self.eps, residual)
            assert summed is not None
            return out, summed
        summed = residual + x
        return self.forward(summed), summed
