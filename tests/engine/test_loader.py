"""Checkpoint loading: sharded files, tensor-parallel slices, clear errors."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from engine.backends.native import NativeBackend
from engine.config import EngineConfig
from engine.distributed import ParallelGroup
from engine.executor.loader import build_model, load_weights, materialise
from engine.layers.attention import TorchPagedAttention
from engine.request import SamplingParams


def greedy(path: Path, prompt: list[int], drive: Callable[..., Any]) -> list[int]:
    config = EngineConfig(
        model_path=str(path),
        dtype="float32",
        device="cpu",
        max_model_len=64,
        max_num_seqs=2,
        block_size=4,
    )
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    return list(drive(NativeBackend(config), [("r", prompt, params, 1)])["r"].token_ids)


def test_multi_file_checkpoint(
    checkpoint: Callable[[str], Path], tmp_path: Path, drive: Callable[..., Any]
) -> None:
    source = checkpoint("qwen2")
    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    model.save_pretrained(str(sharded), max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, sharded / name)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert (sharded / "model.safetensors.index.json").exists()
    prompt = list(range(20, 35))
    assert greedy(sharded, prompt, drive) == greedy(source, prompt, drive)


class _FakeProcessGroup:
    """Stands in for a torch.distributed group: loading never communicates."""


@pytest.mark.parametrize("variant", ["qwen2", "llama"])
def test_tensor_parallel_slices(variant: str, checkpoint: Callable[[str], Path]) -> None:
    path = checkpoint(variant)
    hf_config = AutoConfig.from_pretrained(str(path))
    full = load_file(str(path / "model.safetensors"))
    world = 2
    ranks = []
    for rank in range(world):
        group = ParallelGroup(rank, world, _FakeProcessGroup())
        model = build_model(hf_config, group, TorchPagedAttention(), max_positions=32)
        materialise(model, torch.device("cpu"), torch.float32)
        load_weights(model, path)
        ranks.append(dict(model.named_parameters()))

    prefix = "model.layers.0."
    for rank, params in enumerate(ranks):
        qkv = params[prefix + "self_attn.qkv_proj.weight"]
        q, k = full[prefix + "self_attn.q_proj.weight"], full[prefix + "self_attn.k_proj.weight"]
        q_rows, kv_rows = q.shape[0] // world, k.shape[0] // world
        torch.testing.assert_close(qkv[:q_rows], q[rank * q_rows : (rank + 1) * q_rows])
        torch.testing.assert_close(
            qkv[q_rows : q_rows + kv_rows], k[rank * kv_rows : (rank + 1) * kv_rows]
        )
        if variant == "qwen2":
            v_bias = full[prefix + "self_attn.v_proj.bias"]
            torch.testing.assert_close(
                params[prefix + "self_attn.qkv_proj.bias"][-kv_rows:],
                v_bias[rank * kv_rows : (rank + 1) * kv_rows],
            )
    # Row-parallel and vocabulary-parallel weights put back together are the full tensors.
    for ours, theirs, dim in [
        ("self_attn.o_proj.weight", "self_attn.o_proj.weight", 1),
        ("mlp.down_proj.weight", "mlp.down_proj.weight", 1),
    ]:
        joined = torch.cat([r[prefix + ours] for r in ranks], dim=dim)
        torch.testing.assert_close(joined, full[prefix + theirs])
    up = torch.cat([r[prefix + "mlp.gate_up_proj.weight"].chunk(2)[1] for r in ranks])
    torch.testing.assert_close(up, full[prefix + "mlp.up_proj.weight"])
    embed = torch.cat([r["model.embed_tokens.weight"] for r in ranks])
    torch.testing.assert_close(embed, full["model.embed_tokens.weight"])


def test_missing_tensor_is_named(checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    source = checkpoint("llama")
    tensors = load_file(str(source / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    hf_config = AutoConfig.from_pretrained(str(source))
    model = build_model(hf_config, ParallelGroup(), TorchPagedAttention(), max_positions=32)
    materialise(model, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="model.layers.1.mlp.gate_up_proj.weight"):
        load_weights(model, tmp_path)
