"""The host's work for one full-batch decode step, without a device: the scheduler, the runner's
decode path (the step's inputs, the lookahead's, the captured graphs' host buffer) and
postprocess, for `--seqs` sequences in decode, with the graphs' launch replaced by tokens ready
at once. At batch 256 on a GPU this work, not the device, sets a decode step's pace.

    python bench/sim_decode_host.py [--seqs 256] [--steps 1000] [--profile] [--out FILE]

`--workload throughput` runs a W-throughput-shaped batch instead (`--requests` prompts of
32-512 tokens, 128 new tokens each, `--seqs` at once), and `--workload lane` the W-priority
shape (a low flood, a high request always present, the fast lane 64 / 512), through the same
loop with the mixed steps' graphs stubbed alike; both report the host time of decode and
mixed steps apart: a mixed step is never launched ahead, so all of its host time is device
time lost.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine.config import EngineConfig  # noqa: E402
from engine.core.kv_cache import BlockManager  # noqa: E402
from engine.core.scheduler import Scheduler  # noqa: E402
from engine.core.sequence import Sequence  # noqa: E402
from engine.executor.cuda_graphs import DecodeGraphs, GraphStep  # noqa: E402
from engine.executor.mixed_graphs import MixedGraphs, MixedLayout  # noqa: E402
from engine.executor.runner import ModelRunner  # noqa: E402
from engine.request import SamplingParams  # noqa: E402

BLOCK = 16
MAX_MODEL_LEN = 4096
TOKEN = 7


class HostOnlyGraphs(DecodeGraphs):
    """The decode graphs' host side (staging turns, the input buffer fill); the step's
    tokens are ready at once."""

    def launch(self, ids: list[int], positions: list[int], slots: list[int],
               tables: list[list[int]], ids_from: torch.Tensor | None = None,
               patch: Any = None) -> GraphStep:
        n = len(positions)
        bs = self.batch_size_for(n)
        assert bs is not None
        self._fill(self.staging.next_turn(), ids, positions, slots, tables, bs)
        tokens = torch.full((n,), TOKEN, dtype=torch.long)
        return GraphStep(n, tokens, tokens, tokens, None)


class HostOnlyMixed(MixedGraphs):
    """The mixed-step graphs' host side (the input buffer fill); tokens ready at once."""

    def launch(self, chunks: Any, layout: MixedLayout,
               prev_tokens: torch.Tensor | None = None) -> GraphStep:
        n = self._fill(self.staging.next_turn(), layout, chunks)
        tokens = torch.full((n,), TOKEN, dtype=torch.long)
        return GraphStep(n, tokens, tokens, tokens, None)


def host_runner(seqs: int, mixed: bool = False) -> ModelRunner:
    """A ModelRunner with no model: only what its decode path (and, if `mixed`, its mixed
    path) reads."""
    runner = object.__new__(ModelRunner)
    runner.config = EngineConfig(model_path="none", device="cpu")
    runner.block_size = BLOCK
    runner.max_model_len = MAX_MODEL_LEN
    runner.device = torch.device("cpu")
    runner.graphs = HostOnlyGraphs(
        model=None, kv_caches=[], max_num_seqs=seqs, max_blocks=MAX_MODEL_LEN // BLOCK,  # type: ignore[arg-type]
        block_size=BLOCK, scratch_block=0, device=runner.device, replay=False)
    runner.mixed = HostOnlyMixed(
        model=None, kv_caches=[], max_tokens=8192, max_num_seqs=seqs,  # type: ignore[arg-type]
        max_blocks=MAX_MODEL_LEN // BLOCK, block_size=BLOCK, scratch_block=0, tile=64,
        device=runner.device, replay=False) if mixed else None
    runner.lookahead = None
    runner.profile = None
    return runner


def run_steps(args: argparse.Namespace) -> dict[str, Any]:
    """A batch through schedule / the runner / postprocess; host time by kind of step (decode:
    every chunk one token; mixed: any prefill chunk).

    throughput: `--requests` low prompts of 32-512 tokens at once, 128 new tokens each.
    lane: the W-priority shape: low prompts of 40-470 tokens kept `--requests` deep, one high
    request of 128 + 128 tokens always present, a quarter of the slots reserved for high and
    the fast lane at a quarter of them and `--lane-tokens` tokens (W-priority's `priority` run
    with the lane); timed until `--requests` low requests have finished."""
    runner = host_runner(args.seqs, mixed=True)
    lane = args.workload == "lane"
    scheduler = Scheduler(BlockManager(400_000, BLOCK, True), max_num_seqs=args.seqs,
                          max_num_batched_tokens=8192,
                          reserved_high_slots=args.seqs // 4 if lane else 0,
                          max_model_len=MAX_MODEL_LEN, eos_token_ids=[1],
                          low_seqs_while_high=args.seqs // 4 if lane else None,
                          low_tokens_while_high=args.lane_tokens if lane else None,
                          step_token_sizes=None if args.no_fit else runner.mixed_step_sizes)
    rng = random.Random(0)
    sampling = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    added = 0
    priorities: dict[str, int] = {}

    def add(priority: int, tokens: int) -> None:
        nonlocal added
        added += 1
        priorities[f"r{added}"] = priority
        prompt = [rng.randrange(2, 128_000) for _ in range(tokens)]
        scheduler.add(Sequence(f"r{added}", prompt, sampling, priority,
                               scheduler.next_arrival()))

    if lane:
        for _ in range(args.requests):
            add(1, rng.randint(40, 470))
        add(0, 128)
    else:
        for _ in range(args.requests):
            add(1, rng.randint(32, 512))
    finished_low = 0
    mixed_tokens = {"real": 0, "padded": 0}  # of mixed steps: computed, and with the padding
    parts = ("schedule", "execute", "postprocess")
    spent = {kind: dict.fromkeys(parts, 0.0) for kind in ("decode", "mixed")}
    steps = dict.fromkeys(spent, 0)
    prof = cProfile.Profile() if args.profile else None
    if prof is not None:
        prof.enable()
    clock = time.perf_counter
    while scheduler.has_unfinished() and not (lane and finished_low >= args.requests):
        t0 = clock()
        out = scheduler.schedule()
        t1 = clock()
        tokens = runner.launch(out).tokens()
        t2 = clock()
        results = scheduler.postprocess(out, tokens)
        t3 = clock()
        if lane:  # the flood stays as deep, and a high request is always there
            for r in results:
                if not r.finished:
                    continue
                if priorities[r.request_id] == 0:
                    add(0, 128)
                else:
                    finished_low += 1
                    add(1, rng.randint(40, 470))
        kind = "decode" if all(c.num_tokens == 1 for c in out.chunks) else "mixed"
        steps[kind] += 1
        if kind == "mixed":
            real = out.num_tokens
            layout = runner.mixed.layout_for(real, len(out.chunks)) if runner.mixed else None
            mixed_tokens["real"] += real
            mixed_tokens["padded"] += layout.tokens if layout is not None else real
        for part, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            spent[kind][part] += dt
    if prof is not None:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    padding = 1 - mixed_tokens["real"] / max(mixed_tokens["padded"], 1)
    print(f"mixed steps: {mixed_tokens['real']} tokens, {mixed_tokens['padded']} with the padding"
          f" ({padding:.1%} padding)", flush=True)
    result: dict[str, Any] = {"steps": steps, "ms_per_step": {}, "mixed_tokens": mixed_tokens,
                              "mixed_padding_share": padding, "fit": not args.no_fit}
    for kind, n in steps.items():
        per = {part: spent[kind][part] / max(n, 1) * 1e3 for part in parts}
        per["total"] = sum(per.values())
        result["ms_per_step"][kind] = per
        print(f"{kind}: {n} steps, host ms per step " + ", ".join(
            f"{part} {ms:.3f}" for part, ms in per.items()), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("decode", "throughput", "lane"), default="decode")
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--requests", type=int, default=512, help="throughput: requests")
    parser.add_argument("--no-fit", action="store_true",
                        help="throughput, lane: the scheduler does not fit steps to the padded"
                             " sizes (Scheduler.step_token_sizes)")
    parser.add_argument("--lane-tokens", type=int, default=512,
                        help="lane: low tokens a step while high work is present")
    parser.add_argument("--steps", type=int, default=1000, help="decode: steps timed")
    parser.add_argument("--profile", action="store_true", help="Python's profiler over 500 steps")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.workload != "decode":
        result = {"workload": f"sim-{args.workload}-host", "seqs": args.seqs,
                  "requests": args.requests, **run_steps(args), "label": args.label,
                  "python": sys.version.split()[0]}
        if args.out is not None:
            args.out.write_text(json.dumps(result, indent=1))
        return

    runner = host_runner(args.seqs)
    scheduler = Scheduler(BlockManager(400_000, BLOCK, True), max_num_seqs=args.seqs,
                          max_num_batched_tokens=8192, reserved_high_slots=0,
                          max_model_len=MAX_MODEL_LEN, eos_token_ids=[1])
    rng = random.Random(0)
    sampling = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
    for i in range(args.seqs):
        prompt = [rng.randrange(2, 128_000) for _ in range(rng.randint(40, 470))]
        scheduler.add(Sequence(f"r{i}", prompt, sampling, 1, scheduler.next_arrival()))
    while True:  # the prompts, with made-up tokens: only decode steps are timed
        out = scheduler.schedule()
        scheduler.postprocess(out, [TOKEN] * len(out.sampling_chunks))
        if all(c.num_tokens == 1 for c in out.chunks):
            break

    def step() -> None:
        out = scheduler.schedule()
        scheduler.postprocess(out, runner.launch(out).tokens())

    for _ in range(50):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    print(f"host work of a decode step of {args.seqs}: {ms:.3f} ms", flush=True)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(16)
    if args.out is not None:
        result: dict[str, Any] = {"workload": "sim-decode-host", "seqs": args.seqs,
                                  "steps": args.steps, "ms_per_step": ms, "label": args.label,
                                  "python": sys.version.split()[0]}
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
