"""The task every job runs: parse the payload, hand it to this worker's engine, store the result.

Thin on purpose: the engine does the work, tasks/store.py does the bookkeeping. A message is
acknowledged as soon as its jobs are started: the job store, not the message, is the truth
about a running job (its lease, renewed by the lease keeper; the sweeper sends a job again
when its lease lapses, whatever became of its message). Each job's outcome is stored later by
the worker's finisher threads (tasks/finishers.py), and the admission gate
(tasks/admission.py) bounds the jobs a worker holds.

Errors in the job itself (bad request, prompt too long, out of memory) are stored as the job's
failure. Errors of the worker (engine gone, Redis unreachable past the client's retries) store
nothing: the job stays running under a lease nobody renews, and the sweeper re-enqueues it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.exceptions import Reject

from tasks import keys
from tasks.messages import job_ids_in
from tasks.redis_client import OUTAGE_ERRORS

if TYPE_CHECKING:
    from tasks.front_trace import FrontTrace
    from tasks.streams import StreamPublisher

log = logging.getLogger(__name__)


class InvalidJobError(ValueError):
    """The payload cannot become an engine request. Fatal for the job: stored as failed."""


def build_request(job_id: str, payload: dict[str, Any], default_max_tokens: int) -> Any:
    """Turn a message's request dict into an engine Request (engine imported lazily: the
    producer imports this package without torch)."""
    from engine.request import Request, SamplingParams

    sampling_in = dict(payload.get("sampling") or {})
    sampling_in.setdefault("max_tokens", default_max_tokens)
    try:
        sampling = SamplingParams.from_dict(sampling_in)
        return Request(
            request_id=job_id,
            prompt=payload.get("prompt"),
            messages=payload.get("messages"),
            sampling=sampling,
            priority=payload.get("priority", keys.QUEUE_LOW),
        )
    except (TypeError, ValueError) as err:
        raise InvalidJobError(str(err)) from None


class WorkerFaultError(RuntimeError):
    """This worker cannot run the job (its engine is gone). Not the job's fault: the job is
    left running under a lease that is no longer renewed, and the sweeper gives it to
    another worker."""


def message_priority(delivery_info: Mapping[str, Any] | None) -> str:
    """The priority of a message's jobs: the queue it was taken from.

    Known before any job is touched, at no cost, which is when the admission gate needs it
    (the records' priority comes back only with the start, which must wait for the gate).
    tideq puts a message only on the queue of its jobs' priority (the producer, the sweeper,
    and kombu giving a message back all use that queue), so the two agree; and the queue is
    what the worker's `-Q high,low` order serves. A message without a routing key (called
    outside a worker) counts as low: it waits for room rather than overfill the worker."""
    routing_key = (delivery_info or {}).get("routing_key")
    return keys.QUEUE_HIGH if routing_key == keys.QUEUE_HIGH else keys.QUEUE_LOW


def run_jobs(runtime: Any, job_ids: list[str], batch_id: str,
             message_request: dict[str, Any] | None = None,
             priority: str = keys.QUEUE_LOW, delivery_tag: str | None = None) -> dict[str, str]:
    """The body of the generate task, outside Celery so that it can be tested and reused:
    wait for room at the admission gate (low messages only), start the jobs of one message
    (one Redis round trip), hand them to the engine and return; the finisher threads store
    each outcome as its future resolves. Returns each job's state when the message is let go:
    "running" (handed to the engine), a final state (it ended at once), or why it was skipped.

    Each job is taken, leased, run and finished on its own, so a message of several jobs
    changes nothing about any one of them: a job already running elsewhere or finished is
    skipped, and a job whose result this worker could not store comes back through the
    sweeper. Redis errors propagate after the client's retries: nothing false is stored then.

    delivery_tag: the message's, while kombu holds it unacknowledged; a low message waiting
    at the gate keeps it marked as taken by a live worker (see LeaseKeeper.hold_message).
    """
    from tasks.streams import publisher_for

    # Live text to tideq:stream:<job_id> when the deployment streams tokens (one publisher
    # per worker, looked up once per message).
    streams = publisher_for(runtime)
    _wait_for_room(runtime, len(job_ids), priority, delivery_tag)
    if priority == keys.QUEUE_HIGH:
        return _start_and_hand_over(runtime, job_ids, batch_id, message_request, streams,
                                    runtime.front_trace)
    # One low message starts at a time (WorkerRuntime.low_starts says why).
    with runtime.low_starts:
        return _start_and_hand_over(runtime, job_ids, batch_id, message_request, streams, None)


def _start_and_hand_over(runtime: Any, job_ids: list[str], batch_id: str,
                         message_request: dict[str, Any] | None,
                         streams: StreamPublisher | None,
                         trace: FrontTrace | None) -> dict[str, str]:
    """Start the message's jobs and hand each to the engine; `trace` (high messages, with
    TIDEQ_FRONT_TRACE set) times the two."""
    t_start = time.time() if trace is not None else 0.0
    jobs, outcomes = _start(runtime, job_ids, batch_id, message_request, streams)
    t_started = time.time() if trace is not None else 0.0
    for i, job in enumerate(jobs):
        try:
            outcomes[job.job_id] = job.hand_over()
        except BaseException:
            # This job and the ones after it never reached a finisher: their leases lapse
            # (the sweeper sends them again); the ones before are in the finishers' hands.
            for left in jobs[i:]:
                left.let_go()
            raise
    if trace is not None:
        trace.record(job_ids, t_start, t_started, time.time())
    return outcomes


def _wait_for_room(runtime: Any, jobs: int, priority: str, delivery_tag: str | None) -> None:
    """Count the message's jobs in flight; a low message first waits at the gate."""
    if priority == keys.QUEUE_HIGH:
        runtime.gate.admit(jobs, wait=False)
        return
    if delivery_tag is not None:
        # Held unstarted: renewed as taken, or the sweeper would send its jobs again.
        runtime.leases.hold_message(delivery_tag)
    try:
        runtime.gate.admit(jobs)
    finally:
        if delivery_tag is not None:
            runtime.leases.release_message(delivery_tag)


def _start(runtime: Any, job_ids: list[str], batch_id: str,
           message_request: dict[str, Any] | None,
           streams: StreamPublisher | None) -> tuple[list[_HeldJob], dict[str, str]]:
    """Start the message's jobs and hold the leases of those taken here. Those not taken
    leave the gate at once."""
    store = runtime.store
    tokens = [uuid.uuid4().hex for _ in job_ids]
    try:
        started = store.start_many(job_ids, batch_id, runtime.worker_name, runtime.gpu_label,
                                   tokens, runtime.config.redis.lease_s)
    except BaseException:
        runtime.gate.release(len(job_ids))
        raise
    outcomes: dict[str, str] = {}
    jobs: list[_HeldJob] = []
    for job_id, token, start in zip(job_ids, tokens, started, strict=True):
        if not start.runnable:
            # Cancelled while queued, finished already, running under another worker's live
            # lease (a duplicate message), or expired.
            log.info("job %s: %s, message skipped", job_id, start.previous)
            outcomes[job_id] = start.previous
            continue
        runtime.leases.hold(job_id, token)
        request = start.request if start.request is not None else message_request
        jobs.append(_HeldJob(runtime, job_id, batch_id, request, streams))
    if len(jobs) < len(job_ids):
        runtime.gate.release(len(job_ids) - len(jobs))
    return jobs, outcomes


class _HeldJob:
    """One job this worker has started: its request goes to the engine, its outcome to the
    store (from a finisher thread), and then it leaves the admission gate."""

    def __init__(self, runtime: Any, job_id: str, batch_id: str,
                 request: dict[str, Any] | None, streams: StreamPublisher | None) -> None:
        self.runtime = runtime
        self.job_id = job_id
        self.batch_id = batch_id
        self.request = request
        self.priority = (request or {}).get("priority", keys.QUEUE_LOW)
        self.outcome = ""
        self.streams = streams

    def hand_over(self) -> str:
        """In the task thread: submit the job, and have its outcome stored when its future
        resolves. Returns "running", or the final state of a job that ended at once."""
        future = self.submit()
        if future is None:
            self.let_go()
            return self.outcome
        future.add_done_callback(self._on_done)
        return "running"

    def _on_done(self, future: Future[Any]) -> None:
        # In the engine's receiver thread (or the task thread, for a future that resolved at
        # once): no Redis here, only a hand-over.
        urgent = self.priority == keys.QUEUE_HIGH
        if not self.runtime.finishers.submit(lambda: self.settle(future), urgent):
            self.let_go()  # the worker is stopping: the job is left to its lease

    def settle(self, future: Future[Any]) -> None:
        """In a finisher thread: store the job's outcome, then let it go. A worker fault
        stores nothing: the lease, no longer renewed, hands the job to the sweeper."""
        try:
            self.complete(future)
        except WorkerFaultError as err:
            log.warning("%s; left to its lease, the sweeper sends it again", err)
        except OUTAGE_ERRORS as err:
            log.warning("job %s: Redis unreachable storing its outcome (%s); left to its"
                        " lease, the sweeper sends it again", self.job_id, err)
        finally:
            self.let_go()

    def let_go(self) -> None:
        """Stop renewing the job's lease (after its outcome was stored, this ends nothing;
        else the lease lapses and the sweeper re-enqueues the job) and leave the gate."""
        self.runtime.leases.release(self.job_id)
        self.runtime.gate.release(1)

    def submit(self) -> Future[Any] | None:
        """Hand the request to the engine; None if the job ended at once (invalid request,
        stored as failed: self.outcome says so)."""
        from engine.request import EngineShutDownError

        if self.request is None:
            self.outcome = self.finish("failed", {
                "type": "invalid_request", "message": "the job's record holds no request"})
            return None
        limits = self.runtime.config.limits
        try:
            engine_request = build_request(self.job_id, self.request, limits.default_max_tokens)
            if engine_request.sampling.max_tokens > limits.max_output_tokens:
                raise InvalidJobError(
                    f"max_tokens {engine_request.sampling.max_tokens} exceeds the deployment's"
                    f" limit of {limits.max_output_tokens}"
                )
        except InvalidJobError as err:
            self.outcome = self.finish("failed", {"type": "invalid_request",
                                                  "message": str(err)})
            return None
        engine = self.runtime.engine
        try:
            if self.streams is None:
                return engine.submit(engine_request)
            return engine.submit(engine_request, on_text=self.streams.open(self.job_id))
        except EngineShutDownError as err:
            raise WorkerFaultError(f"job {self.job_id}: {err}") from err

    def complete(self, future: Future[Any]) -> str:
        """Store the engine's outcome of the job; returns its final state."""
        from engine.request import EngineError, EngineOutOfMemoryError, EngineShutDownError

        try:
            completion = future.result()
        except EngineShutDownError as err:
            raise WorkerFaultError(f"job {self.job_id}: {err}") from err
        except EngineOutOfMemoryError as err:
            return self.finish("failed", {"type": "out_of_memory", "message": str(err)})
        except EngineError as err:
            return self.finish("failed", {"type": "engine_error", "message": str(err)})

        if completion.finish_reason == "cancelled":
            if self.runtime.leases.was_lost(self.job_id):
                # Stopped here because another worker holds it now; that one finishes it.
                log.info("job %s: stopped, taken over elsewhere", self.job_id)
                return "lost"
            return self.finish("cancelled", {
                "type": "cancelled", "message": "the batch was cancelled while the job ran"})
        result = completion.to_dict()
        runtime = self.runtime
        result.update(worker=runtime.worker_name, gpu=runtime.gpu_label,
                      model=runtime.model_name)
        return self.finish("done", result, completion.completion_tokens, completion.total_s,
                           completion.prompt_tokens, completion.first_token_s)

    def finish(self, state: str, payload: dict[str, Any], tokens: int = 0,
               seconds: float | None = None, prompt_tokens: int = 0,
               first_token_s: float | None = None) -> str:
        runtime = self.runtime
        # Released first: the finish ends the lease, and a renewal racing it would report the
        # job as taken elsewhere. If Redis stays unreachable past the client's retries, the
        # lease lapses and the sweeper runs the job again, which is what it is for.
        runtime.leases.release(self.job_id)
        if runtime.store.finish(self.job_id, self.batch_id, state, payload, tokens):
            if runtime.metrics is not None:
                runtime.metrics.job_finished(state, self.priority, tokens, seconds,
                                             prompt_tokens=prompt_tokens,
                                             first_token_s=first_token_s)
        else:
            log.info("job %s: finished elsewhere first; this outcome is dropped", self.job_id)
        if self.streams is not None:
            self.streams.close(self.job_id, state)
        return state


def register(app: Celery) -> None:
    """Define the generate task on app (on app alone: not shared with other apps of the
    process, such as an embedded test worker's, which define their own)."""

    @app.task(name=keys.TASK_GENERATE, bind=True, acks_late=True, reject_on_worker_lost=True,
              ignore_result=True, shared=False)
    def generate(self: Task, batch_id: str, job_id: str | None = None,
                 job_ids: list[str] | None = None,
                 request: dict[str, Any] | None = None) -> dict[str, str]:
        """A message names one job (job_id) or several (job_ids: jobs_per_message). It is
        acknowledged when this returns, i.e. once its jobs are started and in the engine."""
        runtime = getattr(self.app, "tideq_runtime", None)
        if runtime is None:
            # Not a tideq worker (no engine here): give the message back for one that is.
            raise Reject("this worker has no engine loaded", requeue=True)
        try:
            ids = job_ids_in({"job_id": job_id, "job_ids": job_ids})
        except ValueError as err:
            # Not from a tideq producer: nothing to run, nothing to give back.
            raise Reject(f"malformed message: {err}", requeue=False) from None
        # `request` is carried only by messages of producers older than the job's record.
        # kombu's virtual transports keep the delivery tag among the message's properties.
        delivery_tag = (self.request.properties or {}).get("delivery_tag")
        return run_jobs(runtime, ids, batch_id, request,
                        priority=message_priority(self.request.delivery_info),
                        delivery_tag=delivery_tag)
