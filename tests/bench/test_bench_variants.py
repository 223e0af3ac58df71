"""bench_engine's variants without running an engine: which models each runs on, what a
machine without enough GPUs skips, and the engine settings each one sets."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from bench import bench_engine


def args_of(*argv: str) -> argparse.Namespace:
    return bench_engine.parse_args(["--device", "cpu", *argv])


def test_a_variant_limited_to_models_runs_only_there() -> None:
    args = args_of("--model", "1b,8b", "--variants", "thread,tp2@8b,fast,layer2@8b+tiny")
    assert args.variant_list == ["fast", "thread", "tp2", "layer2"]
    assert args.variant_models == {
        "1b": ["fast", "thread"],
        "8b": ["fast", "thread", "tp2", "layer2"],
    }


def test_bad_variants_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("fast,tp3", "tp2@70b", "tp2@8b"):  # the last leaves 1b with no variant
        with pytest.raises(SystemExit):
            args_of("--model", "1b", "--variants", bad)
    assert "no variant runs on ['1b']" in capsys.readouterr().err


def test_sharded_variants_need_the_native_backend_and_two_gpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    args = args_of("--backend", "native")
    assert bench_engine.variant_unavailable(args, "tp2") is None  # gloo ranks on a CPU
    args.backend = "hf"
    assert "cannot shard" in str(bench_engine.variant_unavailable(args, "layer2"))
    assert bench_engine.variant_unavailable(args, "thread") is None
    args.backend, args.device = "native", "cuda"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert bench_engine.variant_unavailable(args, "tp2") == "tp2 needs 2 GPUs, 1 visible"
    assert bench_engine.variant_unavailable(args, "fast") is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert bench_engine.variant_unavailable(args, "layer2") is None
    assert bench_engine.variant_gpus(args, "tp2") == 2
    assert bench_engine.variant_gpus(args, "thread") == 1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert bench_engine.variant_unavailable(args, "tp4") is None
    assert bench_engine.variant_unavailable(args, "tp8") == "tp8 needs 8 GPUs, 4 visible"
    assert bench_engine.variant_gpus(args, "tp8") == 8


def test_each_variant_sets_its_engine_settings() -> None:
    args = args_of()
    config = bench_engine.engine_config(args, Path("/m"), "tp2")
    assert (config.shard_strategy, config.group_size, config.distributed_backend, config.core) == (
        "tensor",
        2,
        "gloo",
        "process",
    )
    args.device = "cuda"
    config = bench_engine.engine_config(args, Path("/m"), "layer2")
    assert (config.shard_strategy, config.group_size, config.distributed_backend) == (
        "layer",
        2,
        "nccl",
    )
    assert bench_engine.engine_config(args, Path("/m"), "thread").core == "thread"
    assert bench_engine.engine_config(args, Path("/m"), "fast").core == "process"
    assert bench_engine.engine_config(args, Path("/m"), "int8").dtype == "int8"
    assert bench_engine.engine_config(args, Path("/m"), "eager").enforce_eager
