"""`producer bench`: load a deployment with jobs and measure what the submitter sees.

    producer bench --jobs 200 --prompt-words 64 --max-tokens 128 --high-fraction 0.1
    producer bench --file prompts.jsonl --rate 20 --timeout 600 --json out.json --plot out.png

Every run is one new batch. Jobs are submitted through the Producer library, all at once or at
`--rate` jobs/s in small chunks (about ten submissions a second); each job carries its own
custom_id ("bench-<n>"), so its job id is fixed and submitting a chunk again adds nothing twice.
Job n is high priority when floor((n+1)*f) > floor(n*f) for f = --high-fraction, which spreads the
high jobs evenly through the run (floor(N*f) of them).

Measured per job, from the bench's own clock and the times the job record keeps:

    latency  finished_at - the time the bench handed the job's chunk to submit()
    TTFT     (started_at - that submit time) + the result's first_token_s: queue wait plus the
             engine's time to the first token, i.e. how long after submitting the first output
             token existed (the worker's and the submitter's clocks are assumed to agree)

Throughput (jobs/s, output tokens/s) of every priority is over the same window: from the first
submission to the last job finished, so the rows add up to the total.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from rich import box
from rich.table import Table

from producer.client import Producer, WaitTimeoutError
from producer.formats import LineInvalid
from tasks import keys
from tasks.store import JobRecord

# Submissions per second when --rate is given: each chunk holds about rate/SUBMITS_PER_S jobs.
SUBMITS_PER_S: Final = 10.0
CUSTOM_ID_PREFIX: Final = "bench-"
PERCENTILES: Final = (50, 95, 99)
# Words of the synthetic prompts (cycled, offset by the job's number).
_VOCABULARY: Final = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog",
                      "while", "seven", "wise", "owls", "watch", "from", "an", "old", "oak",
                      "tree", "near", "the", "quiet", "river", "bank")


class BenchInputError(ValueError):
    """The bench's input (file or options) is unusable; nothing was submitted."""


@dataclass
class BenchJob:
    custom_id: str
    priority: str
    line: dict[str, Any]
    submitted_at: float | None = None  # the bench's clock, when its chunk went to submit()


@dataclass
class Submission:
    at: float  # seconds since the run started
    priority: str
    jobs: int
    new: int


@dataclass
class BenchRun:
    batch_id: str
    jobs: list[BenchJob]
    started: float  # epoch seconds of the first submission
    submitted_s: float = 0.0  # seconds the submissions took
    submissions: list[Submission] = field(default_factory=list)
    timed_out: bool = False


def synthetic_lines(n: int, prompt_words: int, max_tokens: int | None) -> list[dict[str, Any]]:
    """n prompt lines of prompt_words words each (different from job to job)."""
    lines = []
    for i in range(n):
        words = [_VOCABULARY[(i + w) % len(_VOCABULARY)] for w in range(max(prompt_words, 1))]
        line: dict[str, Any] = {"prompt": f"{i}: " + " ".join(words)}
        if max_tokens is not None:
            line["max_tokens"] = max_tokens
        lines.append(line)
    return lines


def file_lines(path: str, n: int | None, producer: Producer) -> list[dict[str, Any]]:
    """The file's lines (each checked as submit would), cycled or cut to n if n is given."""
    lines: list[dict[str, Any]] = []
    problems: list[str] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                producer.parser.parse(raw, number)
            except LineInvalid as e:
                problems += [f"{path}:{number}: {fld}: {why}" if fld else f"{path}:{number}: {why}"
                             for fld, why in e.problems]
                continue
            lines.append(json.loads(raw))
    if problems:
        raise BenchInputError("\n".join(problems))
    if not lines:
        raise BenchInputError(f"{path}: no JSON lines")
    if n is None:
        return lines
    return [lines[i % len(lines)] for i in range(n)]


def assign(lines: Sequence[dict[str, Any]], high_fraction: float) -> list[BenchJob]:
    """A job per line: its own custom_id, and a priority (high ones spread evenly)."""
    if not 0.0 <= high_fraction <= 1.0:
        raise BenchInputError(f"--high-fraction: must be in [0, 1], not {high_fraction}")
    jobs = []
    for i, line in enumerate(lines):
        high = math.floor((i + 1) * high_fraction) > math.floor(i * high_fraction)
        cid = f"{CUSTOM_ID_PREFIX}{i:06d}"
        jobs.append(BenchJob(cid, keys.QUEUE_HIGH if high else keys.QUEUE_LOW,
                             {**line, "custom_id": cid}))
    return jobs


def chunk_size(n: int, rate: float | None) -> int:
    """Jobs per submission: all of them at once, or about rate/SUBMITS_PER_S at a rate."""
    if rate is None:
        return max(n, 1)
    if rate <= 0:
        raise BenchInputError(f"--rate: must be positive, not {rate}")
    return max(1, math.ceil(rate / SUBMITS_PER_S))


def submit_jobs(producer: Producer, batch_id: str, jobs: list[BenchJob], rate: float | None,
                on_chunk: Callable[[int, int], None] | None = None) -> BenchRun:
    """Submit the jobs as one batch, chunk by chunk (a submit() per priority in a chunk), at
    `rate` jobs/s if given. Records each job's submit time."""
    size = chunk_size(len(jobs), rate)
    run = BenchRun(batch_id=batch_id, jobs=jobs, started=time.time())
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tideq-bench-") as tmp:
        for start in range(0, len(jobs), size):
            chunk = jobs[start:start + size]
            if rate is not None:
                delay = t0 + start / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            for priority in keys.QUEUES:
                part = [j for j in chunk if j.priority == priority]
                if not part:
                    continue
                path = os.path.join(tmp, f"{priority}.jsonl")
                with open(path, "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(j.line, ensure_ascii=False) + "\n" for j in part)
                now = time.time()
                for j in part:
                    j.submitted_at = now
                report = producer.submit(path, priority=priority, batch_id=batch_id)
                run.submissions.append(Submission(now - run.started, priority, len(part),
                                                  report.new))
            if on_chunk is not None:
                on_chunk(start + len(chunk), len(jobs))
    run.submitted_s = time.monotonic() - t0
    return run


def wait_jobs(producer: Producer, run: BenchRun, timeout: float | None,
              progress: Callable[[Any], None] | None = None) -> None:
    try:
        producer.wait(run.batch_id, timeout=timeout, progress=progress, poll_s=0.2)
    except WaitTimeoutError:
        run.timed_out = True


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation between closest ranks); None if empty."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _float(fields: dict[str, str], name: str) -> float | None:
    try:
        return float(fields[name])
    except (KeyError, ValueError):
        return None


def measure(run: BenchRun, records: Sequence[JobRecord]) -> dict[str, Any]:
    """The report: per-job samples and per-priority (plus "all") summaries."""
    by_cid = {r.custom_id: r for r in records if r.custom_id}
    samples: list[dict[str, Any]] = []
    for job in run.jobs:
        rec = by_cid.get(job.custom_id)
        sample: dict[str, Any] = {"custom_id": job.custom_id, "priority": job.priority,
                                  "state": rec.state if rec else "missing",
                                  "submitted_at": job.submitted_at, "latency_s": None,
                                  "ttft_s": None, "finished_at": None, "completion_tokens": 0}
        if rec is not None and job.submitted_at is not None:
            finished = _float(rec.fields, "finished_at")
            started = _float(rec.fields, "started_at")
            if finished is not None and rec.state in keys.TERMINAL_STATES:
                sample["finished_at"] = finished
                sample["latency_s"] = finished - job.submitted_at
            if rec.state == "done" and rec.result is not None:
                sample["completion_tokens"] = int(rec.result.get("completion_tokens") or 0)
                first = rec.result.get("first_token_s")
                if started is not None and first is not None:
                    sample["ttft_s"] = (started - job.submitted_at) + float(first)
        samples.append(sample)
    ends = [s["finished_at"] for s in samples if s["finished_at"] is not None]
    window = max(max(ends) - run.started, 1e-9) if ends else None
    groups = {p: [s for s in samples if s["priority"] == p] for p in keys.QUEUES}
    groups["all"] = samples
    summary = {name: _summarize(group, window) for name, group in groups.items()}
    return {
        "batch_id": run.batch_id,
        "jobs": len(run.jobs),
        "started_at": run.started,
        "window_s": window,
        "submit_s": run.submitted_s,
        "timed_out": run.timed_out,
        "all_done": all(s["state"] == "done" for s in samples),
        "submissions": [vars(x) for x in run.submissions],
        "definitions": {
            "latency_s": "job finished_at minus the time the bench submitted it",
            "ttft_s": "queue wait (job started_at minus the bench's submit time) plus the"
                      " result's first_token_s",
            "throughput": "per priority over the whole run: first submission to last job"
                          " finished",
        },
        "by_priority": summary,
        "samples": samples,
    }


def _summarize(group: list[dict[str, Any]], window: float | None) -> dict[str, Any]:
    states: dict[str, int] = {}
    for s in group:
        states[s["state"]] = states.get(s["state"], 0) + 1
    done = [s for s in group if s["state"] == "done"]
    tokens = sum(s["completion_tokens"] for s in done)
    lat = [s["latency_s"] for s in done if s["latency_s"] is not None]
    ttft = [s["ttft_s"] for s in done if s["ttft_s"] is not None]
    return {
        "count": len(group),
        "states": states,
        "done": len(done),
        "completion_tokens": tokens,
        "jobs_per_s": len(done) / window if window else None,
        "tokens_per_s": tokens / window if window else None,
        "latency_s": {f"p{q}": percentile(lat, q) for q in PERCENTILES},
        "ttft_s": {f"p{q}": percentile(ttft, q) for q in PERCENTILES},
    }


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _secs(value: float | None) -> str:
    """Seconds in at most 6 characters below 10,000 s: 0.038, 12.34, 123.4."""
    if value is None:
        return "-"
    return format(value, ".3f" if value < 10 else ".2f" if value < 100 else ".1f")


def report_table(report: dict[str, Any]) -> Table:
    """The per-priority summary as a rich table; fits 80 columns."""
    table = Table(title=f"bench {report['batch_id']}", box=box.SIMPLE_HEAD, pad_edge=False,
                  padding=0,
                  caption="seconds; latency: submit to result; TTFT: queue wait + first token")
    heads = ["priority", "done", "jobs/s", "tok/s"]
    heads += [f"{what}\np{q}" for what in ("lat", "TTFT") for q in PERCENTILES]
    for name in heads:
        table.add_column(name, justify="left" if name == "priority" else "right", no_wrap=True)
    for name, row in report["by_priority"].items():
        if not row["count"]:
            continue
        table.add_row(
            name, f"{row['done']}/{row['count']}", _fmt(row["jobs_per_s"]),
            _fmt(row["tokens_per_s"], ".1f"),
            *(_secs(row["latency_s"][f"p{q}"]) for q in PERCENTILES),
            *(_secs(row["ttft_s"][f"p{q}"]) for q in PERCENTILES),
            style="bold" if name == "all" else None)
    return table


def write_json(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def write_plot(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """A PNG: the latency CDF per priority (TTFT dashed) and output tokens completed over time.
    Raises ImportError if matplotlib is not installed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    cdf, tokens = fig.subplots(1, 2)
    samples = [s for s in report["samples"] if s["state"] == "done"]
    start = report["started_at"]
    for priority in keys.QUEUES:
        group = [s for s in samples if s["priority"] == priority]
        for name, style in (("latency_s", "-"), ("ttft_s", "--")):
            values = sorted(s[name] for s in group if s[name] is not None)
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                cdf.step(values, ys, style, where="post",
                         label=f"{priority} {'latency' if name == 'latency_s' else 'TTFT'}")
        done = sorted((s["finished_at"] - start, s["completion_tokens"]) for s in group
                      if s["finished_at"] is not None)
        if done:
            total, xs, ys = 0, [0.0], [0]
            for t, n in done:
                total += n
                xs.append(t)
                ys.append(total)
            tokens.step(xs, ys, where="post", label=priority)
    cdf.set(xlabel="seconds after submit", ylabel="fraction of jobs",
            title="latency (solid) and TTFT (dashed) CDF")
    tokens.set(xlabel="seconds since the first submission", ylabel="output tokens completed",
               title="tokens completed over time")
    for ax in (cdf, tokens):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"bench {report['batch_id']}: {report['jobs']} jobs")
    fig.savefig(path, format="png", dpi=100)
