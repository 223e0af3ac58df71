"""The fused Triton layers (engine.kernels.elementwise) against the model's PyTorch layers: residual
add + RMSNorm, rotary embedding fused with the KV-cache write, SiLU(gate) * up.
On the CPU they run in Triton's interpreter, in a subprocess (TRITON_INTERPRET must not leak
into other tests)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton_interpreter import run_in_interpreter  # noqa: E402

from engine.layers.attention import write_kv  # noqa: E402
from engine.layers.norm import RMSNorm  # noqa: E402
from engine.layers.rotary import RotaryEmbedding, apply_rotary  # noqa: E402


def check_against_torch(device: str, dtype: torch.dtype, atol: float) -> None:
    from engine.kernels import elementwise

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dev, dtype)

    # residual add + RMSNorm, hidden size not a power of two
    t, d = 5, 48
    norm = RMSNorm(d, 1e-5).to(dev)
    norm.weight.data = rand(d)
    x, res = rand(t, d), rand(t, d)
    want_sum = res + x
    want = norm(want_sum)
    got, got_sum = elementwise.rms_norm(x, norm.weight, 1e-5, res)
    torch.testing.assert_close(got_sum, want_sum, atol=0, rtol=0)
    torch.testing.assert_close(got, want, atol=atol, rtol=atol)
    torch.testing.assert_close(elementwise.rms_norm(x, norm.weight, 1e-5)[0], norm(x),
                               atol=atol, rtol=atol)  # fmt: skip

    check_rotary_and_cache(dev, dtype, atol, rand)

    # SiLU(gate) * up, a width that does not divide into the kernel's blocks
    gate_up = rand(t, 2 * 1100)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(elementwise.silu_and_mul(gate_up), F.silu(gate) * up,
                               atol=atol, rtol=atol)  # fmt: skip


def check_rotary_and_cache(
    dev: torch.device, dtype: torch.dtype, atol: float, rand: Callable[..., torch.Tensor]
) -> None:
    """rotary_and_cache_ against the model's PyTorch rotary then write_kv: q rotated in place,
    rotated keys and the values (bit for bit) at their slots, every other slot untouched;
    q, k, v are views of one fused projection, the slots in shuffled order."""
    from engine.kernels import elementwise

    t, heads, kv_heads, head_dim = 5, 6, 2, 16
    rope = RotaryEmbedding(head_dim, 64, {"rope_type": "default", "rope_theta": 10000.0})
    rope = rope.to(dev)
    rope.init_buffers()
    num_blocks, block_size = 4, 4
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    qkv = rand(t, sum(sizes))
    positions = torch.tensor([0, 3, 17, 40, 63], device=dev)
    gen = torch.Generator().manual_seed(1)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:t].to(dev)
    caches = rand(2, num_blocks, block_size, kv_heads, head_dim)

    q, k, v = qkv.split(sizes, dim=-1)  # [T, *] views with row stride sum(sizes)
    q, k, v = (x.reshape(t, -1, head_dim) for x in (q, k, v))
    cos, sin = rope(positions, dtype)
    want_q = apply_rotary(q, cos, sin)
    want_k_cache, want_v_cache = caches[0].clone(), caches[1].clone()
    write_kv(want_k_cache, want_v_cache, slots, apply_rotary(k, cos, sin), v)

    q, k, v = qkv.clone().split(sizes, dim=-1)
    q, k, v = q.view(t, heads, head_dim), k.view(t, kv_heads, head_dim), v.view(t, kv_heads, -1)
    k_cache, v_cache = caches[0].clone(), caches[1].clone()
    elementwise.rotary_and_cache_(q, k, v, positions, rope.cos, rope.sin, k_cache, v_cache, slots)
    torch.testing.assert_close(q, want_q, atol=atol, rtol=atol)
    torch.testing.assert_close(k_cache, want_k_cache, atol=atol, rtol=atol)
    torch.testing.assert_close(v_cache, want_v_cache, atol=0, rtol=0)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=dev)
    untouched[slots] = False
    flat = k_cache.view(-1, kv_heads, head_dim)
    assert torch.equal(flat[untouched], caches[0].view(-1, kv_heads, head_dim)[untouched])


def test_fused_layers_match_torch_on_cpu_interpreter() -> None:
    run_in_interpreter(__file__, "t.check_against_torch('cpu', torch.float32, 1e-5)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_layers_match_torch_on_gpu() -> None:
    check_against_torch("cuda", torch.float32, 1e-5)
    check_against_torch("cuda", torch.bfloat16, 2e-2)
