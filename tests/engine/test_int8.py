"""Weight-only int8: per-row quantisation of the linear layers, bfloat16 activations."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine.config import EngineConfig
from engine.native_backend import NativeBackend
from engine.parallel import ColumnParallelLinear, ParallelGroup, RowParallelLinear
from engine.request import SamplingParams


def test_quantised_linear_close_to_full_precision() -> None:
    torch.manual_seed(0)
    weight, bias, x = torch.randn(8, 16), torch.randn(8), torch.randn(3, 16)
    for cls in (ColumnParallelLinear, RowParallelLinear):
        layer = cls(16, 8, True, ParallelGroup())
        layer.quantize_int8()
        layer.weight_loader(layer.weight, weight)
        layer.weight_loader(layer.bias, bias)
        assert layer.weight.dtype == torch.int8 and layer.weight_scale is not None
        scale = layer.weight_scale.unsqueeze(1)
        error = (layer.weight.float() * scale - weight).abs()
        assert bool((error <= scale / 2 + 1e-6).all())  # rounding to the nearest step
        torch.testing.assert_close(layer(x), F.linear(x, weight, bias), rtol=0.02, atol=0.05)


def test_int8_backend_follows_full_precision(
    checkpoint: Callable[[str], Path], prompts: list[list[int]], drive: Callable[..., Any]
) -> None:
    path = checkpoint("qwen2")
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    requests = [(f"r{i}", p, params, 1) for i, p in enumerate(prompts)]
    outputs = {}
    for dtype in ("float32", "int8"):
        config = EngineConfig(
            model_path=str(path),
            dtype=dtype,
            device="cpu",
            max_model_len=128,
            max_num_seqs=8,
            block_size=4,
        )
        backend = NativeBackend(config)
        if dtype == "int8":
            linear = backend.runner.model.model.layers[0].mlp.down_proj
            assert linear.weight.dtype == torch.int8
            assert backend.runner.kv_cache.dtype == torch.bfloat16
        outputs[dtype] = drive(backend, requests)
    # Quantisation and bfloat16 shift the logits a little: most first tokens still agree.
    agree = sum(
        outputs["int8"][r[0]].token_ids[0] == outputs["float32"][r[0]].token_ids[0]
        for r in requests
    )
    assert agree >= len(requests) - 2
