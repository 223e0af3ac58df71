"""The W-queue peer (bench/bench_queue.py): plain Celery, a no-op task, Redis as broker and
result backend, Celery's defaults otherwise. Broker and backend URL from TIDEQ_BENCH_REDIS_URL.

    TIDEQ_BENCH_REDIS_URL=redis://... python -m celery -A bench.plain_celery_app worker -P threads
"""

from __future__ import annotations

import os

from celery import Celery

REDIS_URL = os.environ["TIDEQ_BENCH_REDIS_URL"]

app = Celery("plain", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop(i: int) -> int:
    return i
