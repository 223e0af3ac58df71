"""What the CLI says besides its output: warnings about unfinished results, counts in words, a
file that changes under a submit."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from producer import Producer
from producer.cli import _safe_url, main

CHAT = "/v1/chat/completions"


def done(producer: Producer, batch_id: str, job: str) -> None:
    producer.store.finish(f"{batch_id}:{job}", batch_id, "done",
                          {"text": "out", "finish_reason": "stop", "prompt_tokens": 1,
                           "completion_tokens": 1}, 1)


@pytest.fixture
def five(write_jsonl: Callable[..., Path]) -> Path:
    return write_jsonl([
        {"prompt": "a"},
        {"prompt": "b"},
        {"prompt": "c"},
        {"custom_id": "chat1", "method": "POST", "url": CHAT,
         "body": {"messages": [{"role": "user", "content": "x"}]}},
        {"custom_id": "chat2", "method": "POST", "url": CHAT,
         "body": {"messages": [{"role": "user", "content": "y"}]}},
    ])


def test_results_of_an_unfinished_batch_warn(cli_env: str, producer: Producer, five: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    b = producer.submit(five).batch_id
    done(producer, b, "L1")
    done(producer, b, "chat1")
    producer.store.start(f"{b}:L2", b, "w0", "0", "t-1", 60)
    assert main(["results", b]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 5
    # Plain rows and OpenAI rows (whose "state" is there only while unfinished) both count.
    assert (f"warning: batch {b}: 3 of 5 jobs are not finished yet (2 queued, 1 running);"
            " their rows carry no output") in err

    for job in ("L2", "L3", "chat2"):
        done(producer, b, job)
    assert main(["results", b]) == 0
    assert "warning" not in capsys.readouterr().err


def test_results_warning_counts_the_one_job(cli_env: str, producer: Producer,
                                            write_jsonl: Callable[..., Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    b = producer.submit(write_jsonl([{"prompt": "a"}])).batch_id
    out_path = tmp_path / "out.jsonl"
    assert main(["results", b, "-o", str(out_path)]) == 0
    err = capsys.readouterr().err
    assert f"1 result written to {out_path}" in err
    assert f"warning: batch {b}: 1 of 1 job is not finished yet (1 queued)" in err
    assert [json.loads(x)["state"] for x in out_path.read_text().splitlines()] == ["queued"]


def test_counts_of_one_are_singular(cli_env: str, write_jsonl: Callable[..., Path],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl([{"prompt": "a"}, {"prompt": ""}])
    assert main(["submit", str(path), "--skip-invalid", "--batch-id", "one"]) == 0
    err = capsys.readouterr().err
    assert "batch one: 1 job accepted, 1 new, priority low, 1 invalid line skipped" in err
    assert main(["cancel", "one"]) == 0
    assert "batch one: 1 queued job cancelled;" in capsys.readouterr().err


def test_cli_file_changed_during_submit(cli_env: str, write_jsonl: Callable[..., Path],
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl([{"prompt": "a"}, {"prompt": "b"}])
    validate = Producer._validate

    def validate_then_edit(self: Producer, name: str) -> Any:
        scan = validate(self, name)
        path.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": ""}) + "\n")
        return scan

    monkeypatch.setattr(Producer, "_validate", validate_then_edit)
    assert main(["submit", str(path), "--batch-id", "moved"]) == 2
    out, err = capsys.readouterr()
    assert out == "moved\n"
    assert f"producer submit: {path}:2: changed while it was being submitted" in err
    again = shlex.join(["producer", "submit", str(path), "--batch-id", "moved"])
    assert f"`{again}` adds the missing ones" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:secret@db:6379/0", "redis://:***@db:6379/0"),
    ("rediss://user:secret@db/1", "rediss://user:***@db/1"),
])
def test_messages_never_show_the_redis_password(url: str, shown: str) -> None:
    assert _safe_url(url) == shown
