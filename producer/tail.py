"""`producer tail JOB_ID|BATCH_ID [--from-start]`: print jobs' text live as workers generate it.

Reads the Redis streams tideq:stream:<job_id> that workers write when the deployment sets
redis.stream_tokens (tasks/streams.py has their entries). A job: its text goes to stdout as it
comes. A batch: every job's text, each piece prefixed with `[custom_id]` (or `[line]`). Ends
when the job(s) end; exit code 0 when all are done, 1 when one failed or was cancelled or the
id is unknown.

Without --from-start it starts at the stream's end (a job that has already finished prints its
stored text); with it, the whole stream. A job that ends with no stream at all (streaming is
off) gets a note on stderr and its stored final text.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from rich.console import Console

from producer.client import Producer
from tasks import keys
from tasks.store import JobRecord
from tasks.streams import DONE, RESTART, TEXT, stream_key

# Milliseconds one XREAD waits for new entries.
BLOCK_MS = 1000
# Seconds between checks of unfinished jobs' records (a job that ends with no stream).
CHECK_S = 1.0
# A job whose record is finished but whose stream has no done entry yet: how many checks to
# wait for it (the worker writes it just after the record).
DONE_GRACE_CHECKS = 3

STREAMING_OFF = "streaming is off (redis.stream_tokens)"


@dataclass
class _Followed:
    job_id: str
    prefix: str | None  # None: a single job, no prefix
    last_id: str = "0-0"
    ended: bool = False
    state: str = ""
    printed: bool = False  # text printed since the last restart
    grace: int = 0


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


class _Printer:
    """Writes pieces of text; with prefixes, each run of one job's text starts a prefixed line."""

    def __init__(self, out: TextIO, err: Console) -> None:
        self.out = out
        self.err = err
        self.current: _Followed | None = None  # whose line is open
        self.mid_line = False

    def text(self, job: _Followed, piece: str) -> None:
        if not piece:
            return
        if job.prefix is None:
            self.out.write(piece)
        else:
            if self.current is not job:
                self._end_line()
                self.out.write(f"[{job.prefix}] ")
                self.current = job
            self.out.write(piece.replace("\n", f"\n[{job.prefix}] "))
        self.mid_line = not piece.endswith("\n")
        job.printed = True
        self.out.flush()

    def note(self, job: _Followed, message: str) -> None:
        self._end_line()
        who = f"job {job.job_id}" if job.prefix is None else f"[{job.prefix}]"
        self.err.print(f"{who}: {message}", markup=False, highlight=False)

    def end(self, job: _Followed) -> None:
        if job.prefix is None or self.current is job:
            self._end_line()

    def _end_line(self) -> None:
        if self.mid_line:
            self.out.write("\n")
            self.out.flush()
            self.mid_line = False
        self.current = None


def tail(producer: Producer, target: str, from_start: bool = False,
         out: TextIO | None = None, err: Console | None = None) -> int:
    """Follow a job or a batch (see the module docstring); returns the exit code."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else Console(stderr=True, soft_wrap=True)
    store, client = producer.store, producer.client
    record = store.job(target)
    if record is not None:
        records = [record]
        jobs = [_Followed(target, None)]
    elif client.exists(keys.batch_key(target)):
        records = list(store.iter_jobs(target))
        jobs = [_Followed(r.job_id, r.custom_id or str(r.line)) for r in records]
    else:
        err.print(f"unknown job or batch {target!r} (never submitted here, or its records"
                  " expired)", markup=False, highlight=False)
        return 1
    printer = _Printer(out, err)
    for job, rec in zip(jobs, records, strict=True):
        if from_start:
            continue
        last: Any = client.xrevrange(stream_key(job.job_id), count=1)
        if last:
            job.last_id = _text(last[0][0])
            if any(_text(k) == DONE for k in last[0][1]):
                _final(printer, job, rec, note=None)
        elif rec.state in keys.TERMINAL_STATES:
            _final(printer, job, rec, note=None if producer.config.redis.stream_tokens
                   else STREAMING_OFF)

    next_check = time.monotonic() + CHECK_S
    while True:
        pending = [j for j in jobs if not j.ended]
        if not pending:
            break
        by_key = {stream_key(j.job_id): j for j in pending}
        reply: Any = client.xread({k: j.last_id for k, j in by_key.items()}, count=1000,
                                  block=BLOCK_MS)
        for key, entries in reply or []:
            job = by_key[_text(key)]
            for entry_id, raw in entries:
                job.last_id = _text(entry_id)
                if job.ended:
                    continue
                fields = {_text(k): _text(v) for k, v in raw.items()}
                if TEXT in fields:
                    printer.text(job, fields[TEXT])
                elif RESTART in fields:
                    if job.printed:
                        printer.note(job, "the job's text starts over (it runs again)")
                        job.printed = False
                elif DONE in fields:
                    job.ended, job.state = True, fields.get("state", "")
                    printer.end(job)
                    if job.state != "done":
                        printer.note(job, f"ended: {job.state}")
        if not reply or time.monotonic() >= next_check:
            next_check = time.monotonic() + CHECK_S
            _check_records(producer, printer, [j for j in pending if not j.ended])
    return 0 if all(j.state == "done" for j in jobs) else 1


def _check_records(producer: Producer, printer: _Printer, pending: list[_Followed]) -> None:
    """End the jobs whose records say they ended but whose streams will not."""
    for job in pending:
        rec = producer.store.job(job.job_id)
        if rec is None:
            job.ended, job.state = True, "missing"
            printer.note(job, "its record is gone (expired)")
            continue
        if rec.state not in keys.TERMINAL_STATES:
            continue
        if not producer.client.exists(stream_key(job.job_id)):
            _final(printer, job, rec, note=STREAMING_OFF if rec.state == "done"
                   or not producer.config.redis.stream_tokens else None)
            continue
        job.grace += 1
        if job.grace >= DONE_GRACE_CHECKS:
            _final(printer, job, rec, note="its stream has no end entry; the stored text"
                   " follows" if not job.printed else None, text=not job.printed)


def _final(printer: _Printer, job: _Followed, rec: JobRecord, note: str | None,
           text: bool = True) -> None:
    """End a job with its stored outcome: its final text (when done) and its state."""
    job.ended, job.state = True, rec.state
    if note is not None:
        printer.note(job, f"no live text: {note}; its final text follows"
                     if rec.state == "done" else f"no live text: {note}")
    if text and rec.state == "done" and rec.result is not None:
        printer.text(job, str(rec.result.get("text", "")))
    printer.end(job)
    if rec.state != "done":
        printer.note(job, f"ended: {rec.state}")


def tail_command(producer: Producer, args: argparse.Namespace, err: Console) -> int:
    """The `tail` subcommand of producer/cli.py."""
    return tail(producer, args.target, from_start=args.from_start, err=err)
