"""Weight-only int8 linear layers' matmul: y = (x W^T) * scale + b with W held as int8, one
scale per row, on the fastest path for the input.

On CUDA, decode-sized inputs (at most `TRITON_MAX_M` rows) run the Triton kernels of
engine.kernels.int8_matmul, which dequantise inside the matmul. Prefill-sized inputs (more
than `TRITON_MAX_M` rows) are compute-bound: they dequantise to the activation dtype and use
torch's matmul. Without CUDA (and without Triton) every call takes that plain PyTorch path,
`int8_linear_reference`. Neither path syncs with the host, so both can be captured in a CUDA
graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from engine.kernels.int8_matmul import int8_linear_triton
except ImportError:  # CPU-only installs: the reference path serves every call
    int8_linear_triton = None  # type: ignore[assignment]

# Rows of x up to which the Triton kernels serve a call; above, the matmul is compute-bound
# and torch's own (cuBLAS) matmul on the dequantised weight is at least as fast.
TRITON_MAX_M = 256
# Activation dtypes the kernels take on CUDA (float32 would go through tf32 in tl.dot).
KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def int8_linear_reference(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Dequantise-and-matmul in plain PyTorch (the CPU path, and the kernels' reference).

    x: [..., K]; qweight: [N, K] int8; scale: [N]; bias: [N] or None -> [..., N] in x.dtype.
    """
    y = F.linear(x, qweight.to(x.dtype)) * scale
    return y if bias is None else y + bias


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x W^T * scale + bias for a weight-only int8 W, on the fastest path for the input.

    x: [..., K] bf16/fp16/fp32; qweight: [N, K] int8; scale: [N]; bias: [N] or None
    -> [..., N] in x.dtype.
    """
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    kernel = int8_linear_triton
    if kernel is None or not x.is_cuda or x.dtype not in KERNEL_DTYPES or not 0 < m <= TRITON_MAX_M:
        return int8_linear_reference(x, qweight, scale, bias)
    return kernel(x, qweight, scale, bias)
