"""The layer split on CPU: two gloo ranks, each holding half of the layers (rank 0 also the
embedding, rank 1 the final norm and the head), generate the same tokens as one rank and as
transformers, greedy and seeded, also under preemption and with prefix caching.

The ranks are spawned once for the file and run every case (test_parallel.run_group).
"""

from __future__ import annotations

import faulthandler
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_parallel import (
    PROMPTS,
    VARIANTS,
    WORLD,
    Case,
    HfGreedy,
    check_standard_cases,
    engine_config,
    exit_on_error,
    generate,
    greedy_requests,
    run_group,
    standard_cases,
)
from transformers import AutoConfig

from engine.backends.native import NativeBackend
from engine.distributed import ParallelGroup, layer_range
from engine.executor.loader import build_model, load_weights, materialise
from engine.layers.attention import TorchPagedAttention


@pytest.fixture(scope="module")
def layer_results(
    checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    paths = {v: checkpoint(v) for v in VARIANTS}
    return run_group("layer", standard_cases(), paths, tmp_path_factory.mktemp("layer"))


def test_layer_split_matches_one_rank_and_hf(
    layer_results: list[dict[str, Any]],
    checkpoint: Callable[[str], Path],
    hf_greedy: HfGreedy,
) -> None:
    # Each layer runs whole on one rank, so the arithmetic is one rank's: seeded sampling
    # gives one rank's tokens too.
    check_standard_cases(layer_results, checkpoint, hf_greedy, exact_sampling=True)


def test_each_rank_holds_its_layers_and_their_cache(
    layer_results: list[dict[str, Any]],
) -> None:
    for variant in VARIANTS:
        first, last = (r[f"greedy-{variant}"] for r in layer_results)
        # [layers, keys/values, blocks, block_size, Hkv, Dh]: one of the two layers each,
        # with all of its heads.
        assert first["kv_cache_shape"][0] == last["kv_cache_shape"][0] == 1
        assert first["kv_cache_shape"][4] == last["kv_cache_shape"][4] == 2
        assert "model.embed_tokens.weight" in first["params"]
        assert not any(p.startswith(("lm_head.", "model.norm.")) for p in first["params"])
        assert {"lm_head.weight", "model.norm.weight"} <= set(last["params"])
        assert "model.embed_tokens.weight" not in last["params"]
        assert all(p.startswith("model.layers.0.") for p in first["params"] if "layers" in p)
        assert all(p.startswith("model.layers.1.") for p in last["params"] if "layers" in p)


class _FakeProcessGroup:
    """Stands in for a torch.distributed group: loading never communicates."""


def split_params(path: Path, world: int, rank: int) -> dict[str, torch.Tensor]:
    hf_config = AutoConfig.from_pretrained(str(path))
    group = ParallelGroup(rank, world, _FakeProcessGroup())
    model = build_model(hf_config, group, TorchPagedAttention(), 32, split_layers=True)
    materialise(model, torch.device("cpu"), torch.float32)
    load_weights(model, path)
    return dict(model.named_parameters())


FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def checkpoint_names(name: str) -> list[str]:
    """The checkpoint tensors a parameter holds, in order (several for a fused projection)."""
    for fused, parts in FUSED.items():
        if f".{fused}." in name:
            return [name.replace(fused, part) for part in parts]
    return [name]


@pytest.mark.parametrize("variant", ["llama", "qwen2"])
def test_each_rank_loads_only_its_layers(variant: str, checkpoint: Callable[[str], Path]) -> None:
    """Every layer tensor is loaded on exactly one rank, whole, with the checkpoint's values;
    the last rank's head is the checkpoint's head, or with tied embeddings (llama) the
    embedding table it loads for itself."""
    path = checkpoint(variant)
    ckpt = load_file(str(path / "model.safetensors"))
    tied = AutoConfig.from_pretrained(str(path)).tie_word_embeddings
    ranks = [split_params(path, WORLD, rank) for rank in range(WORLD)]
    seen: dict[str, int] = {}
    for rank, params in enumerate(ranks):
        for name, param in params.items():
            seen[name] = seen.get(name, 0) + 1
            if name == "lm_head.weight" and tied:
                want = ckpt["model.embed_tokens.weight"]
            else:
                want = torch.cat([ckpt[n] for n in checkpoint_names(name)])
            torch.testing.assert_close(param, want, msg=f"rank {rank}: {name}")
    layer_tensors = {n for n in seen if n.startswith("model.layers.")}
    assert all(seen[n] == 1 for n in layer_tensors)
    assert {n.split(".")[2] for n in ranks[0] if n.startswith("model.layers.")} == {"0"}
    assert {n.split(".")[2] for n in ranks[1] if n.startswith("model.layers.")} == {"1"}
    assert "lm_head.weight" in ranks[1] and "lm_head.weight" not in ranks[0]


def test_layers_are_balanced_and_consecutive() -> None:
    for num_layers, world in [(2, 2), (7, 3), (32, 3), (10, 4), (5, 5)]:
        ranges = [layer_range(num_layers, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == num_layers
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        counts = [end - start for start, end in ranges]
        assert max(counts) - min(counts) <= 1 and min(counts) >= 1
    with pytest.raises(ValueError, match="at least one layer per rank"):
        layer_range(2, 0, 3)


# ---- GPU: NCCL ranks, eager ---------------------------------------------------------------


def _gpu_rank_main(rank: int, world: int, rendezvous: str, path: str, out: str) -> None:
    # A rank stuck in a collective prints where, and exits, rather than hanging the test.
    faulthandler.dump_traceback_later(150, exit=True)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{rendezvous}", rank=rank, world_size=world)

    def body() -> None:
        group = ParallelGroup(rank, world, dist.group.WORLD)
        settings = dict(device="cuda", kv_cache_memory_fraction=0.01)
        config = engine_config(path, settings, "layer", world)
        config.distributed_backend = "nccl"
        backend = NativeBackend(config, group)
        assert backend.runner.device == torch.device("cuda", rank)
        assert backend.runner.graphs is None  # the layer split runs eagerly
        tokens = generate(backend, greedy_requests(PROMPTS), stagger=2)
        backend.close()
        Path(f"{out}.{rank}").write_text(json.dumps(tokens))

    exit_on_error(body)
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < WORLD, reason="needs 2 GPUs"
)
def test_nccl_layer_split_matches_one_gpu(
    checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    path = checkpoint("llama")
    out = str(tmp_path / "tokens")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast
    mp.spawn(
        _gpu_rank_main,
        args=(WORLD, str(tmp_path / "rendezvous"), str(path), out),
        nprocs=WORLD,
        join=True,
    )
    case = Case(
        "greedy",
        "llama",
        greedy_requests(PROMPTS),
        dict(device="cuda", kv_cache_memory_fraction=0.01),
        stagger=2,
    )
    want = generate(NativeBackend(engine_config(path, case.settings)), case.requests, 2)
    for rank in range(WORLD):
        assert json.loads(Path(f"{out}.{rank}").read_text()) == want, rank
