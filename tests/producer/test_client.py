"""The client and the CLI against real Redis; workers are simulated with JobStore calls."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import FileChangedError, Producer, UnknownBatchError, WaitTimeoutError
from producer.cli import main
from producer.formats import ParsedLine
from tasks import keys
from tasks.messages import decode, job_ids_of
from tasks.store import JobStore, QueuedJob

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def result(text: str, tokens: int = 3) -> dict[str, Any]:
    return {"text": text, "finish_reason": "stop", "prompt_tokens": 2,
            "completion_tokens": tokens, "queued_s": 0.1, "first_token_s": 0.2,
            "total_s": 0.3, "worker": "w0", "gpu": "0", "model": "tiny"}


def finish(producer: Producer, batch_id: str, job: str, state: str = "done",
           text: str = "out", tokens: int = 3) -> None:
    """Play the worker: start the job, then finish it."""
    job_id = f"{batch_id}:{job}"
    producer.store.start(job_id, batch_id, "w0", "0", "t-" + job_id, 60)
    if state == "done":
        producer.store.finish(job_id, batch_id, "done", result(text, tokens), tokens)
    else:
        producer.store.finish(job_id, batch_id, state,
                              {"type": "prompt_too_long", "message": "too long"})


@pytest.fixture
def mixed(write_jsonl: Callable[..., Path]) -> Path:
    return write_jsonl([
        {"prompt": "p1"},
        "",
        {"messages": [{"role": "user", "content": "m"}], "custom_id": "m1"},
        {"custom_id": "chat1", "method": "POST", "url": CHAT,
         "body": {"model": "gpt", "messages": [{"role": "user", "content": "c"}]}},
        {"custom_id": "cmp1", "method": "POST", "url": COMPLETIONS,
         "body": {"prompt": "t"}},
    ])


# --- submit ----------------------------------------------------------------------------------

def test_submit_records_and_enqueues(producer: Producer, rdb: redis.Redis, mixed: Path) -> None:
    report = producer.submit(mixed, priority="high")
    assert re.fullmatch(r"b-[0-9a-f]{12}", report.batch_id)
    assert (report.accepted, report.new, report.skipped) == (4, 4, 0)
    assert rdb.llen("high") == 4 and rdb.llen("low") == 0
    ids = [r.job_id for r in producer.store.iter_jobs(report.batch_id)]
    b = report.batch_id
    assert ids == [f"{b}:L1", f"{b}:m1", f"{b}:chat1", f"{b}:cmp1"]
    # LPUSH + BRPOP: the first line is consumed first.
    envelope, (args, kwargs, _) = decode(rdb.lindex("high", -1))  # type: ignore[arg-type]
    assert envelope["headers"]["id"] == f"{b}:L1"
    assert kwargs["job_id"] == f"{b}:L1" and kwargs["batch_id"] == b
    # The request lives in the job's record; the message names the job only.
    assert set(kwargs) == {"job_id", "batch_id"}
    record = producer.store.job(f"{b}:L1")
    assert record is not None and json.loads(record.fields["request"])["priority"] == "high"
    assert producer.status(b).by_priority["high"]["queued"] == 4


def test_resubmission_adds_no_duplicates(producer: Producer, rdb: redis.Redis,
                                         mixed: Path) -> None:
    first = producer.submit(mixed, batch_id="again")
    second = producer.submit(mixed, batch_id="again")
    assert (first.new, second.new, second.accepted) == (4, 0, 4)
    assert rdb.llen("low") == 4
    assert producer.status("again").total == 4


def test_chunks_keep_input_order(producer: Producer, rdb: redis.Redis,
                                 write_jsonl: Callable[..., Path],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("producer.client.ENQUEUE_CHUNK", 3)
    path = write_jsonl([{"prompt": f"p{i}"} for i in range(10)])
    report = producer.submit(path)
    assert report.new == 10
    assert [r.line for r in producer.store.iter_jobs(report.batch_id)] == list(range(1, 11))
    consumed = [json.loads(producer.store.job(decode(m)[1][1]["job_id"])  # type: ignore[union-attr]
                           .fields["request"])["prompt"]
                for m in reversed(rdb.lrange("low", 0, -1))]
    assert consumed == [f"p{i}" for i in range(10)]


def test_messages_of_several_jobs_never_span_two_enqueue_calls(
        producer: Producer, rdb: redis.Redis, write_jsonl: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """jobs_per_message 3 and enqueue calls of 4 lines: each call pushes the messages of the
    jobs it records, so a call cut short leaves no job recorded without a message."""
    monkeypatch.setattr("producer.client.ENQUEUE_CHUNK", 4)
    producer.jobs_per_message = 3
    path = write_jsonl([{"prompt": f"p{i}"} for i in range(10)])
    report = producer.submit(path)
    assert report.new == 10
    groups = [[job_id.rsplit(":L", 1)[1] for job_id in job_ids_of(decode(m)[0])]
              for m in reversed(rdb.lrange("low", 0, -1))]
    # Calls of lines 1-4, 5-8, 9-10; within each, groups of at most three in input order.
    assert groups == [["1", "2", "3"], ["4"], ["5", "6", "7"], ["8"], ["9", "10"]]


def test_first_enqueue_call_is_small_and_made_before_the_rest_is_built(
        producer: Producer, rdb: redis.Redis, write_jsonl: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers get the first jobs while the rest of the file is still being built: the first
    call carries FIRST_ENQUEUE_CHUNK jobs and is made before any later line is built; the calls
    then grow to ENQUEUE_CHUNK, messages stay within their call, and every job arrives once,
    in input order."""
    monkeypatch.setattr("producer.client.FIRST_ENQUEUE_CHUNK", 2)
    monkeypatch.setattr("producer.client.ENQUEUE_CHUNK_GROWTH", 3)
    monkeypatch.setattr("producer.client.ENQUEUE_CHUNK", 10)
    producer.jobs_per_message = 4
    lines = 40
    path = write_jsonl([{"prompt": f"p{i}"} for i in range(lines)])

    parsed: list[int] = []  # every parse, validation pass included
    real_parse = producer.parser.parse

    def parse(raw: bytes | str, number: int) -> ParsedLine:
        parsed.append(number)
        return real_parse(raw, number)

    calls: list[tuple[int, int]] = []  # (jobs in the call, lines built by then)
    real_enqueue = JobStore.enqueue

    def enqueue(self: JobStore, batch_id: str, priority: str,
                jobs: list[QueuedJob]) -> int:
        calls.append((len(jobs), len(parsed) - lines))
        return real_enqueue(self, batch_id, priority, jobs)

    monkeypatch.setattr(producer.parser, "parse", parse)
    monkeypatch.setattr(JobStore, "enqueue", enqueue)
    report = producer.submit(path)

    sizes = [n for n, _ in calls]
    assert sizes == [2, 6, 10, 10, 10, 2]
    assert calls[0][1] == 2  # the first two lines were built, no more
    assert report.new == lines
    assert [r.line for r in producer.store.iter_jobs(report.batch_id)] == list(range(1, 41))
    groups = [[int(job_id.rsplit(":L", 1)[1]) for job_id in job_ids_of(decode(m)[0])]
              for m in reversed(rdb.lrange("low", 0, -1))]
    expected: list[list[int]] = []
    start = 1
    for size in sizes:  # groups of at most jobs_per_message, cut at each call's end
        call = list(range(start, start + size))
        expected += [call[i:i + 4] for i in range(0, size, 4)]
        start += size
    assert groups == expected


@pytest.mark.parametrize("batch_id", ["", "has space", "a:b", "-lead", "x" * 129])
def test_bad_batch_id(producer: Producer, mixed: Path, batch_id: str) -> None:
    with pytest.raises(ValueError, match="batch id"):
        producer.submit(mixed, batch_id=batch_id)


def test_bad_priority(producer: Producer, mixed: Path) -> None:
    with pytest.raises(ValueError, match="priority"):
        producer.submit(mixed, priority="urgent")


# --- status, wait, cancel --------------------------------------------------------------------

def test_status_counts(producer: Producer, mixed: Path) -> None:
    b = producer.submit(mixed).batch_id
    finish(producer, b, "L1", tokens=5)
    finish(producer, b, "m1", state="failed")
    producer.store.start(f"{b}:chat1", b, "w0", "0", "t", 60)
    status = producer.status(b)
    assert status.by_priority["low"] == {"queued": 1, "running": 1, "done": 1, "failed": 1,
                                         "cancelled": 0}
    assert (status.total, status.completion_tokens, status.finished) == (4, 5, False)


def test_unknown_batch(producer: Producer) -> None:
    for call in (producer.status, producer.wait, producer.cancel,
                 lambda b: list(producer.results(b))):
        with pytest.raises(UnknownBatchError):
            call("nope")


def test_wait_until_finished(producer: Producer, mixed: Path) -> None:
    b = producer.submit(mixed).batch_id
    seen: list[int] = []

    def work() -> None:
        for job in ("L1", "m1", "chat1", "cmp1"):
            finish(producer, b, job)

    timer = threading.Timer(0.2, work)
    timer.start()
    status = producer.wait(b, timeout=10, poll_s=0.05,
                           progress=lambda s: seen.append(s.finished_count))
    timer.join()
    assert status.succeeded and status.count("done") == 4
    assert seen[0] < 4 and seen[-1] == 4


def test_wait_timeout_says_how_far(producer: Producer, mixed: Path) -> None:
    b = producer.submit(mixed).batch_id
    finish(producer, b, "L1")
    with pytest.raises(WaitTimeoutError) as err:
        producer.wait(b, timeout=0.1, poll_s=0.02)
    assert err.value.status.finished_count == 1
    assert isinstance(err.value, TimeoutError)


def test_cancel(producer: Producer, mixed: Path) -> None:
    b = producer.submit(mixed).batch_id
    finish(producer, b, "L1")
    producer.store.start(f"{b}:m1", b, "w0", "0", "t", 60)
    assert producer.cancel(b) == 2
    status = producer.status(b)
    assert status.cancelled and status.count("cancelled") == 2
    assert status.count("running") == 1


# --- results ---------------------------------------------------------------------------------

def test_results_in_input_order_in_both_formats(producer: Producer, mixed: Path) -> None:
    b = producer.submit(mixed).batch_id
    finish(producer, b, "cmp1", text="completed")
    finish(producer, b, "chat1", text="chatted", tokens=4)
    finish(producer, b, "L1", text="hello", tokens=7)
    rows = list(producer.results(b))
    assert len(rows) == 4
    assert rows[0] == {
        "job_id": f"{b}:L1", "line": 1, "custom_id": None, "state": "done", "text": "hello",
        "finish_reason": "stop", "usage": {"prompt_tokens": 2, "completion_tokens": 7},
        "model": "tiny", "priority": "low", "worker": "w0", "gpu": "0",
        "timing": {"queued_s": 0.1, "first_token_s": 0.2, "total_s": 0.3}, "error": None,
    }
    assert rows[1]["job_id"] == f"{b}:m1" and rows[1]["line"] == 3
    assert (rows[1]["state"], rows[1]["text"], rows[1]["usage"]) == ("queued", None, None)
    chat = rows[2]
    assert chat["id"] == f"{b}:chat1" and chat["custom_id"] == "chat1"
    assert chat["error"] is None and chat["response"]["status_code"] == 200
    body = chat["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": "chatted"}}]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    assert isinstance(body["created"], int) and body["created"] > 0
    text = rows[3]["response"]["body"]
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "completed"


def test_results_of_failed_and_cancelled_jobs(producer: Producer, mixed: Path) -> None:
    b = producer.submit(mixed).batch_id
    finish(producer, b, "L1", state="failed")
    finish(producer, b, "chat1", state="failed")
    producer.cancel(b)
    rows = list(producer.results(b))
    assert rows[0]["state"] == "failed" and rows[0]["text"] is None
    assert rows[0]["error"] == {"type": "prompt_too_long", "message": "too long"}
    assert rows[1]["state"] == "cancelled" and rows[1]["error"]["type"] == "cancelled"
    assert rows[2]["response"] is None
    assert rows[2]["error"] == {"code": "prompt_too_long", "message": "too long"}
    assert rows[3]["response"] is None and rows[3]["error"]["code"] == "cancelled"
    assert "state" not in rows[3]


def test_unfinished_openai_job_shows_its_state(producer: Producer, mixed: Path) -> None:
    b = producer.submit(mixed).batch_id
    rows = list(producer.results(b))
    assert rows[2] == {"id": f"{b}:chat1", "custom_id": "chat1", "response": None,
                       "error": None, "state": "queued"}


# --- CLI -------------------------------------------------------------------------------------

def test_cli_submit_prints_batch_id(cli_env: str, mixed: Path, rdb: redis.Redis,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", str(mixed), "--priority", "high", "--batch-id", "cli1"]) == 0
    out, err = capsys.readouterr()
    assert out == "cli1\n" and "4 jobs accepted, 4 new" in err
    assert rdb.llen("high") == 4
    assert main(["submit", str(mixed), "--priority", "high", "--batch-id", "cli1"]) == 0
    assert "4 jobs accepted, 0 new" in capsys.readouterr().err


def test_cli_submit_invalid_file(cli_env: str, rdb: redis.Redis,
                                 write_jsonl: Callable[..., Path],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl([{"prompt": "ok"}] + ["{"] * 60)
    assert main(["submit", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"{path}:2: <line>: invalid JSON" in err
    assert f"{path}:51:" in err and f"{path}:52:" not in err
    assert "and 10 more" in err and "nothing was enqueued" in err
    assert rdb.dbsize() == 0
    assert main(["submit", str(path), "--skip-invalid"]) == 0
    assert rdb.llen("low") == 1


def test_cli_submit_missing_file(cli_env: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl" in capsys.readouterr().err


def test_cli_status(cli_env: str, producer: Producer, mixed: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    b = producer.submit(mixed).batch_id
    finish(producer, b, "L1")
    assert main(["status", b]) == 0
    out = capsys.readouterr().out
    assert b in out and "low" in out and "done" in out
    assert main(["status", "nope"]) == 1
    assert "unknown batch 'nope'" in capsys.readouterr().err


def test_cli_wait_exit_codes(cli_env: str, producer: Producer, mixed: Path,
                             write_jsonl: Callable[..., Path]) -> None:
    b = producer.submit(mixed).batch_id
    assert main(["wait", b, "--timeout", "0.2"]) == 2
    for job in ("L1", "m1", "chat1", "cmp1"):
        finish(producer, b, job)
    assert main(["wait", b]) == 0
    failed = producer.submit(write_jsonl([{"prompt": "x"}], name="f.jsonl")).batch_id
    finish(producer, failed, "L1", state="failed")
    assert main(["wait", failed]) == 1
    assert main(["wait", "nope"]) == 2


def test_cli_results_and_cancel(cli_env: str, producer: Producer, mixed: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    b = producer.submit(mixed).batch_id
    finish(producer, b, "L1", text="hi ✓")
    assert main(["cancel", b]) == 0
    assert "3 queued jobs cancelled" in capsys.readouterr().err
    out_path = tmp_path / "out.jsonl"
    assert main(["results", b, "-o", str(out_path)]) == 0
    rows = [json.loads(x) for x in out_path.read_text(encoding="utf-8").splitlines()]
    assert [r.get("state") for r in rows[:2]] == ["done", "cancelled"]
    assert rows[0]["text"] == "hi ✓"
    capsys.readouterr()
    assert main(["results", b]) == 0
    assert [json.loads(x) for x in capsys.readouterr().out.splitlines()] == rows
    assert main(["results", "nope"]) == 1
    assert main(["cancel", "nope"]) == 1


def test_cli_bad_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("redis: {urll: x}\n")
    assert main(["status", "b", "--config", str(bad)]) == 2
    assert "urll" in capsys.readouterr().err


def test_cli_redis_down(monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("TIDEQ_CONFIG", raising=False)
    # Port 1 on localhost: nothing listens there; an outage is ridden out this long only.
    monkeypatch.setenv("TIDEQ_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setattr("producer.client.DEFAULT_OUTAGE_S", 0.2)
    assert main(["status", "b"]) == 3
    assert "cannot reach Redis" in capsys.readouterr().err


def test_queue_names_are_the_shared_ones() -> None:
    assert keys.QUEUES == ("high", "low")


def test_cli_submit_wait_times_out(cli_env: str, mixed: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", str(mixed), "--batch-id", "w1", "--wait", "--timeout", "0.2"]) == 2
    out, err = capsys.readouterr()
    assert out == "w1\n" and "timed out" in err


def test_file_changed_between_passes(producer: Producer, write_jsonl: Callable[..., Path],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_jsonl([{"prompt": "a"}, {"prompt": "b"}])
    validate = Producer._validate

    def validate_then_edit(self: Producer, name: str) -> Any:
        scan = validate(self, name)
        path.write_text(json.dumps({"prompt": ""}) + "\n")
        return scan

    monkeypatch.setattr(Producer, "_validate", validate_then_edit)
    with pytest.raises(FileChangedError, match=":1: changed"):
        producer.submit(path)
