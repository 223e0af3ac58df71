"""`producer submit` stays light: a real submit, in a fresh interpreter, imports neither Celery
nor the engine's stack. Every module it imports delays the first job of the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import redis

from tasks import keys

REPO = Path(__file__).resolve().parents[2]
# Top-level packages the submit path must not load: Celery and its transport (the messages are
# built as bytes by tasks/messages.py), and torch, transformers and tideq's engine (workers only).
FORBIDDEN = ("celery", "kombu", "billiard", "amqp", "torch", "transformers", "engine")
# Runs the console script's entry point, then reports what the interpreter had imported.
SUBMIT = """
import json, sys
from producer.cli import main
code = main(["submit", sys.argv[1], "--batch-id", "light"])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""
SUBMIT_TIMEOUT_S = 60


def test_submit_imports_no_celery_or_engine(redis_url: str, rdb: redis.Redis,
                                            write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl([{"prompt": f"p{i}"} for i in range(3)]
                       + [{"messages": [{"role": "user", "content": "hi"}]}])
    env = {k: v for k, v in os.environ.items() if k != "TIDEQ_CONFIG"}
    env["TIDEQ_REDIS_URL"] = redis_url
    proc = subprocess.run([sys.executable, "-c", SUBMIT, str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == "light"  # the batch id, as the CLI prints it
    report = json.loads(out[-1])
    assert report["code"] == 0, proc.stderr
    loaded = sorted({m.split(".")[0] for m in report["modules"]} & set(FORBIDDEN))
    assert loaded == []
    # It did submit: every job is recorded and queued.
    assert rdb.hget(keys.batch_key("light"), "total") == b"4"
    assert rdb.llen(keys.QUEUE_LOW) == 4
