"""The host's work for one full-batch decode step, without a device: the scheduler, the runner's
decode path (the step's inputs, the lookahead's, the captured graphs' host buffer) and
postprocess, for `--seqs` sequences in decode, with the graphs' launch replaced by tokens ready
at once. At batch 256 on a GPU this work, not the device, sets a decode step's pace.

    python bench/sim_decode_host.py [--seqs 256] [--steps 1000] [--profile] [--out FILE]
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
from engine.executor.runner import ModelRunner  # noqa: E402
from engine.request import SamplingParams  # noqa: E402

BLOCK = 16
MAX_MODEL_LEN = 4096
TOKEN = 7


class HostOnlyGraphs(DecodeGraphs):
    """The decode graphs' host side (staging turns, the input buffer fill); the step's
    tokens are ready at once."""

    def launch(self, ids: list[int], positions: list[int], slots: list[int],
               tables: list[list[int]], ids_from: torch.Tensor | None = None) -> GraphStep:
        n = len(positions)
        bs = self.batch_size_for(n)
        assert bs is not None
        self._fill(self.staging.next_turn(), ids, positions, slots, tables, bs)
        tokens = torch.full((n,), TOKEN, dtype=torch.long)
        return GraphStep(n, tokens, tokens, tokens, None)


def host_runner(seqs: int) -> ModelRunner:
    """A ModelRunner with no model: only what its decode path reads."""
    runner = object.__new__(ModelRunner)
    runner.config = EngineConfig(model_path="none", device="cpu")
    runner.block_size = BLOCK
    runner.max_model_len = MAX_MODEL_LEN
    runner.device = torch.device("cpu")
    runner.graphs = HostOnlyGraphs(
        model=None, kv_caches=[], max_num_seqs=seqs, max_blocks=MAX_MODEL_LEN // BLOCK,  # type: ignore[arg-type]
        block_size=BLOCK, scratch_block=0, device=runner.device, replay=False)
    runner.mixed = None
    runner.lookahead = None
    runner.profile = None
    return runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--profile", action="store_true", help="Python's profiler over 500 steps")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

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
        if all(c.num_tokens == 1 for c in out.chunks):
            break
        scheduler.postprocess(out, [TOKEN] * len(out.sampling_chunks))

    def step() -> None:
        out = scheduler.schedule()
        scheduler.postprocess(out, runner._execute(out))

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
