"""`producer`: submit prompt files and follow their batches from the shell.

    producer submit FILE [--priority high|low] [--batch-id ID] [--skip-invalid] [--wait]
    producer status BATCH [--json]
    producer wait BATCH [--timeout S]
    producer results BATCH [-o out.jsonl]
    producer cancel BATCH
    producer tail JOB_ID|BATCH_ID [--from-start]
    producer bench [--file F | --jobs N --prompt-words W --max-tokens T] [--rate R]
                   [--high-fraction F] [--timeout S] [--json PATH] [--plot PATH]
    producer --version

Every command takes --config PATH (else $TIDEQ_CONFIG, else the built-in defaults).
Machine-readable output (the batch id of submit, the JSONL of results) goes to stdout, the rest
to stderr. Exit codes: 0 ok; 1 jobs failed or were cancelled (wait), unknown batch (status,
results, cancel); 2 invalid file or arguments, unknown batch or timeout (wait); 3 Redis cannot
be reached.

Commands ride out a Redis restart (each retries for DEFAULT_OUTAGE_S); wait keeps waiting
through longer outages, saying so. A submit that Redis interrupts still prints its batch id on
stdout, says on stderr how many jobs went in and the command that enqueues the rest, and exits 3.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from itertools import chain
from typing import TYPE_CHECKING, Any, Final, TextIO
from urllib.parse import urlsplit, urlunsplit

import redis
from rich.console import Console

from producer.client import (
    BatchStatus,
    FileChangedError,
    InvalidFileError,
    Producer,
    SubmitInterruptedError,
    SubmitReport,
    UnknownBatchError,
    WaitTimeoutError,
)
from tasks import keys, redis_client
from tasks.config import ConfigError, config_source, load_config

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID
    from rich.table import Table

# rich's tables and progress bars, and `tail`'s streams, are imported by the commands that use
# them: the first job of a `submit` waits for every module imported before it
# (tests/producer/test_cli_imports.py keeps Celery and torch out of that path).

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1  # wait: some job failed or was cancelled; others: unknown batch
EXIT_INVALID: Final = 2  # invalid file/arguments/config; wait: unknown batch or timeout
EXIT_UNAVAILABLE: Final = 3  # Redis cannot be reached

# Line errors printed for a bad file; the rest are counted ("and N more").
MAX_PRINTED_ERRORS: Final = 50


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=None,
                        help="deployment config (default: $TIDEQ_CONFIG or built-in defaults)")
    parser = argparse.ArgumentParser(
        prog="producer", description="Submit JSONL prompt files to tideq and follow them.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("submit", parents=[common], help="validate a file and enqueue its jobs")
    p.add_argument("file", help="JSONL: prompt, messages or OpenAI batch request lines")
    p.add_argument("--priority", choices=keys.QUEUES, default=keys.QUEUE_LOW)
    p.add_argument("--batch-id", default=None,
                   help="add to this batch (default: a new id); resubmitting adds no duplicates")
    p.add_argument("--skip-invalid", action="store_true",
                   help="enqueue the valid lines even if some are invalid")
    p.add_argument("--wait", action="store_true", help="then wait for the batch to finish")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: seconds at most")

    for name, help_ in (("status", "counts of a batch's jobs by state and priority"),
                        ("cancel", "cancel a batch's queued and running jobs")):
        p = sub.add_parser(name, parents=[common], help=help_)
        p.add_argument("batch")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p = sub.add_parser("wait", parents=[common], help="wait for a batch, with a progress bar")
    p.add_argument("batch")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")
    p = sub.add_parser("results", parents=[common],
                       help="a batch's outputs as JSONL, in input order")
    p.add_argument("batch")
    p.add_argument("-o", "--output", default=None, help="write here instead of stdout")
    p = sub.add_parser("tail", parents=[common],
                       help="print a job's (or a batch's) text live (redis.stream_tokens)")
    p.add_argument("target", metavar="JOB_ID|BATCH_ID")
    p.add_argument("--from-start", action="store_true",
                   help="print the stream from its start, not from now")
    _bench_parser(sub.add_parser("bench", parents=[common],
                                 help="submit N jobs, wait, report throughput and latency"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `producer` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    # soft_wrap: a long error line stays one line (grep-able), not wrapped at the terminal width.
    err = Console(stderr=True, soft_wrap=True)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        err.print(str(e), markup=False, highlight=False)
        return EXIT_INVALID
    commands: dict[str, Callable[[Producer, argparse.Namespace, Console], int]] = {
        "submit": _submit,
        "status": _status,
        "wait": _wait,
        "results": _results,
        "cancel": _cancel,
        "tail": _tail,
        "bench": _bench,
    }
    try:
        with Producer(config) as producer:
            return commands[args.command](producer, args, err)
    except redis_client.OUTAGE_ERRORS as e:
        err.print(f"cannot reach Redis at {_safe_url(config.redis.url)} (config: "
                  f"{config_source(args.config)}): {e}", markup=False, highlight=False)
        return EXIT_UNAVAILABLE
    except redis.RedisError as e:
        err.print(f"Redis at {_safe_url(config.redis.url)} (config: "
                  f"{config_source(args.config)}) failed: {e}", markup=False, highlight=False)
        return EXIT_UNAVAILABLE


def _version() -> str:
    """The installed tideq's version (importlib.metadata), or "unknown" when not installed."""
    try:
        return importlib.metadata.version("tideq")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _safe_url(url: str) -> str:
    """The URL with its password, if any, masked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _submit(producer: Producer, args: argparse.Namespace, err: Console) -> int:
    try:
        report = producer.submit(args.file, priority=args.priority, batch_id=args.batch_id,
                                 skip_invalid=args.skip_invalid)
    except InvalidFileError as e:
        _print_errors(err, [str(x) for x in e.errors], e.error_count)
        err.print("nothing was enqueued", highlight=False)
        return EXIT_INVALID
    except SubmitInterruptedError as e:
        what = "became unreachable" if e.unreachable else "failed"
        err.print(f"batch {e.batch_id}: at least {e.enqueued} of {_plural(e.accepted, 'job')}"
                  f" enqueued before Redis {what} ({e.cause}); run `{_resubmit(args, e.batch_id)}`"
                  " again to enqueue the rest, without duplicates", markup=False, highlight=False)
        print(e.batch_id, flush=True)
        return EXIT_UNAVAILABLE
    except FileChangedError as e:
        err.print(f"producer submit: {e}", markup=False, highlight=False)
        if e.batch_id is not None:
            err.print(f"batch {e.batch_id}: at least {_plural(e.enqueued, 'job')} enqueued;"
                      f" `{_resubmit(args, e.batch_id)}` adds the missing ones (lines already"
                      " enqueued keep what they had)", markup=False, highlight=False)
            print(e.batch_id, flush=True)
        return EXIT_INVALID
    except (OSError, ValueError) as e:
        err.print(f"producer submit: {e}", markup=False, highlight=False)
        return EXIT_INVALID
    if report.skipped:
        _print_errors(err, [str(x) for x in report.errors], len(report.errors))
    _print_report(err, report, producer)
    print(report.batch_id, flush=True)
    if args.wait:
        return _wait_for(producer, report.batch_id, args.timeout, err)
    return EXIT_OK


def _resubmit(args: argparse.Namespace, batch_id: str) -> str:
    """The submit command line that adds the rest of an interrupted batch."""
    words = ["producer", "submit", args.file, "--batch-id", batch_id]
    if args.priority != keys.QUEUE_LOW:
        words += ["--priority", args.priority]
    if args.skip_invalid:
        words.append("--skip-invalid")
    if args.config is not None:
        words += ["--config", args.config]
    return shlex.join(words)


def _print_errors(err: Console, errors: list[str], count: int) -> None:
    for line in errors[:MAX_PRINTED_ERRORS]:
        err.print(line, markup=False, highlight=False)
    if count > MAX_PRINTED_ERRORS:
        err.print(f"... and {count - MAX_PRINTED_ERRORS} more", highlight=False)


def _print_report(err: Console, r: SubmitReport, producer: Producer | None = None) -> None:
    skipped = f", {_plural(r.skipped, 'invalid line')} skipped" if r.skipped else ""
    old = r.accepted - r.new
    if old == 0:
        what = f"{r.new} new, priority {r.priority}"
    elif r.new:  # the priority is the new jobs' only
        what = f"{r.new} new, priority {r.priority}, {old} already in the batch"
    else:
        what = f"0 new, {old} already in the batch"
    err.print(
        f"batch [bold]{r.batch_id}[/]: {_plural(r.accepted, 'job')} accepted, {what}{skipped}"
        f" (validated in {r.validate_s:.2f}s, enqueued in {r.enqueue_s:.2f}s)", highlight=False)
    if old and producer is not None:
        # JobStore.enqueue skips jobs already recorded: they keep the priority they had.
        others: dict[str, int] = {}
        for prio, states in producer.status(r.batch_id).by_priority.items():
            count = sum(states.values())
            if prio != r.priority and count:
                others[prio] = count
        if others:
            theirs = ", ".join(f"{n} {p}" for p, n in sorted(others.items()))
            err.print(f"note: --priority {r.priority} applies only to new jobs; the"
                      f" {_plural(old, 'job')} already in the batch keep their priority"
                      f" (batch: {theirs})", highlight=False)


def _tail(producer: Producer, args: argparse.Namespace, err: Console) -> int:
    from producer.tail import tail_command

    return tail_command(producer, args, err)


def _status(producer: Producer, args: argparse.Namespace, err: Console) -> int:
    try:
        status = producer.status(args.batch)
    except UnknownBatchError:
        return _unknown(err, args.batch, EXIT_FAILED)
    if getattr(args, "json", False):
        print(json.dumps(status_dict(status)), flush=True)
    else:
        Console().print(status_table(status))
    return EXIT_OK


def status_dict(status: BatchStatus) -> dict[str, object]:
    """The batch's counts, machine-readable (`producer status BATCH --json`)."""
    return {
        "batch_id": status.batch_id,
        "total": status.total,
        "finished": status.finished,
        "cancelled": status.cancelled,
        "completion_tokens": status.completion_tokens,
        "by_state": {s: status.count(s) for s in keys.STATES},
        "by_priority": {p: {s: states.get(s, 0) for s in keys.STATES}
                        for p, states in status.by_priority.items()},
    }


def status_table(status: BatchStatus) -> Table:
    """A rich table of the batch's jobs: a row per priority, a column per state."""
    from rich.table import Table
    from rich.text import Text

    title = f"batch {status.batch_id}" + (" (cancelled)" if status.cancelled else "")
    # no_wrap everywhere: the batch id stays on one line at 80 columns (it is copied from here).
    table = Table(title=Text(title, no_wrap=True, overflow="ignore"),
                  caption=f"{status.completion_tokens} completion tokens")
    table.add_column("priority", no_wrap=True)
    for state in keys.STATES:
        table.add_column(state, justify="right", no_wrap=True)
    table.add_column("total", justify="right", no_wrap=True)
    for priority in (*keys.QUEUES, *sorted(set(status.by_priority) - set(keys.QUEUES))):
        states = status.by_priority.get(priority)
        if states:
            table.add_row(priority, *(str(states[s]) for s in keys.STATES),
                          str(sum(states.values())))
    table.add_row("all", *(str(status.count(s)) for s in keys.STATES), str(status.total),
                  style="bold")
    return table


def _wait(producer: Producer, args: argparse.Namespace, err: Console) -> int:
    return _wait_for(producer, args.batch, args.timeout, err)


def wait_progress(console: Console, batch_id: str) -> tuple[Progress, TaskID]:
    """The progress display of `wait`: fits 80 columns without wrapping the batch id (the bar
    takes what is left)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.table import Column

    progress = Progress(
        TextColumn("{task.description}", table_column=Column(no_wrap=True)),
        BarColumn(bar_width=None),
        MofNCompleteColumn(table_column=Column(no_wrap=True)),
        TextColumn("{task.fields[states]}", table_column=Column(no_wrap=True)),
        TextColumn("{task.fields[rate]}", table_column=Column(no_wrap=True)),
        TimeElapsedColumn(),
        console=console,
    )
    task = progress.add_task(batch_id, total=None, states="", rate="")
    return progress, task


def progress_fields(status: BatchStatus) -> dict[str, Any]:
    """The state counts of the progress line: failed/cancelled only when there are some."""
    parts = [f"{status.count('done')} done"]
    parts += [f"{status.count(s)} {s}" for s in ("failed", "cancelled") if status.count(s)]
    return {"states": ", ".join(parts)}


def _overall_rate(producer: Producer, batch_id: str, tokens: int) -> str:
    """A finished batch's tokens/s over its life (first submitted to last finished)."""
    try:
        records = list(producer.store.iter_jobs(batch_id))
    except UnknownBatchError:
        return ""
    starts = [float(r.fields["submitted_at"]) for r in records if "submitted_at" in r.fields]
    ends = [float(r.fields["finished_at"]) for r in records if "finished_at" in r.fields]
    if not starts or not ends or max(ends) <= min(starts):
        return ""
    return f"{tokens / (max(ends) - min(starts)):.1f} tok/s overall"


def _wait_for(producer: Producer, batch_id: str, timeout: float | None, err: Console) -> int:
    started = time.monotonic()
    first_tokens: list[int] = []
    progress, task = wait_progress(err, batch_id)

    def update(status: BatchStatus) -> None:
        fields = progress_fields(status)
        if not first_tokens:
            first_tokens.append(status.completion_tokens)
            if status.finished:  # finished before wait began: no rate of its own to show
                fields["rate"] = _overall_rate(producer, batch_id, status.completion_tokens)
        else:
            elapsed = max(time.monotonic() - started, 1e-9)
            fields["rate"] = f"{(status.completion_tokens - first_tokens[0]) / elapsed:.1f} tok/s"
        progress.update(task, total=status.total, completed=status.finished_count, **fields)

    url = _safe_url(producer.config.redis.url)

    def outage(e: Exception | None) -> None:
        if e is not None:
            until = "it is back" if timeout is None else "it is back or the timeout"
            err.print(f"Redis at {url} is unreachable ({e}); retrying until {until}",
                      markup=False, highlight=False)
        else:
            err.print(f"Redis at {url} is reachable again; still waiting", markup=False,
                      highlight=False)

    try:
        with progress:
            status = producer.wait(batch_id, timeout=timeout, progress=update, on_outage=outage)
    except UnknownBatchError:
        return _unknown(err, batch_id, EXIT_INVALID)
    except WaitTimeoutError as e:
        err.print(f"timed out: {e}", markup=False, highlight=False)
        return EXIT_INVALID
    if status.succeeded:
        return EXIT_OK
    err.print(f"batch {batch_id}: {status.count('failed')} failed,"
              f" {status.count('cancelled')} cancelled", highlight=False)
    return EXIT_FAILED


def _results(producer: Producer, args: argparse.Namespace, err: Console) -> int:
    rows = producer.results(args.batch)
    try:
        first = next(rows, None)
    except UnknownBatchError:
        return _unknown(err, args.batch, EXIT_FAILED)
    count = 0
    # States of the jobs not finished yet (an OpenAI batch row has "state" only then).
    unfinished: Counter[str] = Counter()
    with _output(args.output) as out:
        for row in chain(() if first is None else (first,), rows):
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
            state = row.get("state")
            if state is not None and state not in keys.TERMINAL_STATES:
                unfinished[state] += 1
    if args.output:
        err.print(f"{_plural(count, 'result')} written to {args.output}", markup=False,
                  highlight=False)
    if unfinished:
        n = sum(unfinished.values())
        order = [s for s in keys.STATES if s in unfinished]
        order += sorted(set(unfinished) - set(order))  # "missing": the record expired
        states = ", ".join(f"{unfinished[s]} {s}" for s in order)
        err.print(f"warning: batch {args.batch}: {n} of {_plural(count, 'job')}"
                  f" {'is' if n == 1 else 'are'} not finished yet ({states}); their rows carry"
                  " no output", markup=False, highlight=False)
    return EXIT_OK


def _output(path: str | None) -> AbstractContextManager[TextIO]:
    return open(path, "w", encoding="utf-8") if path else nullcontext(sys.stdout)


def _cancel(producer: Producer, args: argparse.Namespace, err: Console) -> int:
    try:
        n = producer.cancel(args.batch)
    except UnknownBatchError:
        return _unknown(err, args.batch, EXIT_FAILED)
    err.print(f"batch {args.batch}: {_plural(n, 'queued job')} cancelled; running jobs stop at"
              " their next cancellation check", highlight=False)
    return EXIT_OK


def _unknown(err: Console, batch_id: str, code: int) -> int:
    err.print(f"unknown batch {batch_id!r} (never submitted here, or its records expired)",
              markup=False, highlight=False)
    return code


def _bench_parser(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--file", default=None,
                     help="JSONL prompt file (with --jobs: its lines cycled or cut to N)")
    p.add_argument("--jobs", type=int, default=None, help="jobs to submit (synthetic: 100)")
    p.add_argument("--prompt-words", type=int, default=32, help="synthetic prompt length")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="synthetic jobs' max_tokens (default: the deployment's)")
    p.add_argument("--rate", type=float, default=None,
                   help="jobs/s, in chunks of ~rate/10 (default: all at once)")
    p.add_argument("--high-fraction", type=float, default=0.1,
                   help="share of high-priority jobs, spread evenly (default 0.1)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait after the last submission (default: for ever)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="report file (default bench-<batch>.json)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="PNG plot (default bench-<batch>.png)")


def _bench(producer: Producer, args: argparse.Namespace, err: Console) -> int:
    from producer import bench
    from producer.client import new_batch_id

    try:
        if args.jobs is not None and args.jobs < 1:
            raise bench.BenchInputError(f"--jobs: must be at least 1, not {args.jobs}")
        if args.file is not None:
            lines = bench.file_lines(args.file, args.jobs, producer)
        else:
            lines = bench.synthetic_lines(100 if args.jobs is None else args.jobs,
                                          args.prompt_words, args.max_tokens)
        jobs = bench.assign(lines, args.high_fraction)
        bench.chunk_size(len(jobs), args.rate)
    except (bench.BenchInputError, OSError, ValueError) as e:
        err.print(f"producer bench: {e}", markup=False, highlight=False)
        return EXIT_INVALID
    batch_id = new_batch_id()
    progress, task = wait_progress(err, batch_id)
    with progress:
        progress.update(task, description=f"{batch_id} submit", total=len(jobs))
        try:
            run = bench.submit_jobs(producer, batch_id, jobs, args.rate,
                                    on_chunk=lambda n, _: progress.update(task, completed=n))
        except InvalidFileError as e:
            progress.stop()
            _print_errors(err, [str(x) for x in e.errors], e.error_count)
            return EXIT_INVALID
        progress.update(task, description=batch_id, completed=0)

        def update(status: BatchStatus) -> None:
            progress.update(task, total=status.total, completed=status.finished_count,
                            **progress_fields(status))

        bench.wait_jobs(producer, run, args.timeout, update)
    if run.timed_out:
        err.print(f"batch {batch_id}: timed out after {args.timeout}s; reporting the jobs"
                  " finished so far", highlight=False)
    report = bench.measure(run, list(producer.store.iter_jobs(batch_id)))
    Console().print(bench.report_table(report))
    json_path = args.json or f"bench-{batch_id}.json"
    bench.write_json(report, json_path)
    err.print(f"report written to {json_path}", markup=False, highlight=False)
    plot_path = args.plot or f"bench-{batch_id}.png"
    try:
        bench.write_plot(report, plot_path)
        err.print(f"plot written to {plot_path}", markup=False, highlight=False)
    except ImportError:
        err.print("no plot: matplotlib is not installed (pip install 'matplotlib>=3.8')",
                  highlight=False)
    return EXIT_OK if report["all_done"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
