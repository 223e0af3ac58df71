"""The task every job runs: parse the payload, hand it to this worker's engine, store the result.

Thin on purpose: the engine does the work, tasks/store.py does the bookkeeping. Errors in the
job itself (bad request, prompt too long, out of memory) are stored as the job's failure and
acknowledged; errors of the worker (no engine, Redis gone) propagate so the message is retried
or redelivered.
"""

from __future__ import annotations

import logging
from concurrent.futures import TimeoutError as FutureTimeout
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


def run_job(runtime: Any, job_id: str, batch_id: str, request: dict[str, Any]) -> str:
    """The body of the generate task, outside Celery so that it can be tested and reused.
    Returns the job's final state."""
    from engine.request import EngineError, EngineOutOfMemoryError

    store = runtime.store
    previous = store.start(job_id, batch_id, runtime.worker_name, runtime.gpu_label)
    if previous in keys.TERMINAL_STATES:
        # Cancelled while queued, or a redelivery of a job that already finished.
        log.info("job %s: %s already, skipped", job_id, previous)
        return previous
    limits = runtime.config.limits
    try:
        engine_request = build_request(job_id, request, limits.default_max_tokens)
        if engine_request.sampling.max_tokens > limits.max_output_tokens:
            raise InvalidJobError(
                f"max_tokens {engine_request.sampling.max_tokens} exceeds the deployment's"
                f" limit of {limits.max_output_tokens}"
            )
    except InvalidJobError as err:
        store.finish(job_id, batch_id, "failed", {"type": "invalid_request", "message": str(err)})
        return "failed"

    future = runtime.engine.submit(engine_request)
    try:
        while True:
            try:
                completion = future.result(timeout=runtime.config.cancel_poll_s)
                break
            except FutureTimeout:
                if store.is_cancelled(batch_id):
                    runtime.engine.cancel(job_id)
    except EngineOutOfMemoryError as err:
        store.finish(job_id, batch_id, "failed", {"type": "out_of_memory", "message": str(err)})
        return "failed"
    except EngineError as err:
        store.finish(job_id, batch_id, "failed", {"type": "engine_error", "message": str(err)})
        return "failed"

    if completion.finish_reason == "cancelled":
        store.finish(job_id, batch_id, "cancelled",
                     {"type": "cancelled", "message": "the batch was cancelled while running"})
        return "cancelled"
    result = completion.to_dict()
    result.update(worker=runtime.worker_name, gpu=runtime.gpu_label, model=runtime.model_name)
    if not store.finish(job_id, batch_id, "done", result, completion.completion_tokens):
        log.info("job %s: finished elsewhere first; this result is dropped", job_id)
    return "done"


def register(app: Celery) -> None:
    """Define the generate task on app."""

    @app.task(name=keys.TASK_GENERATE, bind=True, acks_late=True, reject_on_worker_lost=True,
              ignore_result=True)
    def generate(self: Task, job_id: str, batch_id: str, request: dict[str, Any]) -> str:
        runtime = getattr(self.app, "tideq_runtime", None)
        if runtime is None:
            # Not a tideq worker (no engine here): give the message back for one that is.
            raise Reject("this worker has no engine loaded", requeue=True)
        return run_job(runtime, job_id, batch_id, request)
