"""Tensor parallelism on CPU: two gloo ranks, each holding half of every layer, generate the
same greedy tokens as one rank and as transformers, also under preemption and with prefix
caching, and agree on every sampled token.

The ranks are spawned once for the whole file (`run_group`), and run every case one after
another over the same process group; test_layer_split.py uses the same machinery.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoConfig

from engine.backends.native import NativeBackend
from engine.config import EngineConfig
from engine.core.backend import GenerationBackend
from engine.distributed import ParallelGroup
from engine.executor.loader import build_model, load_weights, materialise, quantize_int8
from engine.layers.attention import TorchPagedAttention
from engine.request import SamplingParams

WORLD = 2
MAX_TOKENS = 10
VARIANTS = ["llama", "qwen2", "mistral"]
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)

HfGreedy = Callable[[Path, list[list[int]], int], list[list[int]]]
# (request_id, prompt_token_ids, sampling, priority)
Request = tuple[str, list[int], SamplingParams, int]


def prompts_of(lengths: list[int], seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(4, 1000) for _ in range(n)] for n in lengths]


# Mixed lengths: shorter and longer than a block (4 tokens), one prefilled in chunks where
# the case limits the tokens per step.
PROMPTS = prompts_of([3, 17, 40, 9], seed=1)
# Two prompts sharing a 32-token prefix (8 blocks), for prefix caching.
SHARED = prompts_of([32], seed=2)[0]
PREFIX_PROMPTS = [SHARED + tail for tail in prompts_of([6, 5], seed=3)]


@dataclass
class Case:
    """One run of a backend on every rank: `requests` fed one per `stagger` steps, under
    EngineConfig `settings`; `blocks_by_rank` gives each rank its own num_kv_blocks (the
    group must agree on the smallest); `rng_by_rank` seeds each rank's global generator
    differently (as separate processes may be), so unseeded sampling would diverge unless
    the ranks share their draws."""

    name: str
    variant: str
    requests: list[Request]
    settings: dict[str, Any] = field(default_factory=dict)
    stagger: int = 1
    blocks_by_rank: list[int] | None = None
    rng_by_rank: bool = False


def engine_config(
    path: Path | str, settings: dict[str, Any], strategy: str = "none", world: int = 1
) -> EngineConfig:
    merged: dict[str, Any] = dict(
        dtype="float32", device="cpu", max_model_len=128, block_size=4, max_num_seqs=4
    )
    merged.update(settings)
    return EngineConfig(
        model_path=str(path),
        shard_strategy=strategy,  # type: ignore[arg-type]
        group_size=world,
        distributed_backend="gloo",
        **merged,
    )


def generate(backend: GenerationBackend, requests: list[Request], stagger: int) -> dict[str, Any]:
    """Request i added at step i * stagger; each request's tokens, in order."""
    tokens: dict[str, list[int]] = {r[0]: [] for r in requests}
    pending = list(requests)
    step = 0
    while pending or backend.has_unfinished():
        while pending and step >= (len(requests) - len(pending)) * stagger:
            backend.add_request(*pending.pop(0))
        for out in backend.step():
            tokens[out.request_id].extend(out.new_token_ids)
        step += 1
        assert step < 1000, "the backend did not finish"
    return tokens


def run_case(case: Case, path: Path | str, strategy: str, group: ParallelGroup) -> dict[str, Any]:
    """Run one case on this rank; its tokens, the scheduler's stats and what the rank holds."""
    settings = dict(case.settings)
    if case.blocks_by_rank is not None:
        settings["num_kv_blocks"] = case.blocks_by_rank[group.rank]
    if case.rng_by_rank and group.world_size > 1:
        torch.manual_seed(1000 + group.rank)
    backend = NativeBackend(engine_config(path, settings, strategy, group.world_size), group)
    tokens = generate(backend, case.requests, case.stagger)
    runner = backend.runner
    result = {
        "tokens": tokens,
        "stats": backend.stats(),
        "kv_cache_shape": list(runner.kv_cache.shape),
        "params": sorted(name for name, _ in runner.model.named_parameters()),
    }
    backend.close()
    return result


def _rank_main(
    rank: int,
    world: int,
    rendezvous: str,
    strategy: str,
    cases: list[Case],
    paths: dict[str, str],
    out: str,
) -> None:
    # The ranks share the machine's cores: one thread each, so they do not fight over them.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        group = ParallelGroup(rank, world, dist.group.WORLD)
        results = {
            case.name: run_case(case, paths[case.variant], strategy, group) for case in cases
        }
        Path(f"{out}.{rank}").write_text(json.dumps(results))
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_group()


def leave_group() -> None:
    """End a CPU rank that has written its results: wait for the others, then exit without
    tearing the gloo group down. Its C++ teardown at interpreter exit now and then aborted a
    rank ("terminate called without an active exception") after all the work was done."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_group(
    strategy: str, cases: list[Case], paths: dict[str, Path], tmp: Path, world: int = WORLD
) -> list[dict[str, Any]]:
    """Spawn `world` gloo ranks once, run every case on each; per rank, {case name: result}."""
    out = str(tmp / "results")
    mp.spawn(
        _rank_main,
        args=(
            world,
            str(tmp / "rendezvous"),
            strategy,
            cases,
            {k: str(v) for k, v in paths.items()},
            out,
        ),
        nprocs=world,
        join=True,
    )
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(world)]


def single_rank(case: Case, path: Path) -> dict[str, Any]:
    """The same case on one rank, in this process (the reference a group must match)."""
    return run_case(case, path, "none", ParallelGroup())


def hf_tokens(hf_greedy: HfGreedy, path: Path, requests: list[Request]) -> dict[str, list[int]]:
    want = hf_greedy(path, [r[1] for r in requests], MAX_TOKENS)
    return {r[0]: tokens for r, tokens in zip(requests, want, strict=True)}


def greedy_requests(prompts: list[list[int]]) -> list[Request]:
    return [(f"r{i}", p, GREEDY, 1) for i, p in enumerate(prompts)]


def standard_cases() -> list[Case]:
    """The cases both strategies run: greedy on each variant, preemption, prefix caching,
    sampling."""
    cases = [Case(f"greedy-{v}", v, greedy_requests(PROMPTS)) for v in VARIANTS]
    # 16 blocks of 4 tokens hold any one request but not all four (about 37 blocks): the
    # scheduler preempts. The ranks are offered 64 and 16 blocks and must agree on 16. The
    # 40-token prompt is prefilled in two chunks.
    cases.append(
        Case(
            "preempt",
            "llama",
            greedy_requests(PROMPTS),
            settings=dict(max_num_batched_tokens=32),
            blocks_by_rank=[64, 16],
        )
    )
    # The second prompt arrives after the first was prefilled and finds its 8 shared blocks.
    cases.append(Case("prefix", "qwen2", greedy_requests(PREFIX_PROMPTS), stagger=3))
    sampled = [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.9, seed=1234),
        SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=99),
        SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0),  # unseeded
    ]
    cases.append(
        Case(
            "sample",
            "llama",
            [(f"r{i}", p, s, 1) for i, (p, s) in enumerate(zip(PROMPTS[:3], sampled, strict=True))],
            rng_by_rank=True,
        )
    )
    return cases


def check_standard_cases(
    results: list[dict[str, Any]],
    checkpoint: Callable[[str], Path],
    hf_greedy: HfGreedy,
    exact_sampling: bool,
) -> None:
    """Every rank's tokens equal one rank's and transformers' (greedy); preemption happened
    and prefix-cache hits too, on every rank. Sampled tokens agree over the ranks, and with
    exact_sampling (the same arithmetic as one rank) seeded ones equal one rank's."""
    for case in standard_cases():
        path = checkpoint(case.variant)
        alone = single_rank(case, path)
        for rank, result in enumerate(results):
            got = result[case.name]
            where = f"{case.name}, rank {rank}"
            if case.name == "sample":
                assert got["tokens"] == results[0][case.name]["tokens"], where
                if exact_sampling:
                    for rid in ("r0", "r1"):
                        assert got["tokens"][rid] == alone["tokens"][rid], where
                continue
            assert got["tokens"] == alone["tokens"], where
            assert got["tokens"] == hf_tokens(hf_greedy, path, case.requests), where
            if case.name == "preempt":
                assert got["kv_cache_shape"][2] == 16 + 1, where  # the smallest, plus scratch
                assert got["stats"]["num_preemptions"] > 0, where
            if case.name == "prefix":
                assert got["stats"]["prefix_cache_hit_tokens"] >= len(SHARED), where


@pytest.fixture(scope="module")
def tensor_results(
    checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> list[dict[str, Any]]:
    paths = {v: checkpoint(v) for v in VARIANTS}
    return run_group("tensor", standard_cases(), paths, tmp_path_factory.mktemp("tensor"))


def test_tensor_parallel_matches_one_rank_and_hf(
    tensor_results: list[dict[str, Any]],
    checkpoint: Callable[[str], Path],
    hf_greedy: HfGreedy,
) -> None:
    # Tensor parallel sums partial products in another order than one rank: greedy tokens
    # agree on these models, sampled ones are only required to agree over the ranks.
    check_standard_cases(tensor_results, checkpoint, hf_greedy, exact_sampling=False)


def test_tensor_ranks_hold_half_of_each_layer(
    tensor_results: list[dict[str, Any]], checkpoint: Callable[[str], Path]
) -> None:
    full_heads = AutoConfig.from_pretrained(str(checkpoint("llama"))).num_key_value_heads
    for result in tensor_results:
        shape = result["greedy-llama"]["kv_cache_shape"]
        # [layers, keys/values, blocks, block_size, Hkv, Dh]: every layer, half of the heads
        assert shape[0] == 2 and shape[4] == full_heads // WORLD


def rank_params(path: Path, world: int, rank: int, int8: bool) -> dict[str, torch.Tensor]:
    """The parameters rank `rank` of a tensor group of `world` loads (group 1: the model)."""
    hf_config = AutoConfig.from_pretrained(str(path))
    group = ParallelGroup(rank, world, _FakeProcessGroup()) if world > 1 else ParallelGroup()
    model = build_model(hf_config, group, TorchPagedAttention(), max_positions=32)
    if int8:
        quantize_int8(model)
    materialise(model, torch.device("cpu"), torch.float32)
    load_weights(model, path)
    return dict(model.named_parameters())


class _FakeProcessGroup:
    """Stands in for a torch.distributed group: loading never communicates."""


# Whole on every rank of a tensor group: the norms, the biases added after the row-parallel
# sum, and the int8 scales of the row-parallel layers (one per output row; their values are
# the rank's own).
REPLICATED = ("layernorm.weight", "norm.weight", "o_proj.bias", "down_proj.bias")
ROW_SCALES = ("o_proj.weight_scale", "down_proj.weight_scale")


@pytest.mark.parametrize(("variant", "int8"), [("qwen2", False), ("llama", False), ("llama", True)])
def test_each_tensor_rank_loads_only_its_slice(
    variant: str, int8: bool, checkpoint: Callable[[str], Path]
) -> None:
    """Every sharded tensor of a rank (weights, int8 weights and their scales, QKV biases,
    the embedding and the head, tied or not) holds 1/world of the whole model's bytes, and
    its values are that rank's part of the checkpoint."""
    path = checkpoint(variant)
    full = rank_params(path, 1, 0, int8)
    ckpt = load_file(str(path / "model.safetensors"))
    prefix = "model.layers.1."
    q_rows = ckpt[prefix + "self_attn.q_proj.weight"].shape[0]
    for rank in range(WORLD):
        mine = rank_params(path, WORLD, rank, int8)
        assert mine.keys() == full.keys()
        for name, param in mine.items():
            whole = full[name]
            assert param.dtype == whole.dtype, name
            if name.endswith(REPLICATED + ROW_SCALES):
                assert param.shape == whole.shape, name
                if not name.endswith(ROW_SCALES):
                    torch.testing.assert_close(param, whole)
                continue
            # One dimension split over the ranks (the vocabulary divides evenly here).
            assert param.element_size() * param.numel() * WORLD == (
                whole.element_size() * whole.numel()
            ), name
        rows = mine["model.embed_tokens.weight"].shape[0]
        mine_rows = slice(rank * rows, (rank + 1) * rows)
        torch.testing.assert_close(
            mine["model.embed_tokens.weight"], ckpt["model.embed_tokens.weight"][mine_rows]
        )
        if "lm_head.weight" in mine:  # untied: the head's own rows
            torch.testing.assert_close(mine["lm_head.weight"], ckpt["lm_head.weight"][mine_rows])
        # This rank's query heads: the same rows as one rank holds them (an int8 row is
        # quantised on its own, so its int8 values and scale are the same too).
        local_q = q_rows // WORLD
        qkv = prefix + "self_attn.qkv_proj.weight"
        whole_q = slice(rank * local_q, (rank + 1) * local_q)
        torch.testing.assert_close(mine[qkv][:local_q], full[qkv][whole_q])
        if int8:
            scale = qkv + "_scale"
            torch.testing.assert_close(mine[scale][:local_q], full[scale][whole_q])
        # A row-parallel slice of each row: in int8 with its own scale, still dequantising to
        # the checkpoint's slice.
        down = mine[prefix + "mlp.down_proj.weight"]
        cols = down.shape[1]
        want_down = ckpt[prefix + "mlp.down_proj.weight"][:, rank * cols : (rank + 1) * cols]
        if int8:
            down_scale = mine[prefix + "mlp.down_proj.weight_scale"]
            step = down_scale.max().item()  # at most half a quantisation step off
            torch.testing.assert_close(
                down.float() * down_scale[:, None], want_down, atol=step, rtol=0
            )
        else:
            torch.testing.assert_close(down, want_down)


def test_group_collectives_on_one_rank() -> None:
    group = ParallelGroup()
    x = torch.ones(2, 3)
    assert group.all_reduce(x) is x and group.all_gather(x) is x
    assert group.broadcast(x, 0) is x and group.min(7, torch.device("cpu")) == 7
    with pytest.raises(ValueError, match="process group"):
        ParallelGroup(0, 2)
    with pytest.raises(ValueError, match="does not divide"):
        ParallelGroup(0, 2, object()).split(5, "heads")


def _fast_rank_main(rank: int, world: int, rendezvous: str, path: str, out: str,
                    async_scheduling: bool) -> None:
    """A tensor-parallel rank on the GPU path's code: Triton attention, the fused layers and
    the GEMV kernel (in Triton's interpreter, TRITON_INTERPRET=1 inherited), decode steps
    through the graphs' static buffers (run, not captured), their input tokens patched in
    from the step before (async scheduling) or launched ahead (decode lookahead)."""
    import engine.executor.runner as runner_module
    from engine.executor.cuda_graphs import DecodeGraphs

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        runner_module.use_triton = lambda device, config: True  # the GPU path's layers
        config = engine_config(path, {"async_scheduling": async_scheduling}, "tensor", world)
        backend = NativeBackend(config, ParallelGroup(rank, world, dist.group.WORLD))
        runner = backend.runner
        runner.graphs = graphs = DecodeGraphs(
            runner.model, runner.kv_caches, 4, runner.max_blocks, runner.block_size,
            runner.scratch_block, runner.device, replay=False,
        )  # fmt: skip
        patched = [0]
        launch = graphs.launch

        def counting(*args: Any, **kwargs: Any) -> Any:
            patched[0] += kwargs.get("patch") is not None
            return launch(*args, **kwargs)

        graphs.launch = counting  # type: ignore[method-assign]
        runner.profile = []
        tokens = generate(backend, greedy_requests(PROMPTS[:3]), stagger=2)
        kinds = sorted({step["kind"] for step in runner.profile})
        Path(f"{out}.{rank}").write_text(json.dumps({"tokens": tokens, "kinds": kinds,
                                                     "patched": patched[0]}))
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_group()


def check_fast_path(path: str, tmp: str, async_scheduling: bool) -> None:
    """Run in the interpreter's subprocess: two ranks on the fast path give one rank's
    plain PyTorch tokens, with graph and eager steps taken, and either steps patched with
    the step before's tokens (async scheduling) or lookahead steps."""
    out = f"{tmp}/fast"
    mp.spawn(_fast_rank_main, args=(WORLD, f"{tmp}/rendezvous", path, out, async_scheduling),
             nprocs=WORLD)
    want = generate(NativeBackend(engine_config(path, {"async_scheduling": False})),
                    greedy_requests(PROMPTS[:3]), 2)
    for rank in range(WORLD):
        got = json.loads(Path(f"{out}.{rank}").read_text())
        assert got["tokens"] == want, (rank, got["tokens"], want)
        if async_scheduling:
            assert got["kinds"] == ["eager", "graph"] and got["patched"] > 0, got
        else:
            assert got["kinds"] == ["eager", "graph", "lookahead"] and not got["patched"], got


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_tensor_parallel_fused_kernels_and_steps_launched_ahead(
    checkpoint: Callable[[str], Path], tmp_path: Path, async_scheduling: bool
) -> None:
    """The Triton kernels on sliced weights (a rank's heads, its slice of the MLP, the GEMV
    with the norm or the activation fused in, its partial sums reduced after), and steps
    launched before the host has the tokens of the one before (async scheduling, or the
    decode lookahead) on every rank, on the CPU through Triton's interpreter."""
    pytest.importorskip("triton")
    from triton_interpreter import run_in_interpreter

    path = checkpoint("llama")
    run_in_interpreter(
        __file__,
        f"t.check_fast_path({str(path)!r}, {str(tmp_path)!r}, {async_scheduling})",
        timeout=280)


def test_a_closed_backend_drops_its_graphs_and_still_serves(
    checkpoint: Callable[[str], Path],
) -> None:
    """close() (before a group's process group goes) releases the decode graphs; the
    backend then runs every step eagerly, with the same tokens."""
    from engine.executor.cuda_graphs import DecodeGraphs

    path = checkpoint("llama")
    requests = greedy_requests(PROMPTS[:2])
    want = generate(NativeBackend(engine_config(path, {})), requests, stagger=1)
    backend = NativeBackend(engine_config(path, {}))
    runner = backend.runner
    # The graphs' static buffers, run without capture (the CPU stand-in for the GPU path).
    runner.graphs = DecodeGraphs(
        runner.model, runner.kv_caches, 4, runner.max_blocks, runner.block_size,
        runner.scratch_block, runner.device, replay=False,
    )  # fmt: skip
    runner.profile = []
    assert generate(backend, requests, stagger=1) == want
    assert "graph" in {step["kind"] for step in runner.profile}
    backend.close()
    assert runner.graphs is None and runner.lookahead is None
    runner.profile = []
    assert generate(backend, [(f"again-{r[0]}", *r[1:]) for r in requests], 1) == {
        f"again-{rid}": tokens for rid, tokens in want.items()
    }
    assert {step["kind"] for step in runner.profile} == {"eager"}


def test_a_group_needs_a_sharding_strategy(checkpoint: Callable[[str], Path]) -> None:
    config = engine_config(checkpoint("llama"), {}, "none", world=2)
    with pytest.raises(Exception, match="shard_strategy tensor or layer"):
        NativeBackend(config, ParallelGroup(0, 2, _FakeProcessGroup()))
    with pytest.raises(Exception, match="group_size 2 needs a ParallelGroup"):
        NativeBackend(config)


# ---- GPU: NCCL ranks with CUDA graphs -----------------------------------------------------


def exit_on_error(body: Callable[[], None]) -> None:
    """Run a GPU rank's body; on an error print it and leave at once. Destroying the process
    group then could wait for ever on the other rank, stuck in a collective, and the test
    would hang instead of failing."""
    try:
        body()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def _gpu_rank_main(rank: int, world: int, rendezvous: str, path: str, out: str) -> None:
    # A rank stuck in a collective prints where, and exits, rather than hanging the test.
    faulthandler.dump_traceback_later(150, exit=True)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{rendezvous}", rank=rank, world_size=world)

    def body() -> None:
        group = ParallelGroup(rank, world, dist.group.WORLD)
        check_push_all_reduce(group, torch.device("cuda", rank))
        results: dict[str, Any] = {}
        for case in gpu_cases():
            if case.rng_by_rank:
                torch.manual_seed(1000 + rank)
            config = engine_config(path, case.settings, "tensor", world)
            config.distributed_backend = "nccl"
            backend = NativeBackend(config, group)
            runner = backend.runner
            assert runner.device == torch.device("cuda", rank), runner.device
            assert runner.kv_cache.device == runner.device
            assert runner.graphs is not None, "every rank captures its decode graphs"
            assert runner.group.symmetric is not None, "decode sums take the push path"
            runner.profile = []
            tokens = generate(backend, case.requests, case.stagger)
            kinds = sorted({step["kind"] for step in runner.profile})
            results[case.name] = {"tokens": tokens, "kinds": kinds}
            # Before the process group goes: NCCL waits for the graphs holding its
            # collectives to be destroyed.
            backend.close()
        Path(f"{out}.{rank}").write_text(json.dumps(results))

    exit_on_error(body)
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


def check_push_all_reduce(group: ParallelGroup, device: torch.device) -> None:
    """The push sums equal NCCL's bit for bit, eagerly and replayed in a CUDA graph (several
    calls a replay, so the buffers' slots turn over inside the graph); with the norm they
    equal the sum followed by the norm kernel; a sum too large for the buffers goes to NCCL."""
    from engine.kernels import elementwise
    from engine.kernels.all_reduce import with_push_all_reduce

    fast = with_push_all_reduce(group, device, torch.bfloat16)
    assert fast.symmetric is not None
    cols = 4096
    too_large = fast.symmetric.capacity // cols + 1  # type: ignore[attr-defined]
    weight = torch.randn(cols, dtype=torch.bfloat16, device=device)
    for rows in (1, 3, 64, too_large):
        gen = torch.Generator(device=device).manual_seed(group.rank * 100 + rows)
        x = torch.randn(rows, cols, dtype=torch.bfloat16, device=device, generator=gen)
        x[0, :5] = -0.0
        residual = torch.randn(rows, cols, dtype=torch.bfloat16, device=device)
        want = x.clone()
        dist.all_reduce(want, group=group.process_group)
        assert fast.symmetric.fits(x) == (rows != too_large)
        torch.testing.assert_close(fast.all_reduce(x.clone()), want, rtol=0, atol=0)
        if rows == too_large:
            continue
        got_norm, got_sum = fast.all_reduce_add_norm(x, residual, weight, 1e-5)
        want_norm, want_sum = elementwise.rms_norm(want, weight, 1e-5, residual)
        torch.testing.assert_close(got_sum, want_sum, rtol=0, atol=0)
        torch.testing.assert_close(got_norm, want_norm, rtol=0, atol=0)
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            fast.all_reduce(x)  # warm-up outside the capture
        torch.cuda.current_stream(device).wait_stream(side)
        with torch.cuda.graph(graph):
            outs = [fast.all_reduce(x) for _ in range(5)]
        for _ in range(3):
            for out in outs:
                out.zero_()
            graph.replay()
            torch.cuda.synchronize(device)
            for out in outs:
                torch.testing.assert_close(out, want, rtol=0, atol=0)
        del graph


def gpu_cases() -> list[Case]:
    # A small share of the GPU: the cache of this tiny model would otherwise hold
    # a hundred million blocks.
    settings = dict(device="cuda", kv_cache_memory_fraction=0.01)
    unseeded = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0)
    return [
        Case("greedy", "llama", greedy_requests(PROMPTS), settings, stagger=2),
        # One request at a time: batch-1 decode steps, the fused GEMV path.
        Case("greedy-alone", "llama", greedy_requests(PROMPTS[:1]), settings),
        Case("sample", "llama", [("r0", PROMPTS[1], unseeded, 1)], settings, rng_by_rank=True),
    ]


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < WORLD, reason="needs 2 GPUs"
)
def test_nccl_tensor_parallel_with_graphs_matches_one_gpu(
    checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    path = checkpoint("llama")
    out = str(tmp_path / "results")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast
    mp.spawn(
        _gpu_rank_main,
        args=(WORLD, str(tmp_path / "rendezvous"), str(path), out),
        nprocs=WORLD,
        join=True,
    )
    results = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(WORLD)]
    for case in gpu_cases():
        backend = NativeBackend(engine_config(path, case.settings))
        assert backend.runner.graphs is not None
        backend.runner.profile = []
        want = generate(backend, case.requests, case.stagger)
        for rank, result in enumerate(results):
            got = result[case.name]
            assert got["tokens"] == results[0][case.name]["tokens"], (case.name, rank)
            if case.name != "sample":
                assert got["tokens"] == want, (case.name, rank)
                # decode steps through the captured graphs (launched ahead by the async
                # scheduler, their input tokens patched in on every rank)
                assert "graph" in set(got["kinds"]), (case.name, got["kinds"])
