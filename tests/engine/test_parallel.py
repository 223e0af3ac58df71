"""Tensor parallelism on CPU: two gloo ranks, each holding half of every layer, generate the
same greedy tokens as transformers does with the whole model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import EngineConfig
from engine.native_backend import NativeBackend
from engine.parallel import ParallelGroup
from engine.request import SamplingParams

WORLD = 2
MAX_TOKENS = 12


def _rank_main(rank: int, path: str, rendezvous: str, prompts: list[list[int]], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        group = ParallelGroup(rank, WORLD, dist.group.WORLD)
        config = EngineConfig(
            model_path=path,
            dtype="float32",
            device="cpu",
            max_model_len=128,
            block_size=4,
            group_size=WORLD,
            shard_strategy="tensor",
            distributed_backend="gloo",
        )
        backend = NativeBackend(config, group=group)
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        # Every rank runs the same deterministic scheduler, so they stay in step.
        results: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
        for i, prompt in enumerate(prompts):
            backend.add_request(str(i), prompt, params, 1)
        while backend.has_unfinished():
            for o in backend.step():
                results[o.request_id] += o.new_token_ids
        Path(f"{out}.{rank}").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("variant", ["qwen2"])
def test_two_rank_tensor_parallel_matches_hf(
    variant: str,
    checkpoint: Callable[[str], Path],
    prompts: list[list[int]],
    hf_greedy: Callable[[Path, list[list[int]], int], list[list[int]]],
    tmp_path: Path,
) -> None:
    path = checkpoint(variant)
    chosen = prompts[:3]
    out = str(tmp_path / "tokens")
    mp.spawn(
        _rank_main,
        args=(str(path), str(tmp_path / "rendezvous"), chosen, out),
        nprocs=WORLD,
        join=True,
    )
    expected = {str(i): want for i, want in enumerate(hf_greedy(path, chosen, MAX_TOKENS))}
    for rank in range(WORLD):
        assert json.loads(Path(f"{out}.{rank}").read_text()) == expected


def test_group_of_one_needs_no_process_group() -> None:
    group = ParallelGroup()
    x = torch.ones(2, 3)
    assert group.all_reduce(x) is x and group.all_gather(x) is x
    with pytest.raises(ValueError, match="process group"):
        ParallelGroup(0, 2)
    with pytest.raises(ValueError, match="does not divide"):
        ParallelGroup(0, 2, object()).split(5, "heads")
