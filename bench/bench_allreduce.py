"""The all-reduce a tensor-parallel decode step makes (one per attention and one per MLP block:
64 a token on `8b`), timed the way the engine runs it: captured in a CUDA graph, on [tokens,
hidden] bf16 tensors, over the GPUs of one host.

Compares NCCL (`dist.all_reduce`), PyTorch's symmetric-memory one-shot all-reduce (each rank
reads every peer's buffer over NVLink after one barrier, no multicast) and the engine's push
all-reduce (engine.kernels.all_reduce: each rank writes into its peers' buffers, the data its
own signal), the last also with the residual add and norm fused in against NCCL then the norm
kernel; and checks that they give the same sums.

    source .devbundle/enter.sh && python3 bench/bench_allreduce.py --gpus 2 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make `engine` importable
    sys.path.insert(0, str(REPO_ROOT))

CALLS_PER_GRAPH = 64  # one decode token of `8b`: 32 layers x 2 blocks
REPLAYS = 200


def _rank(rank: int, world: int, rendezvous: str, hidden: int, tokens: list[int],
          out: str) -> None:
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)
    group_name = dist.group.WORLD.group_name
    device = torch.device("cuda", rank)
    results: dict[str, dict[str, float | str]] = {}

    symm = None
    try:
        import torch.distributed._symmetric_memory as symm_mem

        symm = symm_mem
    except ImportError as err:
        results["symm_mem"] = {"error": f"import: {err}"}

    for n in tokens:
        x = torch.randn(n, hidden, dtype=torch.bfloat16, device=device) * (rank + 1)
        want = x.clone()
        dist.all_reduce(want)
        row: dict[str, float | str] = {}
        row["nccl_us"] = _time_graph(lambda t: dist.all_reduce(t), x.clone(), device)
        if symm is not None:
            try:
                buf = symm.empty((n, hidden), dtype=torch.bfloat16, device=device)
                symm.rendezvous(buf, group_name)
                out_t = torch.empty_like(x)

                def one_shot(t: torch.Tensor, buf=buf, out_t=out_t) -> None:
                    buf.copy_(t)
                    torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", group_name, out_t)
                    t.copy_(out_t)

                y = x.clone()
                one_shot(y)
                torch.cuda.synchronize()
                row["one_shot_max_abs_err"] = float((y.float() - want.float()).abs().max())
                row["one_shot_us"] = _time_graph(one_shot, x.clone(), device)

                def two_shot(t: torch.Tensor, buf=buf) -> None:
                    buf.copy_(t)
                    torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", group_name)
                    t.copy_(buf)

                if n * hidden % (world * 8) == 0:
                    row["two_shot_us"] = _time_graph(two_shot, x.clone(), device)
            except Exception as err:  # noqa: BLE001 - reported in the table
                row["symm_error"] = f"{type(err).__name__}: {err}"[:300]
        try:
            _time_push(row, x, want, rank, world, device)
        except Exception as err:  # noqa: BLE001 - reported in the table
            row["push_error"] = f"{type(err).__name__}: {err}"[:300]
        results[str(n)] = row
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _time_push(row: dict[str, float | str], x: torch.Tensor, want: torch.Tensor, rank: int,
               world: int, device: torch.device) -> None:
    """The engine's push all-reduce (engine.kernels.all_reduce), alone and with the residual
    add and norm after it, against the one-shot sum followed by the norm kernel."""
    from engine.distributed import ParallelGroup
    from engine.kernels import elementwise
    from engine.kernels.all_reduce import with_push_all_reduce

    group = with_push_all_reduce(ParallelGroup(rank, world, dist.group.WORLD), device,
                                 x.dtype)
    fast = group.symmetric
    if fast is None or not fast.fits(x):
        row["push_error"] = "not taken"
        return
    got = fast.all_reduce(x)
    torch.cuda.synchronize()
    row["push_max_abs_err"] = float((got.float() - want.float()).abs().max())
    row["push_us"] = _time_graph(lambda t: fast.all_reduce(t), x.clone(), device)
    residual = torch.randn_like(x)
    weight = torch.randn(x.shape[1], dtype=x.dtype, device=device)
    row["push_add_norm_us"] = _time_graph(
        lambda t: fast.all_reduce_add_norm(t, residual, weight, 1e-5), x.clone(), device)
    row["nccl_then_norm_us"] = _time_graph(
        lambda t: (dist.all_reduce(t), elementwise.rms_norm(t, weight, 1e-5, residual)),
        x.clone(), device)


def _time_graph(op, x: torch.Tensor, device: torch.device) -> float:
    """Microseconds per call: CALLS_PER_GRAPH calls captured in one graph, replayed."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            op(x)
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(CALLS_PER_GRAPH):
            op(x)
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize(device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(REPLAYS):
        graph.replay()
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    del graph
    return seconds / (REPLAYS * CALLS_PER_GRAPH) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--tokens", default="1,8,64,256")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if torch.cuda.device_count() < args.gpus:
        sys.exit(f"needs {args.gpus} GPUs, found {torch.cuda.device_count()}")
    tokens = [int(t) for t in args.tokens.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        mp.spawn(_rank, args=(args.gpus, os.path.join(tmp, "rdv"), args.hidden, tokens, out),
                 nprocs=args.gpus, join=True)
        results = json.loads(Path(out).read_text())
    record = {"workload": "allreduce", "gpus": args.gpus, "hidden": args.hidden,
              "calls_per_graph": CALLS_PER_GRAPH, "device": torch.cuda.get_device_name(0),
              "torch": torch.__version__, "results": results}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "allreduce.json").write_text(json.dumps(record, indent=2))
    for n, row in results.items():
        print(f"tokens {n:>4}: " + ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
