"""The hand-built envelope is what Celery itself puts on the queue, and a worker runs it."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Queue

from producer import Producer
from producer.cli import main
from tasks import keys
from tasks.messages import MessageBuilder, anon_nodename, decode, job_kwargs

# Fields that differ between any two messages, or between two senders by design: the
# delivery tag (a fresh uuid), reply_to (apply_async's per-thread oid; unused, results do not
# go through Celery), origin (the sender's node name) and kwargsrepr (display-only; compared
# separately below).
VOLATILE = {("properties", "delivery_tag"), ("properties", "reply_to"),
            ("headers", "origin"), ("headers", "kwargsrepr")}

REQUEST: dict[str, Any] = {
    "messages": [{"role": "user", "content": "Héllo \"quoted\"\n✓"}],
    "sampling": {"max_tokens": 8, "temperature": 0.5, "top_p": 1.0, "top_k": 0, "seed": 3,
                 "stop": ["\n"]},
    "priority": "high", "endpoint": None, "line": 4, "custom_id": "c-1", "model": None,
}


@pytest.fixture
def celery_app(redis_url: str) -> Iterator[Celery]:
    """A throwaway app configured like tideq's (JSON, the two queues)."""
    app = Celery("envelope-check", broker=redis_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                    task_queues=[Queue(q, routing_key=q) for q in keys.QUEUES],
                    task_default_queue=keys.QUEUE_LOW)
    yield app
    app.close()


def stable(envelope: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(envelope))
    for part, name in VOLATILE:
        out[part].pop(name)
    out["body"] = json.loads(base64.b64decode(out["body"]))
    return out


@pytest.mark.parametrize("queue", keys.QUEUES)
def test_envelope_matches_what_celery_publishes(celery_app: Celery, rdb: redis.Redis,
                                                queue: str) -> None:
    job_id, batch_id = "b-test:c-1", "b-test"
    kwargs = {**job_kwargs(job_id, batch_id), "request": REQUEST}
    celery_app.send_task(keys.TASK_GENERATE, args=[], kwargs=kwargs, task_id=job_id,
                         queue=queue)
    assert rdb.llen(queue) == 1
    theirs = json.loads(rdb.lpop(queue))  # type: ignore[arg-type]
    ours = json.loads(MessageBuilder().build(job_id, queue, kwargs))

    assert stable(ours) == stable(theirs)
    assert set(ours["headers"]) == set(theirs["headers"])
    assert set(ours["properties"]) == set(theirs["properties"])
    for part, name in VOLATILE:
        assert type(ours[part][name]) is type(theirs[part][name])
    assert ours["headers"]["kwargsrepr"] == repr(kwargs)
    assert ours["properties"]["delivery_info"] == {"exchange": "", "routing_key": queue}
    assert ours["properties"]["priority"] == 0


def test_headers_match_as_task_v2(celery_app: Celery) -> None:
    kwargs = {**job_kwargs("b:L1", "b"), "request": REQUEST}
    message = celery_app.amqp.as_task_v2("b:L1", keys.TASK_GENERATE, args=[], kwargs=kwargs,
                                         ignore_result=None)
    ours = MessageBuilder().envelope("b:L1", keys.QUEUE_LOW, kwargs)
    assert message.headers.keys() == ours["headers"].keys()
    for name in set(message.headers) - {"origin", "kwargsrepr"}:
        assert ours["headers"][name] == message.headers[name], name
    args, body_kwargs, embed = message.body
    assert [list(args), body_kwargs, embed] == json.loads(base64.b64decode(ours["body"]))


def test_build_is_json_dumps_of_the_envelope() -> None:
    builder = MessageBuilder(origin='node "x"@host')
    kwargs = {**job_kwargs("b:L2", "b"), "request": {**REQUEST, "prompt": "x" * 3000}}
    raw = builder.build("b:L2", keys.QUEUE_HIGH, kwargs)
    envelope, body = decode(raw)
    assert raw == json.dumps(envelope).encode()
    assert body == [[], kwargs, {"callbacks": None, "errbacks": None, "chain": None,
                                 "chord": None}]
    assert envelope["headers"]["origin"] == 'node "x"@host'
    # Long kwargs are cut in the display header only.
    assert envelope["headers"]["kwargsrepr"].endswith("...")
    assert len(envelope["headers"]["kwargsrepr"]) == 1024 + 3


def test_default_origin_is_celerys_name_for_this_process(celery_app: Celery) -> None:
    from celery.utils.nodenames import anon_nodename as celerys

    assert anon_nodename() == celerys()
    message = celery_app.amqp.as_task_v2("b:L1", keys.TASK_GENERATE, args=[],
                                         kwargs=job_kwargs("b:L1", "b"))
    assert MessageBuilder().origin == message.headers["origin"]


def test_delivery_tags_are_unique_uuid4() -> None:
    builder = MessageBuilder()
    tags = {builder.delivery_tag() for _ in range(1000)}
    assert len(tags) == 1000
    assert all(uuid.UUID(t).version == 4 for t in tags)


def test_producer_never_imports_torch_or_engine() -> None:
    code = ("import sys, producer, producer.cli, tasks.messages, producer.formats;"
            " bad = [m for m in sys.modules if m == 'torch' or m.split('.')[0] == 'engine'];"
            " assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[2])


def test_a_real_worker_runs_the_messages(echo_worker: subprocess.Popen[bytes],
                                         producer: Producer,
                                         write_jsonl: Callable[..., Path]) -> None:
    lines: list[dict[str, Any]] = [
        {"prompt": "one", "max_tokens": 4, "seed": 1},
        {"messages": [{"role": "user", "content": "two ✓"}], "custom_id": "c2",
         "stop": "\n"},
        {"custom_id": "c3", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": "three", "max_tokens": 2}},
    ]
    low = producer.submit(write_jsonl(lines), priority="low")
    high = producer.submit(write_jsonl(lines[:1], name="high.jsonl"), priority="high")
    for report in (low, high):
        status = producer.wait(report.batch_id, timeout=30, poll_s=0.1)
        assert status.succeeded, status
    rows = list(producer.results(low.batch_id))
    assert [r.get("job_id", r.get("id")) for r in rows] == [
        f"{low.batch_id}:L1", f"{low.batch_id}:c2", f"{low.batch_id}:c3"]
    echoed = [json.loads(rows[0]["text"]), json.loads(rows[1]["text"]),
              json.loads(rows[2]["response"]["body"]["choices"][0]["text"])]
    assert echoed[0] == {"job_id": f"{low.batch_id}:L1", "batch_id": low.batch_id, "request": {
        "prompt": "one",
        "sampling": {"max_tokens": 4, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 1,
                     "stop": []},
        "priority": "low", "endpoint": None, "line": 1, "custom_id": None, "model": None}}
    assert echoed[1]["request"]["messages"] == [{"role": "user", "content": "two ✓"}]
    assert echoed[1]["request"]["sampling"]["stop"] == ["\n"]
    assert echoed[2]["request"]["endpoint"] == "/v1/completions"
    assert echoed[2]["request"]["model"] == "m"
    assert rows[2]["response"]["body"]["object"] == "text_completion"
    high_row = next(producer.results(high.batch_id))
    assert json.loads(high_row["text"])["request"]["priority"] == "high"


def test_cli_submit_wait_with_a_real_worker(echo_worker: subprocess.Popen[bytes], cli_env: str,
                                            write_jsonl: Callable[..., Path],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl([{"prompt": f"p{i}"} for i in range(5)])
    assert main(["submit", str(path), "--priority", "high", "--batch-id", "cliw", "--wait",
                 "--timeout", "30"]) == 0
    assert capsys.readouterr().out == "cliw\n"
    assert main(["results", "cliw"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [json.loads(r["text"])["request"]["prompt"] for r in rows] == [
        f"p{i}" for i in range(5)]
