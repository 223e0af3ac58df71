"""The int8 Triton kernels (engine.kernels.int8_matmul) and their dispatch
(engine.layers.quant) against the dequantise-and-matmul reference.

On CPU the kernels run in Triton's interpreter. The interpreter is chosen when triton is first
imported (TRITON_INTERPRET=1), and this test process has imported it already (engine.layers.quant
pulls in the kernels), so the interpreted check runs `check_kernels` in a child process with
the variable set; nothing leaks into the other tests. On CUDA (`gpu` marker) the same check
runs in-process, plus the dispatch and a CUDA-graph capture.

Tolerance, against a float64 reference of the same int8 weights and scales: |y - ref| <=
atol + rtol * |ref| with (rtol, atol) float32 (1e-5, 1e-4), float16 (2e-3, 1e-2), bfloat16
(1e-2, 1e-2): the output's own rounding (bfloat16 keeps 8 bits, 2^-8 relative at best, and the
interpreter truncates rather than rounds) plus fp32 accumulation over K <= 300.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.layers.quant import TRITON_MAX_M, int8_linear, int8_linear_reference

pytest.importorskip("triton")

from engine.kernels.gemv import GemvConfig  # noqa: E402
from engine.kernels.int8_matmul import KernelConfig, int8_linear_triton  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]

TOLERANCE = {  # dtype -> (rtol, atol)
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1e-2, 1e-2),
}
# (M, N, K): M rows of x (decode 1 and 3 take the GEMV kernel, 17 and 64 the tl.dot kernel);
# N and K multiples of no block size, so every edge mask is exercised.
SHAPES = [(1, 45, 200), (3, 45, 200), (17, 37, 300), (64, 70, 136)]
# Explicit configurations: K a multiple of block_k (the unmasked EVEN_K loop), block_k past K
# (the GEMV's single masked step), a tl.dot block of fewer rows than x (several programs
# along M).
CONFIG_CASES: list[tuple[int, int, int, KernelConfig | GemvConfig]] = [
    (1, 45, 256, GemvConfig(4, 64)),
    (4, 45, 256, GemvConfig(8, 128)),
    (2, 45, 200, GemvConfig(2, 256)),
    (20, 45, 256, KernelConfig(16, 16, 32)),
    (5, 45, 200, KernelConfig(16, 16, 64)),
]


def make_case(
    m: int, n: int, k: int, dtype: torch.dtype, device: str, bias: bool, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [m, k], int8 weight [n, k], scales [n] (float32, as a row absmax / 127 would give),
    bias [n] or None."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    qweight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(device)
    scale = (torch.rand(n, generator=gen) + 0.5).div(127).to(device)
    b = torch.randn(n, generator=gen).to(device, dtype) if bias else None
    return x, qweight, scale, b


def exact(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    # float64 dequantise-and-matmul: [M, K] x [N, K] -> [M, N]
    y = (x.double() @ qweight.double().T) * scale.double()
    return y if bias is None else y + bias.double()


def check_kernels(device: str, dtypes: tuple[torch.dtype, ...]) -> list[str]:
    """Every case in SHAPES and CONFIG_CASES, with and without bias: the list of failures."""
    failures = []
    cases = [(m, n, k, None) for m, n, k in SHAPES] + CONFIG_CASES
    for dtype in dtypes:
        rtol, atol = TOLERANCE[dtype]
        for m, n, k, config in cases:
            for bias in (False, True):
                x, qweight, scale, b = make_case(m, n, k, dtype, device, bias)
                y = int8_linear_triton(x, qweight, scale, b, config=config)
                ref = exact(x, qweight, scale, b)
                error = (y.double() - ref).abs()
                excess = float((error - atol - rtol * ref.abs()).max())
                if y.shape != (m, n) or y.dtype != dtype or not excess <= 0:
                    failures.append(
                        f"{dtype} M={m} N={n} K={k} bias={bias} {config}: "
                        f"shape {tuple(y.shape)} {y.dtype}, max error {float(error.max()):.3g}"
                    )
    return failures


def test_kernels_match_reference_in_interpreter() -> None:
    pytest.importorskip("triton")
    code = (
        "import sys, torch, runpy\n"
        f"check = runpy.run_path({str(Path(__file__))!r})['check_kernels']\n"
        "failures = check('cpu', (torch.float32, torch.bfloat16, torch.float16))\n"
        "print('\\n'.join(failures))\n"
        "sys.exit(1 if failures else 0)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


def test_cpu_dispatch_is_the_reference() -> None:
    for m, n, k in SHAPES:
        x, qweight, scale, b = make_case(m, n, k, torch.bfloat16, "cpu", True)
        assert torch.equal(
            int8_linear(x, qweight, scale, b), int8_linear_reference(x, qweight, scale, b)
        )
        x3 = x.reshape(1, m, k)
        assert torch.equal(
            int8_linear(x3, qweight, scale), int8_linear_reference(x3, qweight, scale)
        )


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_kernels_match_reference_on_cuda() -> None:
    failures = check_kernels("cuda", (torch.bfloat16, torch.float16))
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 33, 256, 300])
def test_cuda_dispatch_on_model_shapes(m: int) -> None:
    """The dispatch (GEMV, tl.dot, dequantise-and-matmul above 256 rows) on a 1b-shaped
    layer (K 2048 -> N 3072, divisible by every block) with bf16 scales, as the loader
    leaves them."""
    x, qweight, scale, b = make_case(m, 3072, 2048, torch.bfloat16, "cuda", True)
    scale = scale.bfloat16()
    y = int8_linear(x, qweight, scale, b)
    if m > TRITON_MAX_M:
        # Prefill-sized: the plain PyTorch path itself (bf16 matmul, then scale, then bias,
        # each rounded to bf16: its accuracy is that path's, not a kernel's).
        assert torch.equal(y, int8_linear_reference(x, qweight, scale, b))
        return
    ref = exact(x, qweight, scale, b)
    # K = 2048 sums in fp32 in another order than cuBLAS: same bf16 output bound.
    rtol, atol = TOLERANCE[torch.bfloat16]
    assert float((((y.double() - ref).abs()) - atol - rtol * ref.abs()).max()) <= 0


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_capture() -> None:
    x, qweight, scale, b = make_case(1, 2048, 2048, torch.bfloat16, "cuda", True)
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compiles the kernel before capturing
        int8_linear(static_x, qweight, scale, b)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = int8_linear(static_x, qweight, scale, b)
    fresh = torch.randn_like(x)
    static_x.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_y, int8_linear(fresh, qweight, scale, b), rtol=0, atol=0)
