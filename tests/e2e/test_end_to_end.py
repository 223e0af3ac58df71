"""The whole path with real parts: producer -> Redis queues -> a real Celery worker process
running a real (tiny) model -> results in Redis."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from producer import Producer
from tasks.config import load_config
from tests.conftest import write_config


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def config_path(tmp_path: Path, redis_url: str, tiny_llama: Path) -> Path:
    return write_config(tmp_path / "deploy.yaml", redis_url, tiny_llama)


@pytest.fixture
def producer(config_path: Path):
    with Producer(load_config(config_path)) as p:
        yield p


def test_all_three_formats_end_to_end_in_input_order(tmp_path, config_path, producer,
                                                      start_worker):
    start_worker(config_path)
    rows = [
        {"prompt": "The quick brown fox", "max_tokens": 5, "temperature": 0},
        {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 6,
         "temperature": 0.7, "seed": 1},
        {"prompt": "Return a new list", "max_tokens": 7, "temperature": 0},
    ]
    plain = producer.submit(write_jsonl(tmp_path / "plain.jsonl", rows))
    openai_rows = [
        {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                  "max_tokens": 4, "temperature": 0}},
        {"custom_id": "comp-1", "method": "POST", "url": "/v1/completions",
         "body": {"model": "tiny", "prompt": "Once upon", "max_tokens": 3, "temperature": 0}},
    ]
    openai = producer.submit(write_jsonl(tmp_path / "openai.jsonl", openai_rows),
                             priority="high")

    assert producer.wait(plain.batch_id, timeout=120).succeeded
    assert producer.wait(openai.batch_id, timeout=120).succeeded

    results = list(producer.results(plain.batch_id))
    assert [r["line"] for r in results] == [1, 2, 3]
    for row, result in zip(rows, results, strict=False):
        assert result["state"] == "done"
        assert result["finish_reason"] in ("length", "stop")
        assert 1 <= result["usage"]["completion_tokens"] <= row["max_tokens"]
        assert result["usage"]["prompt_tokens"] > 0
    # The chat line went through the chat template: its prompt is longer than its content.
    assert results[1]["usage"]["prompt_tokens"] > 5

    out = list(producer.results(openai.batch_id))
    assert [o["custom_id"] for o in out] == ["chat-1", "comp-1"]
    chat, comp = out
    assert chat["error"] is None and chat["response"]["status_code"] == 200
    assert chat["response"]["body"]["object"] == "chat.completion"
    assert isinstance(chat["response"]["body"]["choices"][0]["message"]["content"], str)
    assert comp["response"]["body"]["object"] == "text_completion"
    assert comp["response"]["body"]["usage"]["completion_tokens"] <= 3


def test_greedy_results_match_the_engine_run_directly(tmp_path, config_path, producer,
                                                       start_worker, tiny_llama):
    """What comes back through the queue is what the model computes."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.request import Request, SamplingParams

    start_worker(config_path)
    prompts = ["The quick brown fox", "Logging is configured by", "hello world"]
    batch = producer.submit(write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": p, "max_tokens": 8, "temperature": 0} for p in prompts]
    ))
    assert producer.wait(batch.batch_id, timeout=120).succeeded
    texts = [r["text"] for r in producer.results(batch.batch_id)]

    engine = Engine(EngineConfig(model_path=str(tiny_llama), dtype="float32", device="cpu",
                                 backend="hf", max_model_len=512))
    try:
        expected = engine.generate([
            Request(f"r{i}", prompt=p, sampling=SamplingParams(max_tokens=8, temperature=0))
            for i, p in enumerate(prompts)
        ])
    finally:
        engine.shutdown()
    assert texts == [c.text for c in expected]


def test_resubmitting_the_same_file_makes_no_duplicates(tmp_path, config_path, producer,
                                                         start_worker, redis_server):
    path = write_jsonl(tmp_path / "p.jsonl",
                       [{"prompt": f"prompt {i}", "max_tokens": 3} for i in range(5)])
    first = producer.submit(path, batch_id="again")
    second = producer.submit(path, batch_id="again")
    assert (first.new, second.new) == (5, 0)
    assert redis_server.llen("low") == 5
    start_worker(config_path)
    status = producer.wait("again", timeout=120)
    assert status.total == 5 and status.count("done") == 5
    assert len(list(producer.results("again"))) == 5


def test_cancel_skips_queued_jobs_and_reports_them(tmp_path, config_path, producer,
                                                    start_worker):
    path = write_jsonl(tmp_path / "p.jsonl",
                       [{"prompt": f"prompt {i}", "max_tokens": 4} for i in range(6)])
    batch = producer.submit(path)
    assert producer.cancel(batch.batch_id) == 6
    start_worker(config_path)  # consumes the six messages and must skip every one
    status = producer.wait(batch.batch_id, timeout=60)
    assert status.count("cancelled") == 6 and status.count("done") == 0
    results = list(producer.results(batch.batch_id))
    assert {r["state"] for r in results} == {"cancelled"}


def test_invalid_job_is_reported_failed_not_lost(tmp_path, redis_url, tiny_llama, start_worker):
    """A prompt longer than the worker's model takes fails with a clear error."""
    config_path = write_config(tmp_path / "d.yaml", redis_url, tiny_llama,
                               model={"max_model_len": 64},
                               limits={"max_prompt_tokens": 32, "max_output_tokens": 16,
                                       "default_max_tokens": 8})
    with Producer(load_config(config_path)) as producer:
        path = write_jsonl(tmp_path / "p.jsonl", [
            {"prompt": "word " * 200, "max_tokens": 4},
            {"prompt": "short", "max_tokens": 4},
        ])
        batch = producer.submit(path)
        start_worker(config_path)
        status = producer.wait(batch.batch_id, timeout=60)
        assert (status.count("failed"), status.count("done")) == (1, 1)
        first, second = producer.results(batch.batch_id)
        assert first["state"] == "failed" and "prompt has" in first["error"]["message"]
        assert second["state"] == "done"


def test_worker_serves_prometheus_metrics(tmp_path, redis_url, tiny_llama, start_worker):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config_path = write_config(tmp_path / "d.yaml", redis_url, tiny_llama, metrics_port=port)
    with Producer(load_config(config_path)) as producer:
        batch = producer.submit(write_jsonl(tmp_path / "p.jsonl", [
            {"prompt": "one", "max_tokens": 3, "temperature": 0},
            {"prompt": "two", "max_tokens": 3, "temperature": 0},
        ]), priority="high")
        start_worker(config_path)
        assert producer.wait(batch.batch_id, timeout=60).succeeded
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'tideq_jobs_total{priority="high",state="done"} 2.0' in text
    assert "tideq_engine_kv_blocks_free" in text
    assert "tideq_job_seconds_count" in text


def test_cancel_stops_running_jobs_too(tmp_path, redis_url, tiny_llama, start_worker):
    import time

    config_path = write_config(tmp_path / "d.yaml", redis_url, tiny_llama,
                               limits={"max_output_tokens": 400, "default_max_tokens": 16},
                               model={"max_model_len": 512})
    with Producer(load_config(config_path)) as producer:
        rows = [{"prompt": f"a long answer {i}", "max_tokens": 400, "temperature": 1.0,
                 "seed": i} for i in range(16)]
        batch = producer.submit(write_jsonl(tmp_path / "p.jsonl", rows))
        start_worker(config_path)
        deadline = time.monotonic() + 60
        while producer.status(batch.batch_id).count("running") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        producer.cancel(batch.batch_id)
        status = producer.wait(batch.batch_id, timeout=60)
        assert status.finished and status.count("cancelled") >= 8
        records = list(producer.store.iter_jobs(batch.batch_id))
        stopped_while_running = [r for r in records if r.state == "cancelled" and r.error
                                 and "while the job ran" in r.error["message"]]
        assert stopped_while_running, [r.state for r in records]
        for r in stopped_while_running:
            assert "started_at" in r.fields


def test_a_monitor_turns_task_events_on(tmp_path, config_path, producer, start_worker):
    """Workers send no task events until asked, and then do: Flower asks at start-up (its
    --enable_events), so it sees every job without the events costing anything unwatched."""
    import threading

    from tasks.app import create_app

    app = create_app(load_config(config_path))
    start_worker(config_path, heartbeat=True)  # as `celery -A tasks worker` runs it
    seen: list[str] = []
    listening = threading.Event()

    def on_event(event: dict) -> None:
        if event["type"] == "task-succeeded":
            seen.append(event["uuid"])
        listening.set()  # the first event is the worker's answer to the wakeup below

    def run_one(name: str) -> None:
        batch = producer.submit(write_jsonl(tmp_path / f"{name}.jsonl",
                                            [{"prompt": name, "max_tokens": 2}]))  # fmt: skip
        assert producer.wait(batch.batch_id, timeout=60).succeeded

    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": on_event})
        listener = threading.Thread(
            target=receiver.capture, kwargs={"limit": None, "wakeup": True}, daemon=True
        )
        listener.start()
        try:
            assert listening.wait(20), "the event receiver heard nothing from the worker"
            run_one("unwatched")
            assert seen == []
            # One worker here: its reply ends the wait (the timeout is only the patience).
            replies = app.control.enable_events(reply=True, timeout=5, limit=1)
            assert replies, "no worker answered enable_events"
            run_one("watched")
            deadline = time.monotonic() + 10
            while not seen and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(seen) == 1
        finally:
            receiver.should_stop = True  # the capture loop checks it every second
            listener.join(10)
