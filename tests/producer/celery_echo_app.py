"""A throwaway Celery app for the producer's tests: a worker process runs it to consume the
producer's hand-built messages, and answers every job with its own kwargs.

    TIDEQ_REDIS_URL=redis://... python -m celery -A tests.producer.celery_echo_app worker \
        -P threads -Q high,low

The task is registered under tideq's real task name and stores its result through JobStore,
as the real worker does, so the producer's wait/results see it like any finished job. Its text
is the JSON of its kwargs and of the request its record holds (sorted keys), for the test to
compare.
"""

from __future__ import annotations

import json
import os
import uuid

from celery import Celery
from kombu import Queue

from tasks import keys
from tasks.store import JobStore

REDIS_URL = os.environ["TIDEQ_REDIS_URL"]
RESULT_TTL_S = 600  # long enough for any test
LEASE_S = 60.0

app = Celery("tideq-echo", broker=REDIS_URL)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_queues=[Queue(q, routing_key=q) for q in keys.QUEUES],
    broker_transport_options={"queue_order_strategy": "priority"},
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
)
store = JobStore.from_url(REDIS_URL, RESULT_TTL_S)


@app.task(name=keys.TASK_GENERATE)
def generate(job_id: str, batch_id: str) -> str:
    """Echo: the job's text is the JSON of its kwargs and the request its record holds."""
    started = store.start(job_id, batch_id, "echo", "cpu", uuid.uuid4().hex, LEASE_S)
    if not started.runnable:
        return "skipped"
    request = started.request
    text = json.dumps({"job_id": job_id, "batch_id": batch_id, "request": request},
                      sort_keys=True)
    completion_tokens = len(text.split())
    store.finish(job_id, batch_id, "done", {
        "text": text, "finish_reason": "stop", "prompt_tokens": 1,
        "completion_tokens": completion_tokens, "queued_s": 0.0, "first_token_s": 0.0,
        "total_s": 0.0, "worker": "echo", "gpu": "cpu", "model": "echo",
    }, completion_tokens=completion_tokens)
    return "done"
