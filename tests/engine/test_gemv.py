"""The decode GEMV kernel (engine.kernels.gemv) and the two-stage argmax (engine.kernels.argmax)
against plain PyTorch: every input transform, bias, int8 weights, masked edges, the dispatch
rule. On the CPU the kernels run in Triton's interpreter, in a subprocess (TRITON_INTERPRET
must not leak into other tests)."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton_interpreter import run_in_interpreter  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def check_gemv(device: str, dtype: torch.dtype) -> None:
    from engine.kernels import elementwise
    from engine.kernels.gemv import GemvConfig, gemv

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    tol = TOLERANCE[dtype]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dev, dtype)

    def close(got: torch.Tensor, want: torch.Tensor) -> None:
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)

    # N and K multiples of no block (masked edges), and a block_k past K (one masked step).
    for n, k, config in [(37, 200, GemvConfig(2, 64)), (64, 128, GemvConfig(4, 256)),
                         (16, 96, None)]:  # fmt: skip
        for m in (1, 2, 3, 4):
            x, w, b = rand(m, k), rand(n, k) / k**0.5, rand(n)
            close(gemv(x, w, config=config)[0], F.linear(x, w))
            close(gemv(x, w, b, config=config)[0], F.linear(x, w, b))

            # RMSNorm(x + residual) * weight in front, as the fused layers compute it
            res, norm_w = rand(m, k), rand(k)
            h, summed = elementwise.rms_norm(x, norm_w, 1e-5, res)
            got, got_sum = gemv(x, w, b, norm_weight=norm_w, eps=1e-5, residual=res,
                                config=config)  # fmt: skip
            assert got_sum is not None
            torch.testing.assert_close(got_sum, summed, atol=0, rtol=0)
            close(got, F.linear(h, w, b))
            got, no_sum = gemv(x, w, norm_weight=norm_w, eps=1e-5, config=config)
            assert no_sum is None
            close(got, F.linear(elementwise.rms_norm(x, norm_w, 1e-5)[0], w))

            # SiLU(gate) * up in front
            gate_up = rand(m, 2 * k)
            close(gemv(gate_up, w, silu_mul=True, config=config)[0],
                  F.linear(elementwise.silu_and_mul(gate_up), w))  # fmt: skip

            # int8 weight with row scales, with the norm in front
            q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8).to(dev)
            scale = (torch.rand(n, generator=gen) / 127 / k**0.5).to(dev, dtype)
            want = F.linear(h.float(), q.float()) * scale.float() + b.float()
            got = gemv(x, q, b, scale, norm_weight=norm_w, eps=1e-5, residual=res,
                       config=config)[0]  # fmt: skip
            close(got, want)

    x, w = rand(5, 16), rand(8, 16)
    for bad, message in [
        (lambda: gemv(x, w), "1..4 rows"),
        (lambda: gemv(x[:1, :8], w), "does not fit"),
        (lambda: gemv(x[:1], w, silu_mul=True), "does not fit"),
        (lambda: gemv(x[:1], w, residual=x[:1]), "residual"),
    ]:
        with pytest.raises(ValueError, match=message):
            bad()


def check_argmax(device: str) -> None:
    from engine.kernels.argmax import BLOCK, argmax

    gen = torch.Generator().manual_seed(0)
    vocab = 3 * BLOCK + 77  # a last block that is mostly padding
    logits = torch.randn(4, vocab, generator=gen).to(device, torch.bfloat16)
    logits[1, vocab - 1] = 50.0  # in the padded last block
    logits[2, 5] = logits[2, BLOCK + 5] = 60.0  # a tie across blocks: the lower index wins
    logits[3, 10] = logits[3, 11] = 70.0  # a tie within a block
    got = argmax(logits)
    assert got.tolist() == logits.argmax(dim=-1).tolist() == [got[0].item(), vocab - 1, 5, 10]
    assert argmax(logits[:0]).shape == (0,)


def test_kernels_match_torch_on_cpu_interpreter() -> None:
    run_in_interpreter(
        __file__,
        "t.check_gemv('cpu', torch.float32); t.check_argmax('cpu')",
        "t.check_gemv('cpu', torch.bfloat16)",
    )


def test_dispatch_rule() -> None:
    from engine.kernels.gemv import (
        MAX_ELEMENTS,
        MAX_ELEMENTS_SILU_MUL,
        MAX_ROWS,
        fuses_input,
        suits,
    )

    def bf16_of(numel: int) -> torch.Tensor:
        return torch.empty(1, dtype=torch.bfloat16).expand(numel // 1024, 1024)

    bf16 = torch.empty(1, dtype=torch.bfloat16).expand(2048, 2048)
    big = bf16_of(MAX_ELEMENTS + 1024)
    int8 = torch.empty(1, dtype=torch.int8).expand(16384, 2048)
    assert suits(1, bf16) and not suits(2, bf16) and not suits(0, bf16)
    assert not suits(1, big)  # cuBLAS streams large matrices as fast
    # ... but the activation fused in front saves a kernel, up to a larger size
    assert suits(1, big, silu_mul=True) and suits(1, bf16_of(MAX_ELEMENTS_SILU_MUL), True)
    assert not suits(1, bf16_of(MAX_ELEMENTS_SILU_MUL + 1024), silu_mul=True)
    assert suits(MAX_ROWS, int8) and not suits(MAX_ROWS + 1, int8)
    assert fuses_input(bf16) and not fuses_input(int8)  # int8: norm and activation apart


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_match_torch_on_gpu() -> None:
    check_gemv("cuda", torch.float32)
    check_gemv("cuda", torch.bfloat16)
    check_argmax("cuda")
