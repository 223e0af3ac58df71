"""The cost of the engine core's own process: one request's round trip, front -> core -> front,
with the core in a spawned process against the same core in a thread of the front.

    python bench/bench_core_link.py [--requests 2000] [--out bench/results]

The echo backend answers a request in the step that admits it, so a request's latency is the
channel's round trip plus one step of bookkeeping; the difference between the two runs is
what the process boundary costs. Requests go one at a time (the next is submitted when the
previous one is back), so nothing overlaps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import card_name, git_commit, log, today, write_result  # noqa: E402


def round_trips(model: Path, core: str, requests: int) -> list[float]:
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.request import Request, SamplingParams

    engine = Engine(EngineConfig(model_path=str(model), backend="echo", device="cpu",
                                 core=core))  # type: ignore[arg-type]
    try:
        params = SamplingParams(max_tokens=1)
        out = []
        for i in range(requests + 50):
            start = time.perf_counter()
            engine.submit(Request(f"r{i}", prompt_token_ids=[5, 6, 7], sampling=params)).result()
            if i >= 50:  # the first ones warm the path up
                out.append(time.perf_counter() - start)
        return out
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    from engine.random_checkpoint import build_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model = build_checkpoint(Path(tmp), arch="llama", shape="tiny")
        thread = round_trips(model, "thread", args.requests)
        process = round_trips(model, "process", args.requests)
    med_thread = statistics.median(thread) * 1e6
    med_process = statistics.median(process) * 1e6
    result = {
        "workload": "core-link", "model": "echo", "card": card_name("cpu"), "gpus": 0,
        "date": today(),
        "commit": git_commit(args.commit), "unit": "us per round trip",
        "project": med_process, "peers": {"core_in_a_thread": med_thread},
        "ratios": {"process_minus_thread_us": med_process - med_thread},
        "details": {
            "requests": args.requests,
            "process_p90_us": statistics.quantiles(process, n=10)[-1] * 1e6,
            "thread_p90_us": statistics.quantiles(thread, n=10)[-1] * 1e6,
        },
    }
    path = write_result(args.out, result)
    log(f"round trip: core process {med_process:.0f} us, core thread {med_thread:.0f} us"
        f" (median of {args.requests}); written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
