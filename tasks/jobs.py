"""The task every job runs: parse the payload, hand it to this worker's engine, store the result.

Thin on purpose: the engine does the work, tasks/store.py does the bookkeeping. Errors in the
job itself (bad request, prompt too long, out of memory) are stored as the job's failure.
Errors of the worker (engine gone, Redis unreachable past the client's retries) store nothing:
the job stays running under a lease nobody renews, and the sweeper re-enqueues it.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject

from tasks import keys

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


def run_job(runtime: Any, job_id: str, batch_id: str,
            message_request: dict[str, Any] | None = None) -> str:
    """The body of the generate task, outside Celery so that it can be tested and reused.
    Returns the job's final state, or why this message was skipped.

    Redis errors propagate after the client's retries: nothing false is stored then, and the
    job comes back through the sweeper (its lease lapses, or its message is seen missing).
    """
    store = runtime.store
    token = uuid.uuid4().hex
    started = store.start(job_id, batch_id, runtime.worker_name, runtime.gpu_label, token,
                          runtime.config.redis.lease_s)
    if not started.runnable:
        # Cancelled while queued, finished already, running under another worker's live
        # lease (a duplicate message), or expired.
        log.info("job %s: %s, message skipped", job_id, started.previous)
        return started.previous
    runtime.leases.hold(job_id, token)
    try:
        request = started.request if started.request is not None else message_request
        return _run_held(runtime, job_id, batch_id, request)
    finally:
        runtime.leases.release(job_id)


def _run_held(runtime: Any, job_id: str, batch_id: str,
              request: dict[str, Any] | None) -> str:
    from engine.request import EngineError, EngineOutOfMemoryError, EngineShutDownError
    from tasks.streams import publisher_for

    store = runtime.store
    priority = (request or {}).get("priority", keys.QUEUE_LOW)
    # Live text to tideq:stream:<job_id> when the deployment streams tokens (tasks/streams.py).
    streams = publisher_for(runtime)

    def finish(state: str, payload: dict[str, Any], tokens: int = 0,
               seconds: float | None = None, prompt_tokens: int = 0,
               first_token_s: float | None = None) -> str:
        # Released first: the finish ends the lease, and a renewal racing it would report the
        # job as taken elsewhere. If Redis stays unreachable past the client's retries, the
        # lease lapses and the sweeper runs the job again, which is what it is for.
        runtime.leases.release(job_id)
        if store.finish(job_id, batch_id, state, payload, tokens):
            if runtime.metrics is not None:
                runtime.metrics.job_finished(state, priority, tokens, seconds,
                                             prompt_tokens=prompt_tokens,
                                             first_token_s=first_token_s)
        else:
            log.info("job %s: finished elsewhere first; this outcome is dropped", job_id)
        if streams is not None:
            streams.close(job_id, state)
        return state

    if request is None:
        return finish("failed", {"type": "invalid_request",
                                 "message": "the job's record holds no request"})
    limits = runtime.config.limits
    try:
        engine_request = build_request(job_id, request, limits.default_max_tokens)
        if engine_request.sampling.max_tokens > limits.max_output_tokens:
            raise InvalidJobError(
                f"max_tokens {engine_request.sampling.max_tokens} exceeds the deployment's"
                f" limit of {limits.max_output_tokens}"
            )
    except InvalidJobError as err:
        return finish("failed", {"type": "invalid_request", "message": str(err)})

    try:
        if streams is None:
            completion = runtime.engine.submit(engine_request).result()
        else:
            completion = runtime.engine.submit(
                engine_request, on_text=streams.open(job_id)).result()
    except EngineShutDownError as err:
        raise WorkerFaultError(f"job {job_id}: {err}") from err
    except EngineOutOfMemoryError as err:
        return finish("failed", {"type": "out_of_memory", "message": str(err)})
    except EngineError as err:
        return finish("failed", {"type": "engine_error", "message": str(err)})

    if completion.finish_reason == "cancelled":
        if runtime.leases.was_lost(job_id):
            # Stopped here because another worker holds it now; that one finishes it.
            log.info("job %s: stopped, taken over elsewhere", job_id)
            return "lost"
        return finish("cancelled", {"type": "cancelled",
                                    "message": "the batch was cancelled while the job ran"})
    result = completion.to_dict()
    result.update(worker=runtime.worker_name, gpu=runtime.gpu_label, model=runtime.model_name)
    return finish("done", result, completion.completion_tokens, completion.total_s,
                  completion.prompt_tokens, completion.first_token_s)


def register(app: Celery) -> None:
    """Define the generate task on app."""

    @app.task(name=keys.TASK_GENERATE, bind=True, acks_late=True, reject_on_worker_lost=True,
              ignore_result=True)
    def generate(self: Task, job_id: str, batch_id: str,
                 request: dict[str, Any] | None = None) -> str:
        runtime = getattr(self.app, "tideq_runtime", None)
        if runtime is None:
            # Not a tideq worker (no engine here): give the message back for one that is.
            raise Reject("this worker has no engine loaded", requeue=True)
        # `request` is carried only by messages of producers older than the job's record.
        return run_job(runtime, job_id, batch_id, request)
