"""The task every job runs: parse the payload, hand it to this worker's engine, store the result.

Thin on purpose: the engine does the work, tasks/store.py does the bookkeeping. Errors in the
job itself (bad request, prompt too long, out of memory) are stored as the job's failure.
Errors of the worker (engine gone, Redis unreachable past the client's retries) store nothing:
the job stays running under a lease nobody renews, and the sweeper re-enqueues it.
"""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import Future, as_completed
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.exceptions import Reject

from tasks import keys
from tasks.messages import job_ids_in

if TYPE_CHECKING:
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


def run_jobs(runtime: Any, job_ids: list[str], batch_id: str,
             message_request: dict[str, Any] | None = None) -> dict[str, str]:
    """The body of the generate task, outside Celery so that it can be tested and reused:
    start the jobs of one message (one Redis round trip), hand them all to the engine at once,
    and store each result as soon as it is ready. Returns each job's final state, or why it
    was skipped.

    Each job is taken, leased, run and finished on its own, so a message of several jobs
    changes nothing about any one of them: a job already running elsewhere or finished is
    skipped, and a job whose result this worker could not store comes back through the
    sweeper. Redis errors propagate after the client's retries: nothing false is stored then.
    """
    from tasks.streams import publisher_for

    store = runtime.store
    # Live text to tideq:stream:<job_id> when the deployment streams tokens (one publisher
    # per worker, looked up once per message).
    streams = publisher_for(runtime)
    tokens = [uuid.uuid4().hex for _ in job_ids]
    started = store.start_many(job_ids, batch_id, runtime.worker_name, runtime.gpu_label,
                               tokens, runtime.config.redis.lease_s)
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
    try:
        running: dict[Future[Any], _HeldJob] = {}
        for job in jobs:
            future = job.submit()
            if future is None:
                outcomes[job.job_id] = job.outcome
            else:
                running[future] = job
        for future in as_completed(running):
            job = running.pop(future)
            outcomes[job.job_id] = job.complete(future)
    finally:
        for job in jobs:
            if job.job_id not in outcomes:
                # Not finished here (the engine or Redis failed): stop it in the engine; its
                # lease, no longer renewed, hands it to the sweeper.
                runtime.engine.cancel(job.job_id)
            runtime.leases.release(job.job_id)
    return outcomes


class _HeldJob:
    """One job this worker has started: its request goes to the engine, its outcome to the
    store."""

    def __init__(self, runtime: Any, job_id: str, batch_id: str,
                 request: dict[str, Any] | None, streams: StreamPublisher | None) -> None:
        self.runtime = runtime
        self.job_id = job_id
        self.batch_id = batch_id
        self.request = request
        self.priority = (request or {}).get("priority", keys.QUEUE_LOW)
        self.outcome = ""
        self.streams = streams

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
    """Define the generate task on app."""

    @app.task(name=keys.TASK_GENERATE, bind=True, acks_late=True, reject_on_worker_lost=True,
              ignore_result=True)
    def generate(self: Task, batch_id: str, job_id: str | None = None,
                 job_ids: list[str] | None = None,
                 request: dict[str, Any] | None = None) -> dict[str, str]:
        """A message names one job (job_id) or several (job_ids: jobs_per_message)."""
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
        return run_jobs(runtime, ids, batch_id, request)
