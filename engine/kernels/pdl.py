"""Programmatic dependent launch (PDL) for the decode step's Triton kernels.

Inside a CUDA graph a decode step is a chain of ~100 short kernels, and each one normally
starts only after the previous one has drained: a few microseconds of launch and ramp per
kernel that the memory bus spends idle. On Hopper and later GPUs a kernel launched with the PDL
attribute may start while its predecessor is still running; it must then wait
(`griddepcontrol.wait`, Triton's `gdc_wait`) before it touches anything an earlier kernel
writes or reads. Our kernels follow one rule: before the wait they only read weights (which no
kernel of the step writes), so the next matmul's weights are already on their way while the
previous kernel finishes. When the next kernel may launch (`gdc_launch_dependents`) is each
kernel's choice: the short ones (norms, rotary, attention: a few programs) allow it at their
start, so the matmul after them is resident and reading weights on the idle SMs; the matmuls
(thousands of programs) only after their main loop, so that the next kernel's programs do not
take SM slots their own later programs need.

A kernel launched without the attribute (cuBLAS, PyTorch's own) simply starts after its
predecessor as usual, so the chain may mix both. Off on other GPUs, on the CPU and in Triton's
interpreter, where the kernels run exactly as before.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import triton
import triton.language as tl

# Hopper (compute capability 9.0) introduced programmatic dependent launch.
MIN_CAPABILITY = (9, 0)


@functools.cache
def _supported(index: int) -> bool:
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on"):
        return False
    if os.environ.get("TIDEQ_DISABLE_PDL", "0") == "1":  # a switch to measure it against
        return False
    return torch.cuda.get_device_capability(index) >= MIN_CAPABILITY


def launch_options(device: torch.device) -> dict[str, Any]:
    """Keyword arguments for a Triton launch on `device`: the kernel's USE_PDL constexpr, and
    Triton's launch_pdl option where the GPU supports it."""
    if device.type != "cuda" or not _supported(device.index or torch.cuda.current_device()):
        return {"USE_PDL": False}
    return {"USE_PDL": True, "launch_pdl": True}


@triton.jit
def allow_next_then_wait(USE_PDL: tl.constexpr):
    """The start of a short kernel: let the next kernel launch now, then wait until the
    previous one has finished and its writes are visible."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
