"""Where a W-priority run's high jobs spent their time, from the engine's step trace.

Run the benchmark with TIDEQ_STEP_TRACE=DIR (every engine core writes DIR/steps-<pid>.jsonl,
engine/core/step_trace.py), then give this the run's W-priority record and the trace of the
worker that served it (the one whose steps cover the record's window):

    TIDEQ_STEP_TRACE=/tmp/traces python3 bench/bench_system.py --workload priority ...
    python3 bench/step_trace_summary.py RECORD.json /tmp/traces/steps-PID.jsonl [--out F]

It reports the steps inside the flood window (decode and mixed apart: how many, how long,
their rows and prefill tokens, the host's gaps between them) and, for the slowest high jobs,
how many steps they spanned and the step's average period, so that a slow job can be told
from a slow step; and, from each high job's first and last step, how long it took to reach
the engine, how long it was in it, and how long its outcome took to be stored after its last
step (what found the front's tokenizer lock holding finished jobs back 50-150 ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def load_steps(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def kind_summary(steps: list[dict[str, Any]]) -> dict[str, Any]:
    if not steps:
        return {"steps": 0}
    ms = sorted(s["ms"] for s in steps)
    summary = {
        "steps": len(steps),
        "ms_mean": statistics.fmean(ms),
        "ms_p50": ms[len(ms) // 2],
        "ms_p90": ms[int(0.9 * (len(ms) - 1))],
        "decode_rows_mean": statistics.fmean(s["decode"] for s in steps),
        "prefill_tokens_mean": statistics.fmean(s["prefill"] for s in steps),
    }
    if "wait_ms" in steps[0]:  # traces since the call's time was split
        summary["launch_ms_mean"] = statistics.fmean(s["launch_ms"] for s in steps)
        summary["wait_ms_mean"] = statistics.fmean(s["wait_ms"] for s in steps)
        # steps whose call hardly waited for the device: the host set their pace
        summary["host_bound_share"] = sum(s["wait_ms"] < 0.05 for s in steps) / len(steps)
    return summary


def high_jobs_in_engine(flood: dict[str, Any], interval: float,
                        steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each high job's time split at the engine's edges, where the record keeps each job's
    queue wait: a high job is taken to enter the engine at the step where the count of high
    chunks rises and to leave it where the count falls, in submission order (high jobs are
    admitted first come, first served, and each computes the same number of steps).

    Returns per job: `to_engine_ms` from its start by a task thread (submitted_at + queue
    wait) to its first step, `in_engine_ms` its first to its last step, and `after_ms` its
    last step to its stored outcome. A long `to_engine_ms` or `after_ms` is the front's."""
    waits = flood.get("queue_waits")
    if not waits:
        return []
    t0 = flood["window"][0]
    entered: list[float] = []
    left: list[float] = []
    before = 0
    for step in steps:
        high = step["high"]
        if high > before:
            entered += [step["t"]] * (high - before)
        elif high < before:
            left += [step["t"]] * (before - high)
        before = high
    jobs = []
    for i, (latency, wait) in enumerate(zip(flood["latencies"], waits, strict=False)):
        if i >= len(entered) or i >= len(left):
            break
        submitted = t0 + i * interval
        jobs.append({"job": i, "latency_s": latency,
                     "to_engine_ms": 1e3 * (entered[i] - submitted - wait),
                     "in_engine_ms": 1e3 * (left[i] - entered[i]),
                     "after_ms": 1e3 * (submitted + latency - left[i])})
    return jobs


def summarize(record: dict[str, Any], steps: list[dict[str, Any]],
              slowest: int = 5) -> dict[str, Any]:
    flood = record["details"]["under_flood"]
    t0, t1 = flood["window"]
    window = [s for s in steps if t0 <= s["t"] <= t1]
    if len(window) < 2:
        raise SystemExit("the trace has no steps in the record's flood window: another worker's?")
    gaps = [b["t"] - (a["t"] + a["ms"] / 1e3) for a, b in zip(window, window[1:], strict=False)]
    span = window[-1]["t"] - window[0]["t"]
    interval = record["settings"]["high_interval_s"]
    latencies = flood["latencies"]
    jobs = []
    for i, latency in enumerate(latencies):
        start = t0 + i * interval  # submitted one every interval from the window's start
        spanned = [s for s in window if start <= s["t"] <= start + latency]
        if spanned:
            jobs.append({"job": i, "latency_s": latency, "steps": len(spanned),
                         "period_ms": 1e3 * latency / len(spanned),
                         "mixed_steps": sum(1 for s in spanned if s["prefill"]),
                         # what made a slow job's steps slow: more rows, more prefill, or
                         # one long step
                         "decode_rows_mean": statistics.fmean(s["decode"] for s in spanned),
                         "prefill_tokens": sum(s["prefill"] for s in spanned),
                         "slowest_step_ms": max(s["ms"] for s in spanned)})
    jobs.sort(key=lambda j: -j["latency_s"])
    edges = high_jobs_in_engine(flood, interval,
                                [s for s in steps if t0 - interval <= s["t"] <= t1 + 1.0])
    edges.sort(key=lambda j: -j["latency_s"])
    return {
        "commit": record.get("commit"), "card": record.get("card"),
        "strategy": record.get("strategy"), "window_s": span,
        "period_ms": 1e3 * span / (len(window) - 1),
        "gap_ms_mean": 1e3 * statistics.fmean(gaps), "gap_ms_max": 1e3 * max(gaps),
        "decode": kind_summary([s for s in window if not s["prefill"]]),
        "mixed": kind_summary([s for s in window if s["prefill"]]),
        "slowest_high_jobs": jobs[:slowest],
        "median_high_job": jobs[len(jobs) // 2] if jobs else None,
        # where the slowest high jobs' time went: before, inside and after the engine
        "slowest_high_jobs_at_the_engine": edges[:slowest],
        "median_high_job_at_the_engine": edges[len(edges) // 2] if edges else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("record", type=Path, help="a W-priority JSON record")
    parser.add_argument("trace", type=Path, help="the serving worker's steps-<pid>.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="write the summary here too")
    args = parser.parse_args()
    summary = summarize(json.loads(args.record.read_text()), load_steps(args.trace))
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
