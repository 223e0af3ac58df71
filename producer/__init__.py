"""tideq's producer: validate prompt files, enqueue them as batches, follow their results.

    from producer import Producer
    from tasks.config import load_config

    with Producer(load_config()) as p:
        report = p.submit("prompts.jsonl", priority="high")
        p.wait(report.batch_id)
        rows = list(p.results(report.batch_id))

Imports redis, pydantic and tideq's tasks.keys/config/store/messages; never Celery or torch
(the messages are built as bytes: tasks/messages.py).
"""

from producer.client import (
    BatchStatus,
    FileChangedError,
    InvalidFileError,
    LineError,
    Producer,
    SubmitInterruptedError,
    SubmitReport,
    UnknownBatchError,
    WaitTimeoutError,
)

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
