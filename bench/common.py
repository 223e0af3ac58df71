"""Helpers shared by the benchmark scripts: what card this is, which commit, the card's
bandwidth floor, median-of-N timing after warm-up, a time budget, JSON results and the final
table. Imports torch lazily so that reading results needs no GPU stack.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS_DIR = REPO_ROOT / "bench" / "results"

_T0 = time.monotonic()


def log(message: str) -> None:
    """A progress line with seconds since start; flushed so it shows under a pipe."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", flush=True)


# --- where we run ----------------------------------------------------------------------------
def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def card_name(device: str) -> str:
    """The accelerator's marketing name, or the CPU's model name on a CPU run."""
    if device.startswith("cuda"):
        import torch

        return str(torch.cuda.get_device_name(torch.device(device)))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def git_commit(explicit: str | None = None) -> str:
    """The commit measured: an explicit value, else $TIDEQ_COMMIT, else `git rev-parse HEAD`
    (with a '-dirty' suffix when tracked files differ), else 'unknown' (a copied tree with no
    .git, as on the GPU machine)."""
    if explicit:
        return explicit
    if os.environ.get("TIDEQ_COMMIT"):
        return os.environ["TIDEQ_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
            check=True, timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def versions() -> dict[str, str]:
    import torch
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if torch.version.cuda:
        out["cuda"] = str(torch.version.cuda)
    return out


def today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


# --- device helpers --------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def free_device_memory(device: str) -> None:
    """Drop what the last contender left behind: Python garbage, compiled graphs (their CUDA
    graph pools hold memory) and the caching allocator's free blocks."""
    gc.collect()
    if device.startswith("cuda"):
        import torch

        try:
            torch._dynamo.reset()
        except Exception as err:  # compile state is best-effort cleanup, never fatal
            log(f"torch._dynamo.reset failed: {err}")
        gc.collect()
        torch.cuda.empty_cache()


def gpu_checkpoint(model_dir: Path, model: str) -> Path:
    """The random bf16 Llama checkpoint of shape `model` ("1b", "8b") in model_dir, built on
    the GPU when missing (engine/random_checkpoint.py), with the memory its build used given
    back."""
    import torch

    from engine.random_checkpoint import ensure_checkpoint

    path = ensure_checkpoint(model_dir / f"llama-{model}", arch="llama", shape=model,
                             dtype="bfloat16", seed=0, device="cuda")
    torch.cuda.empty_cache()
    return Path(path)


def deployment_engine_config(config_path: str | Path, model_path: Path) -> Any:
    """The EngineConfig a worker of the deployment `config_path` would run, on model_path."""
    from dataclasses import replace

    from tasks.config import load_config
    from tasks.worker import engine_config_for

    return replace(engine_config_for(load_config(config_path)), model_path=str(model_path))


def measure_bandwidth(
    device: str, nbytes: int, reps: int = 10, warmup: int = 3
) -> dict[str, float]:
    """The card's copy bandwidth: one large device-to-device copy, timed with CUDA events
    (wall clock on CPU), counted as bytes read + bytes written. Median of reps.

    Returns: {"bytes_per_s", "GBps", "copy_bytes", "reps"}.
    """
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)  # [N]
    src.fill_(1)
    dst = torch.empty_like(src)  # [N]
    for _ in range(warmup):
        dst.copy_(src)
    synchronize(device)
    seconds: list[float] = []
    for _ in range(reps):
        if device.startswith("cuda"):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds.append(time.perf_counter() - t0)
    del src, dst
    free_device_memory(device)
    bytes_per_s = 2 * nbytes / statistics.median(seconds)
    return {"bytes_per_s": bytes_per_s, "GBps": bytes_per_s / 1e9, "copy_bytes": float(nbytes),
            "reps": float(reps)}


# --- timing ----------------------------------------------------------------------------------
class Deadline:
    """A wall-clock budget for the whole run; None means no limit."""

    def __init__(self, budget_s: float | None) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s if budget_s and budget_s > 0 else None

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        if self.budget_s is None:
            return float("inf")
        return self.budget_s - self.elapsed()

    def expired(self) -> bool:
        return self.remaining() <= 0


@dataclass
class Repeated:
    """The figures of timed repetitions (each run returns its own figure, e.g. tokens/s)."""

    values: list[float] = field(default_factory=list)
    extras: list[dict[str, Any]] = field(default_factory=list)
    warmups: int = 0
    cut_short: bool = False  # the time budget stopped the repetitions early

    @property
    def median(self) -> float:
        return float(statistics.median(self.values))

    def summary(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "values": self.values,
            "reps": len(self.values),
            "warmups": self.warmups,
            "cut_short": self.cut_short,
            "runs": self.extras,
        }


def repeat(
    run: Callable[[], tuple[float, dict[str, Any]]],
    reps: int,
    warmups: Sequence[Callable[[], object]] = (),
    deadline: Deadline | None = None,
    label: str = "",
) -> Repeated:
    """Run each warm-up once, then `run` reps times; the figure is the median of the runs.

    A run whose predecessor took longer than the budget left is not started (at least one
    timed run always is), so a time budget shortens a contender instead of losing it.
    """
    out = Repeated(warmups=len(warmups))
    for i, warm in enumerate(warmups):
        t0 = time.perf_counter()
        warm()
        log(f"  {label} warm-up {i + 1}/{len(warmups)}: {time.perf_counter() - t0:.2f}s")
    last = 0.0
    for i in range(reps):
        if i > 0 and deadline is not None and deadline.remaining() < last:
            out.cut_short = True
            log(f"  {label}: time budget left ({deadline.remaining():.0f}s) < one run; "
                f"stopping after {i} rep(s)")
            break
        t0 = time.perf_counter()
        value, extra = run()
        last = time.perf_counter() - t0
        out.values.append(float(value))
        out.extras.append(extra)
        log(f"  {label} rep {i + 1}/{reps}: {value:,.1f} ({last:.2f}s)")
    return out


# --- results ---------------------------------------------------------------------------------
def result_path(out_dir: Path, record: dict[str, Any], suffix: str | None = None) -> Path:
    """DATE_CARD_WORKLOAD_MODEL[_SUFFIX].json, card and workload slugged (BENCHMARKS.md). The
    suffix tells apart several files of one workload and model (one per GPU count, say)."""
    parts = [record["date"], slug(record["card"]), slug(record["workload"]), slug(record["model"])]
    if suffix:
        parts.append(slug(suffix))
    return out_dir / f"{'_'.join(parts)}.json"


def write_result(out_dir: Path, record: dict[str, Any], suffix: str | None = None) -> Path:
    """Write one JSON object (atomically: a reader never sees half a file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = result_path(out_dir, record, suffix)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"


def print_table(records: Sequence[dict[str, Any]]) -> None:
    """The final table: card, workload, model, project figure, each peer, ratios."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tideq benchmarks", show_lines=True)
    for col in ("card", "workload", "model", "unit", "project", "peers", "ratios"):
        table.add_column(col, overflow="fold")
    for rec in records:
        notes = rec.get("errors", {}) | rec.get("skipped", {})
        peers = [f"{k}: {_fmt(v)}" for k, v in rec.get("peers", {}).items()]
        peers += [f"{k}: {str(v)[:60]}" for k, v in notes.items() if k != "project"]
        project = _fmt(rec.get("project"))
        if rec.get("project") is None and "project" in notes:
            project = f"- ({str(notes['project'])[:60]})"
        table.add_row(
            str(rec.get("card")), str(rec.get("workload")), str(rec.get("model")),
            str(rec.get("unit")), project, "\n".join(peers) or "-",
            "\n".join(f"{k}: {_fmt(v)}" for k, v in rec.get("ratios", {}).items()) or "-",
        )
    # A wide fixed width: the lead reads this from a captured log, not a terminal.
    Console(width=max(160, Console().width), file=sys.stdout).print(table)
