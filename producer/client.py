"""The producer's client: submit a prompt file as a batch, then follow it in Redis.

    producer = Producer(load_config())
    report = producer.submit("prompts.jsonl", priority="high")
    producer.wait(report.batch_id, timeout=600)
    for row in producer.results(report.batch_id): ...

submit() reads the file twice and never holds it in memory: pass 1 validates every line and
keeps a byte of state per line (plus each custom_id, to find duplicates); only if the whole file
is good (or skip_invalid is set) does pass 2 parse it again, build each job's Celery message and
hand chunks to JobStore.enqueue, one Redis round trip per chunk, while the next chunk is built.
The first chunk is small, so that workers start on it while the rest is still being built; the
chunks after it grow to ENQUEUE_CHUNK.

Redis going away is ridden out: every command is retried through an outage of up to outage_s
(tasks.redis_client.connect), and wait() keeps polling through longer ones. A submit that still
cannot finish raises SubmitInterruptedError, which names the batch and how far it got; submitting
the file again to that batch enqueues the rest (JobStore.enqueue skips jobs already recorded).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

import redis

from producer.formats import ENDPOINT_CHAT, LineInvalid, LineParser, line_custom_id_collision
from tasks import keys, redis_client
from tasks.config import DeploymentConfig
from tasks.messages import MessageBuilder
from tasks.store import JobRecord, JobStore, QueuedJob, UnknownBatchError

__all__ = [
    "BatchStatus",
    "FileChangedError",
    "InvalidFileError",
    "LineError",
    "Producer",
    "SubmitInterruptedError",
    "SubmitReport",
    "UnknownBatchError",
    "WaitTimeoutError",
]

# Jobs per JobStore.enqueue call: one Lua call each. Large enough that the round trip is noise,
# small enough that one call blocks Redis for only a few milliseconds.
ENQUEUE_CHUNK: Final = 1000
# Jobs of the first call. Building a job costs tens of microseconds, so a first chunk of
# ENQUEUE_CHUNK would leave the workers idle for as long as it takes to build (~0.1 s for a
# file of long prompts); a small one reaches Redis milliseconds after validation ends. Each
# later chunk is ENQUEUE_CHUNK_GROWTH times the one before, up to ENQUEUE_CHUNK: it is built
# while its predecessor is in Redis, and the calls of a large file stay few.
FIRST_ENQUEUE_CHUNK: Final = 64
ENQUEUE_CHUNK_GROWTH: Final = 4
# Line errors kept for the report; beyond this only the count grows (a file of 10 million bad
# lines must not need 10 million error objects).
MAX_KEPT_ERRORS: Final = 10_000
# Seconds between polls of a batch's counters in wait().
DEFAULT_POLL_S: Final = 0.5
# Seconds of a Redis outage that each command rides out (retrying with backoff) before it fails:
# a restart takes a few seconds, a failover tens.
DEFAULT_OUTAGE_S: Final = 30.0
# wait() polls through a client that gives up sooner, so that it can say Redis is unreachable
# while it keeps trying; between failed polls it backs off from poll_s up to this.
POLL_OUTAGE_S: Final = 1.0
POLL_BACKOFF_CAP_S: Final = 4.0
# Random hex digits of a generated batch id: 48 bits, collisions are not a concern.
BATCH_ID_HEX_DIGITS: Final = 12
BATCH_ID_PREFIX: Final = "b-"
# Batch ids become Redis keys and job id prefixes: no ':' (the job id separator), no spaces.
BATCH_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# Per-line state kept between the two passes (one byte a line).
_BLANK, _VALID, _VALID_CUSTOM_ID, _INVALID = 0, 1, 2, 3


@dataclass(frozen=True)
class LineError:
    """One problem of a file: `FILE:LINE: field: reason`, or `FILE: reason` for the file as a
    whole (line None, field empty)."""

    path: str
    line: int | None
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.field}: {self.reason}" if self.field else f"{where}: {self.reason}"


class InvalidFileError(ValueError):
    """The file has errors and nothing was enqueued.

    errors holds the first MAX_KEPT_ERRORS of them, in line order; error_count counts all.
    """

    def __init__(self, errors: list[LineError], error_count: int | None = None) -> None:
        self.errors = errors
        self.error_count = len(errors) if error_count is None else error_count
        first = str(errors[0]) if errors else "invalid file"
        more = f" (and {self.error_count - 1} more)" if self.error_count > 1 else ""
        super().__init__(first + more)


class FileChangedError(RuntimeError):
    """The file changed between validation and enqueueing; part of it may be enqueued.
    Submitting it again to the same batch adds only the missing jobs.

    submit() sets batch_id (the batch it was enqueueing to) and enqueued (jobs known to be in)."""

    batch_id: str | None = None
    enqueued: int = 0


class SubmitInterruptedError(redis.RedisError):
    """Redis failed (past the outage the client rides out) while submit() was enqueueing.

    Part of the batch may be in Redis: submit the same file again with batch_id=.batch_id (and
    the same priority) to enqueue the rest; jobs already recorded are not enqueued twice.

    Attributes:
        batch_id, priority: where the jobs were going.
        enqueued: jobs enqueued by the chunks whose Redis call returned. The chunk in flight
            when Redis failed may have gone in as well: at least this many are in.
        accepted: the jobs of the file (its valid lines).
        cause: the Redis error (also __cause__).
    """

    def __init__(self, batch_id: str, priority: str, enqueued: int, accepted: int,
                 cause: redis.RedisError) -> None:
        what = ("became unreachable" if isinstance(cause, redis_client.OUTAGE_ERRORS)
                else "failed")
        super().__init__(
            f"batch {batch_id}: at least {enqueued} of {accepted} jobs enqueued before Redis"
            f" {what} ({cause}); submit the file again with batch id {batch_id} to enqueue the"
            " rest, without duplicates")
        self.batch_id = batch_id
        self.priority = priority
        self.enqueued = enqueued
        self.accepted = accepted
        self.cause = cause
        self.unreachable = isinstance(cause, redis_client.OUTAGE_ERRORS)


class WaitTimeoutError(TimeoutError):
    """wait() gave up; `status` is the batch's last known status (the batch exists)."""

    def __init__(self, status: BatchStatus) -> None:
        super().__init__(
            f"batch {status.batch_id}: {status.finished_count} of {status.total} finished"
        )
        self.status = status


@dataclass
class SubmitReport:
    """What submit() did. new < accepted when jobs of the batch were already there."""

    batch_id: str
    priority: str
    accepted: int  # valid lines, each a job of the batch
    new: int  # jobs enqueued by this call
    skipped: int  # invalid lines left out (skip_invalid only)
    errors: list[LineError] = field(default_factory=list)
    validate_s: float = 0.0
    enqueue_s: float = 0.0


@dataclass
class BatchStatus:
    """A batch's counters: jobs per priority and state, output tokens so far."""

    batch_id: str
    total: int
    by_priority: dict[str, dict[str, int]]
    completion_tokens: int
    cancelled: bool

    @classmethod
    def from_counts(cls, batch_id: str, counts: dict[str, int]) -> BatchStatus:
        by_priority: dict[str, dict[str, int]] = {}
        for name, value in counts.items():
            priority, sep, state = name.partition(":")
            if sep and state in keys.STATES:
                by_priority.setdefault(priority, dict.fromkeys(keys.STATES, 0))[state] = value
        return cls(
            batch_id=batch_id,
            total=counts.get("total", 0),
            by_priority=by_priority,
            completion_tokens=counts.get("completion_tokens", 0),
            cancelled=bool(counts.get("cancelled", 0)),
        )

    def count(self, state: str) -> int:
        """Jobs in `state`, all priorities together."""
        return sum(states.get(state, 0) for states in self.by_priority.values())

    @property
    def finished_count(self) -> int:
        return sum(self.count(s) for s in keys.TERMINAL_STATES)

    @property
    def finished(self) -> bool:
        return self.finished_count >= self.total

    @property
    def succeeded(self) -> bool:
        """Finished, and every job done (none failed or cancelled)."""
        return self.finished and self.count("done") == self.total


ProgressCallback = Callable[[BatchStatus], None]
# Called by wait() with the error when Redis stops answering, with None when it answers again.
OutageCallback = Callable[[Exception | None], None]


@dataclass
class _Scan:
    """Pass 1's result: per-line state and the errors found; then pass 2's progress."""

    flags: bytearray
    valid: int = 0
    invalid: int = 0  # bad lines
    error_count: int = 0  # problems found (a bad line may have several)
    errors: list[LineError] = field(default_factory=list)
    # Pass 2: jobs enqueued by the chunks whose JobStore.enqueue call has returned.
    enqueued_new: int = 0

    def bad_line(self, errors: list[LineError]) -> None:
        self.invalid += 1
        self.error_count += len(errors)
        self.errors.extend(errors[: MAX_KEPT_ERRORS - len(self.errors)])


class Producer:
    """Submits prompt files as batches of jobs and reads their state and results from Redis.

    Args:
        config: the deployment (redis.url, redis.result_ttl_s, the limits lines must respect).
        client: a Redis client to use instead of one made from config.redis.url (wait() then
            polls through it too).
        outage_s: seconds of a Redis outage (a restart, a failover) that each command rides
            out before it fails; default DEFAULT_OUTAGE_S.
    """

    def __init__(self, config: DeploymentConfig, client: redis.Redis | None = None,
                 outage_s: float | None = None) -> None:
        self.config = config
        if outage_s is None:
            outage_s = DEFAULT_OUTAGE_S
        self.client = client or redis_client.connect(config.redis.url, outage_s=outage_s)
        self.store = JobStore(self.client, config.redis.result_ttl_s)
        # wait()'s polls: quick to fail, so that wait() can say so while it keeps polling.
        self._poll_client = client or redis_client.connect(
            config.redis.url, outage_s=min(outage_s, POLL_OUTAGE_S))
        self._poll_store = JobStore(self._poll_client, config.redis.result_ttl_s)
        self.parser = LineParser(config.limits.max_output_tokens,
                                 config.limits.default_max_tokens)
        self.messages = MessageBuilder()
        # Jobs per Celery message (the deployment's jobs_per_message).
        self.jobs_per_message = config.jobs_per_message

    def close(self) -> None:
        self.client.close()
        if self._poll_client is not self.client:
            self._poll_client.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- submit --------------------------------------------------------------------------
    def submit(
        self,
        path: str | os.PathLike[str],
        priority: str = keys.QUEUE_LOW,
        batch_id: str | None = None,
        skip_invalid: bool = False,
    ) -> SubmitReport:
        """Validate the file, then enqueue one job per valid line; returns at once.

        Raises:
            InvalidFileError: the file is empty, or has errors and skip_invalid is off, or no
                line is valid; nothing was enqueued.
            ValueError: unknown priority or malformed batch_id.
            FileChangedError: the file changed while it was being enqueued (.batch_id and
                .enqueued say how far it got).
            SubmitInterruptedError: Redis failed while jobs were being enqueued (after riding
                out outage_s of it); it says which batch and how many jobs went in.
        """
        if priority not in keys.QUEUES:
            raise ValueError(f"priority: must be one of {', '.join(keys.QUEUES)}, not {priority!r}")
        if batch_id is None:
            batch_id = new_batch_id()
        elif not BATCH_ID_PATTERN.fullmatch(batch_id):
            raise ValueError(
                f"batch id {batch_id!r}: use 1-128 letters, digits, '.', '_' or '-'"
                " (starting with a letter or digit)"
            )
        name = os.fspath(path)
        started = time.perf_counter()
        scan = self._validate(name)
        validated = time.perf_counter()
        if scan.valid == 0 and scan.invalid == 0:
            raise InvalidFileError([LineError(name, None, "", "empty file (no JSON lines)")])
        if scan.invalid and (not skip_invalid or scan.valid == 0):
            raise InvalidFileError(scan.errors, scan.error_count)
        try:
            new = self._enqueue(name, scan, batch_id, priority)
        except redis.RedisError as err:
            raise SubmitInterruptedError(batch_id, priority, scan.enqueued_new, scan.valid,
                                         err) from err
        except FileChangedError as err:
            err.batch_id, err.enqueued = batch_id, scan.enqueued_new
            raise
        return SubmitReport(
            batch_id=batch_id,
            priority=priority,
            accepted=scan.valid,
            new=new,
            skipped=scan.invalid,
            errors=scan.errors,
            validate_s=validated - started,
            enqueue_s=time.perf_counter() - validated,
        )

    def _validate(self, path: str) -> _Scan:
        """Pass 1: every line checked, a byte of state kept per line (index = line number)."""
        scan = _Scan(flags=bytearray(1))  # index 0 unused: line numbers start at 1
        custom_ids: dict[str, int] = {}
        flags = scan.flags
        parse = self.parser.parse
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    flags.append(_BLANK)
                    continue
                try:
                    parsed = parse(raw, number)
                except LineInvalid as err:
                    flags.append(_INVALID)
                    scan.bad_line([LineError(path, number, f, r) for f, r in err.problems])
                    continue
                cid = parsed.custom_id
                if cid is None:
                    flags.append(_VALID)
                    scan.valid += 1
                elif cid in custom_ids:
                    flags.append(_INVALID)
                    scan.bad_line([LineError(path, number, "custom_id",
                                             f"{cid!r} is also the custom_id of line"
                                             f" {custom_ids[cid]}")])
                else:
                    custom_ids[cid] = number
                    flags.append(_VALID_CUSTOM_ID)
                    scan.valid += 1
        self._check_job_id_collisions(path, scan, custom_ids)
        return scan

    @staticmethod
    def _check_job_id_collisions(path: str, scan: _Scan, custom_ids: dict[str, int]) -> None:
        # A line without custom_id gets job id "<batch>:L<line>"; a custom_id "L<n>" on another
        # line would take the same id and one of the two jobs would silently vanish.
        late: list[LineError] = []
        for cid, number in custom_ids.items():
            if not cid.startswith("L"):
                continue
            other = line_custom_id_collision(cid)
            if other is not None and other < len(scan.flags) and scan.flags[other] == _VALID:
                scan.flags[number] = _INVALID
                scan.valid -= 1
                late.append(LineError(path, number, "custom_id",
                                      f"{cid!r} is the job id of line {other}, which has no"
                                      " custom_id"))
        if late:
            for err in late:
                scan.bad_line([err])
            scan.errors.sort(key=lambda e: e.line or 0)

    def _enqueue(self, path: str, scan: _Scan, batch_id: str, priority: str) -> int:
        """Pass 2: parse the valid lines again, build messages, enqueue chunk by chunk while
        the next chunk is being built (one chunk in flight at a time keeps input order).

        The first chunk is enqueued from this thread before the next is built: from the pool's
        thread, each of its round trips would wait for the GIL behind the building, which
        delays the first jobs by more than the whole call takes on its own."""
        flags = scan.flags
        parse = self.parser.parse
        per_message = self.jobs_per_message
        sizes = enqueue_chunk_sizes()
        limit = next(sizes)
        first = True
        new = enqueued = 0
        pending: Future[int] | None = None
        chunk: list[QueuedJob] = []
        message_jobs: list[str] = []  # job ids waiting for the message that will carry them
        with open(path, "rb") as f, ThreadPoolExecutor(max_workers=1) as pool:
            for number, raw in enumerate(f, start=1):
                if number >= len(flags):
                    raise FileChangedError(f"{path}: grew while it was being submitted")
                if flags[number] not in (_VALID, _VALID_CUSTOM_ID):
                    continue
                try:
                    parsed = parse(raw, number)
                except LineInvalid:
                    raise FileChangedError(
                        f"{path}:{number}: changed while it was being submitted"
                    ) from None
                enqueued += 1
                job_id = keys.job_id_for(batch_id, parsed.custom_id, number)
                request = json.dumps(parsed.request(priority), ensure_ascii=False)
                message_jobs.append(job_id)
                # The last job of each message carries it; a message never spans two enqueue
                # calls, so every call pushes what it records.
                message = b""
                if len(message_jobs) >= per_message or len(chunk) + 1 >= limit:
                    message = self.messages.jobs_message(message_jobs, batch_id, priority)
                    message_jobs = []
                chunk.append(QueuedJob(job_id, number, parsed.custom_id, message, request,
                                       parsed.endpoint))
                if len(chunk) >= limit:
                    if first:
                        new += self._enqueue_chunk(scan, batch_id, priority, chunk)
                        first = False
                    else:
                        if pending is not None:
                            new += pending.result()
                        pending = pool.submit(self._enqueue_chunk, scan, batch_id, priority,
                                              chunk)
                    chunk = []
                    limit = next(sizes)
            if message_jobs:
                last = chunk[-1]
                chunk[-1] = dataclasses.replace(
                    last, message=self.messages.jobs_message(message_jobs, batch_id, priority))
            if pending is not None:
                new += pending.result()
            new += self._enqueue_chunk(scan, batch_id, priority, chunk)
        if enqueued != scan.valid:
            raise FileChangedError(f"{path}: shrank while it was being submitted")
        return new

    def _enqueue_chunk(self, scan: _Scan, batch_id: str, priority: str,
                       chunk: list[QueuedJob]) -> int:
        """JobStore.enqueue, counting what went in (for SubmitInterruptedError)."""
        new = self.store.enqueue(batch_id, priority, chunk)
        scan.enqueued_new += new
        return new

    # --- follow a batch ------------------------------------------------------------------
    def status(self, batch_id: str) -> BatchStatus:
        """The batch's counters. Raises UnknownBatchError if there is no such batch."""
        return BatchStatus.from_counts(batch_id, self.store.batch_counts(batch_id))

    def wait(
        self,
        batch_id: str,
        timeout: float | None = None,
        progress: ProgressCallback | None = None,
        poll_s: float | None = None,
        on_outage: OutageCallback | None = None,
    ) -> BatchStatus:
        """Block until every job of the batch is finished (done, failed or cancelled).

        Once the batch has been read, Redis going away does not end the wait: it keeps polling,
        backing off up to POLL_BACKOFF_CAP_S between attempts, until Redis answers again or
        the timeout passes.

        Args:
            timeout: seconds to wait at most; None waits for ever.
            progress: called with the status after every successful poll.
            poll_s: seconds between polls (default DEFAULT_POLL_S).
            on_outage: called once with the error when Redis stops answering, and with None
                when it answers again.
        Returns:
            The final status; `.succeeded` tells whether every job is done.
        Raises:
            UnknownBatchError: no such batch (never submitted, or expired).
            WaitTimeoutError: still running at the timeout (its .status is the last seen).
            redis.ConnectionError, redis.TimeoutError: Redis could not be reached for the
                first poll (past outage_s).
        """
        if poll_s is None:
            poll_s = DEFAULT_POLL_S
        deadline = None if timeout is None else time.monotonic() + timeout
        # The first read goes through the patient client: a batch id that reaches no Redis at
        # all is an error, as for status(); after that, outages are waited out.
        status = self.status(batch_id)
        outage: Exception | None = None
        backoff = poll_s
        while True:
            if outage is None:
                if progress is not None:
                    progress(status)
                if status.finished:
                    return status
                pause = poll_s
            else:
                pause = backoff
                backoff = min(backoff * 2, max(POLL_BACKOFF_CAP_S, poll_s))
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeoutError(status)
                pause = min(pause, left)
            time.sleep(pause)
            try:
                status = BatchStatus.from_counts(batch_id,
                                                 self._poll_store.batch_counts(batch_id))
            except redis_client.OUTAGE_ERRORS as err:
                if outage is None:
                    outage, backoff = err, poll_s
                    if on_outage is not None:
                        on_outage(err)
                continue
            if outage is not None:
                outage = None
                if on_outage is not None:
                    on_outage(None)

    def cancel(self, batch_id: str) -> int:
        """Cancel the batch; returns how many queued jobs were cancelled (running ones are
        stopped by their workers). Raises UnknownBatchError."""
        return self.store.cancel(batch_id)

    def results(self, batch_id: str) -> Iterator[dict[str, Any]]:
        """One output dict per job, in input order: the plain form for prompt/messages lines,
        OpenAI's batch output form for OpenAI batch lines. Unfinished jobs are included with
        their state and no text. Raises UnknownBatchError (when iteration starts)."""
        for record in self.store.iter_jobs(batch_id):
            if record.endpoint:
                yield openai_output(record)
            else:
                yield plain_output(record)


def enqueue_chunk_sizes() -> Iterator[int]:
    """Jobs per JobStore.enqueue call of a submit, call by call: FIRST_ENQUEUE_CHUNK, then
    ENQUEUE_CHUNK_GROWTH times more each call, up to ENQUEUE_CHUNK (never above it)."""
    size = min(FIRST_ENQUEUE_CHUNK, ENQUEUE_CHUNK)
    while True:
        yield size
        size = min(size * ENQUEUE_CHUNK_GROWTH, ENQUEUE_CHUNK)


def new_batch_id() -> str:
    """A fresh short batch id: "b-" and 12 random hex digits."""
    return BATCH_ID_PREFIX + secrets.token_hex(BATCH_ID_HEX_DIGITS // 2)


def _error_of(record: JobRecord) -> dict[str, Any] | None:
    if record.error is not None:
        return record.error
    if record.state == "cancelled":
        # Cancelled while queued: JobStore.cancel writes no error record.
        return {"type": "cancelled", "message": "the batch was cancelled before the job ran"}
    return None


def plain_output(record: JobRecord) -> dict[str, Any]:
    """The output line of a prompt/messages job."""
    result = record.result or {}
    done = record.state == "done"
    return {
        "job_id": record.job_id,
        "line": record.line,
        "custom_id": record.custom_id,
        "state": record.state,
        "text": result.get("text") if done else None,
        "finish_reason": result.get("finish_reason") if done else None,
        "usage": {
            "prompt_tokens": result.get("prompt_tokens", 0),
            "completion_tokens": result.get("completion_tokens", 0),
        } if done else None,
        "model": result.get("model"),
        "priority": record.priority,
        "worker": result.get("worker") or record.fields.get("worker"),
        "gpu": result.get("gpu") or record.fields.get("gpu"),
        "timing": {
            "queued_s": result.get("queued_s"),
            "first_token_s": result.get("first_token_s"),
            "total_s": result.get("total_s"),
        } if done else None,
        "error": _error_of(record),
    }


def openai_output(record: JobRecord) -> dict[str, Any]:
    """The output line of an OpenAI batch job, in OpenAI's batch output format."""
    out: dict[str, Any] = {"id": record.job_id, "custom_id": record.custom_id}
    if record.state == "done" and record.result is not None:
        out["response"] = {
            "status_code": 200,
            "request_id": record.job_id,
            "body": _openai_body(record, record.result),
        }
        out["error"] = None
        return out
    error = _error_of(record)
    out["response"] = None
    out["error"] = None if error is None else {
        "code": error.get("type", record.state),
        "message": error.get("message", ""),
    }
    if record.state not in keys.TERMINAL_STATES:
        out["state"] = record.state
    return out


def _openai_body(record: JobRecord, result: dict[str, Any]) -> dict[str, Any]:
    prompt_tokens = int(result.get("prompt_tokens", 0))
    completion_tokens = int(result.get("completion_tokens", 0))
    created = int(float(record.fields.get("finished_at", "0") or 0))
    choice: dict[str, Any] = {"index": 0, "logprobs": None,
                              "finish_reason": result.get("finish_reason")}
    if record.endpoint == ENDPOINT_CHAT:
        obj, id_prefix = "chat.completion", "chatcmpl-"
        choice["message"] = {"role": "assistant", "content": result.get("text", "")}
    else:
        obj, id_prefix = "text_completion", "cmpl-"
        choice["text"] = result.get("text", "")
    return {
        "id": id_prefix + record.job_id,
        "object": obj,
        "created": created,
        "model": result.get("model") or "",
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
