"""Live token streams through a real worker: redis.stream_tokens on, the job's text goes to
tideq:stream:<job_id> as it is generated, and `producer tail` prints it; off, no stream."""

from __future__ import annotations

import json
import time
from pathlib import Path

from producer import Producer
from producer.cli import main
from tasks.config import load_config
from tasks.streams import stream_key
from tests.conftest import write_config


def _submit_one(tmp_path: Path, producer: Producer, max_tokens: int = 24) -> tuple[str, str]:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"prompt": "The quick brown fox", "max_tokens": max_tokens,
                                "temperature": 0}) + "\n")
    report = producer.submit(path)
    assert producer.wait(report.batch_id, timeout=120).succeeded
    (row,) = list(producer.results(report.batch_id))
    return report.batch_id, row["job_id"]


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def test_a_jobs_text_is_streamed_and_tail_prints_it(tmp_path, redis_url, tiny_llama,
                                                    start_worker, redis_server, monkeypatch,
                                                    capsys):
    config_path = write_config(tmp_path / "deploy.yaml", redis_url, tiny_llama,
                               redis={"stream_tokens": True})
    start_worker(config_path)
    with Producer(load_config(config_path)) as producer:
        batch_id, job_id = _submit_one(tmp_path, producer)
        final = next(producer.results(batch_id))
    assert final["usage"]["completion_tokens"] == 24

    key = stream_key(job_id)
    entries = [{_decode(k): _decode(v) for k, v in fields.items()}
               for _, fields in redis_server.xrange(key)]
    # The done entry is written just after the result; wait() may return before it lands.
    for _ in range(50):
        if entries and "done" in entries[-1]:
            break
        time.sleep(0.1)
        entries = [{_decode(k): _decode(v) for k, v in fields.items()}
                   for _, fields in redis_server.xrange(key)]
    assert entries[0] == {"restart": "1"}
    assert entries[-1] == {"done": "1", "state": "done"}
    texts = [e["text"] for e in entries if "text" in e]
    assert len(texts) >= 3  # several pieces before the end, not one at the end
    assert "".join(texts) == final["text"]
    assert 0 < redis_server.ttl(key) <= 7 * 24 * 3600

    monkeypatch.setenv("TIDEQ_CONFIG", str(config_path))
    monkeypatch.delenv("TIDEQ_REDIS_URL", raising=False)
    capsys.readouterr()
    assert main(["tail", job_id, "--from-start"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip("\n") == final["text"].rstrip("\n")
    # Not from the start: the job has finished, its stored text is printed.
    assert main(["tail", job_id]) == 0
    assert capsys.readouterr().out.rstrip("\n") == final["text"].rstrip("\n")
    # A batch: each piece prefixed with the job's line.
    assert main(["tail", batch_id, "--from-start"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1] ")
    assert out.replace("\n[1] ", "\n").removeprefix("[1] ").rstrip("\n") \
        == final["text"].rstrip("\n")
    assert main(["tail", "no-such-job"]) == 1


def test_streaming_off_writes_no_stream_and_tail_says_so(tmp_path, redis_url, tiny_llama,
                                                         start_worker, redis_server,
                                                         monkeypatch, capsys):
    config_path = write_config(tmp_path / "deploy.yaml", redis_url, tiny_llama)
    start_worker(config_path)
    with Producer(load_config(config_path)) as producer:
        batch_id, job_id = _submit_one(tmp_path, producer, max_tokens=8)
        final = next(producer.results(batch_id))
    assert not list(redis_server.scan_iter(match="tideq:stream:*"))

    monkeypatch.setenv("TIDEQ_CONFIG", str(config_path))
    monkeypatch.delenv("TIDEQ_REDIS_URL", raising=False)
    capsys.readouterr()
    assert main(["tail", job_id, "--from-start"]) == 0
    captured = capsys.readouterr()
    assert "streaming is off (redis.stream_tokens)" in captured.err
    assert captured.out.rstrip("\n") == final["text"].rstrip("\n")

