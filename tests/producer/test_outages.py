"""Redis going away under the producer, with real redis-server processes killed with SIGKILL
(tests/conftest.py's private_redis, AOF fsynced on every write, so an acknowledged write
survives the kill).

A submit that Redis interrupts says which batch and how many jobs went in; submitting the file
again to that batch enqueues the rest, each job exactly once. wait() rides out a restart;
status/results/cancel ride out a short one."""

from __future__ import annotations

import json
import shlex
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Producer, SubmitInterruptedError, WaitTimeoutError
from producer.cli import main
from tasks import keys
from tasks.config import DeploymentConfig, LimitSettings, RedisSettings
from tasks.store import JobStore, QueuedJob
from tests.producer.conftest import DEFAULT_MAX_TOKENS, MAX_OUTPUT_TOKENS
from tests.redis_proc import RedisProcess

CHUNK = 50
LINES = 1000  # 20 chunks
# Outages the tests' clients ride out: short, so that a Redis that stays down fails fast.
OUTAGE_S = 0.5
RESTART_TIMEOUT_S = 60.0


@pytest.fixture
def config(private_redis: RedisProcess) -> DeploymentConfig:
    return DeploymentConfig(
        redis=RedisSettings(url=private_redis.url()),
        limits=LimitSettings(max_output_tokens=MAX_OUTPUT_TOKENS,
                             default_max_tokens=DEFAULT_MAX_TOKENS),
    )


@pytest.fixture
def prompts(write_jsonl: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr("producer.client.ENQUEUE_CHUNK", CHUNK)
    return write_jsonl([{"prompt": f"p{i}"} for i in range(LINES)])


@pytest.fixture
def server_client(private_redis: RedisProcess) -> Iterator[redis.Redis]:
    """A plain client of the private server, for the test's own reads (reconnects by itself
    after a restart)."""
    client = private_redis.client()
    yield client
    client.close()


@pytest.fixture
def cli_env(private_redis: RedisProcess, monkeypatch: pytest.MonkeyPatch) -> str:
    """`producer.cli.main` on the private server, riding out only OUTAGE_S of an outage."""
    monkeypatch.delenv("TIDEQ_CONFIG", raising=False)
    monkeypatch.setenv("TIDEQ_REDIS_URL", private_redis.url())
    monkeypatch.setattr("producer.client.DEFAULT_OUTAGE_S", OUTAGE_S)
    return private_redis.url()


def kill_at_enqueue_call(monkeypatch: pytest.MonkeyPatch, server: RedisProcess, n: int,
                         during: bool = False) -> list[int]:
    """Kill the server at the n-th JobStore.enqueue call (1-based): just before the call
    reaches it or, with during=True, from another thread while the call runs (the next call
    then waits for the kill, so the submit is interrupted either way). Returns the chunk sizes
    of the calls made."""
    calls: list[int] = []
    killer: list[threading.Thread] = []
    real = JobStore.enqueue

    def enqueue(self: JobStore, batch_id: str, priority: str, jobs: Sequence[QueuedJob]) -> int:
        calls.append(len(jobs))
        if len(calls) == n:
            if during:
                killer.append(threading.Thread(target=server.kill))
                killer[0].start()
            else:
                server.kill()
        elif len(calls) == n + 1 and killer:
            killer[0].join()
        return real(self, batch_id, priority, jobs)

    monkeypatch.setattr(JobStore, "enqueue", enqueue)
    return calls


def batch_in_redis(client: redis.Redis, batch_id: str) -> dict[str, Any]:
    """What Redis holds of a batch: queued messages' task ids, job records, listed job ids."""
    messages = client.lrange(keys.QUEUE_LOW, 0, -1) + client.lrange(keys.QUEUE_HIGH, 0, -1)
    total = client.hget(keys.batch_key(batch_id), "total")
    return {
        "message_ids": [json.loads(m)["headers"]["id"] for m in messages],
        "records": len(list(client.scan_iter(keys.job_key(f"{batch_id}:*"), count=1000))),
        "listed": [x.decode() for x in client.lrange(keys.batch_jobs_key(batch_id), 0, -1)],
        "total": int(total or 0),
    }


def assert_complete_once(client: redis.Redis, batch_id: str, lines: int = LINES) -> None:
    """Every line of the file is one job: one record, one message, listed once."""
    state = batch_in_redis(client, batch_id)
    expected = [f"{batch_id}:L{i}" for i in range(1, lines + 1)]
    assert sorted(state["message_ids"]) == sorted(expected)
    assert sorted(state["listed"]) == sorted(expected)
    assert state["records"] == lines and state["total"] == lines


def finish_all(url: str, batch_id: str, lines: int) -> None:
    """Play the workers: finish every job of the batch (through a client of their own)."""
    store = JobStore.from_url(url, 600)
    try:
        for i in range(1, lines + 1):
            store.finish(f"{batch_id}:L{i}", batch_id, "done",
                         {"text": "out", "finish_reason": "stop", "prompt_tokens": 1,
                          "completion_tokens": 1}, 1)
    finally:
        store.client.close()


# --- submit ----------------------------------------------------------------------------------

@pytest.mark.parametrize("during", [False, True], ids=["between-chunks", "mid-call"])
def test_interrupted_submit_then_resubmit_completes_the_batch_once(
        config: DeploymentConfig, private_redis: RedisProcess, prompts: Path,
        server_client: redis.Redis, monkeypatch: pytest.MonkeyPatch, during: bool) -> None:
    calls = kill_at_enqueue_call(monkeypatch, private_redis, 5, during=during)
    with Producer(config, outage_s=OUTAGE_S) as producer:
        with pytest.raises(SubmitInterruptedError) as caught:
            producer.submit(prompts, batch_id="cut")
        err = caught.value
        assert (err.batch_id, err.priority, err.accepted) == ("cut", "low", LINES)
        assert err.unreachable and isinstance(err.cause, redis.ConnectionError)
        assert isinstance(err, redis.RedisError)  # callers that caught Redis errors still do
        # Calls 1-4 returned; the 5th (or, when the kill came during it, the 6th) failed.
        assert err.enqueued in ((4 * CHUNK, 5 * CHUNK) if during else (4 * CHUNK,))
        assert f"at least {err.enqueued} of {LINES} jobs enqueued before Redis became" \
               " unreachable" in str(err)
        assert "batch id cut" in str(err)
        assert len(calls) in (5, 6) and all(size == CHUNK for size in calls)

        private_redis.start()
        there = batch_in_redis(server_client, "cut")
        # A chunk whose call failed went in whole or not at all.
        assert len(there["message_ids"]) in (err.enqueued, err.enqueued + CHUNK)
        assert there["total"] == len(there["message_ids"]) == there["records"]

        report = producer.submit(prompts, batch_id="cut")
        assert (report.accepted, report.new) == (LINES, LINES - there["total"])
        assert_complete_once(server_client, "cut")
        assert producer.status("cut").count("queued") == LINES


def test_redis_down_from_the_start_interrupts_with_nothing_enqueued(
        config: DeploymentConfig, private_redis: RedisProcess, prompts: Path,
        server_client: redis.Redis) -> None:
    private_redis.kill()
    with Producer(config, outage_s=OUTAGE_S) as producer:
        with pytest.raises(SubmitInterruptedError) as caught:
            producer.submit(prompts)
        assert caught.value.enqueued == 0 and caught.value.accepted == LINES
        batch_id = caught.value.batch_id
        private_redis.start()
        assert producer.submit(prompts, batch_id=batch_id).new == LINES
    assert_complete_once(server_client, batch_id)


def test_submit_rides_out_a_restart(config: DeploymentConfig, private_redis: RedisProcess,
                                    prompts: Path, server_client: redis.Redis,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Redis is killed before the 3rd chunk and back within the outage the client rides out.
    restarted = threading.Event()
    real = JobStore.enqueue
    calls: list[int] = []

    def enqueue(self: JobStore, batch_id: str, priority: str, jobs: Sequence[QueuedJob]) -> int:
        calls.append(len(jobs))
        if len(calls) == 3:
            private_redis.kill()
            threading.Thread(target=lambda: (time.sleep(1), private_redis.start(),
                                             restarted.set())).start()
        return real(self, batch_id, priority, jobs)

    monkeypatch.setattr(JobStore, "enqueue", enqueue)
    with Producer(config, outage_s=RESTART_TIMEOUT_S) as producer:
        report = producer.submit(prompts, batch_id="ride")
    assert restarted.wait(RESTART_TIMEOUT_S)
    assert report.accepted == LINES
    assert_complete_once(server_client, "ride")


def test_cli_interrupted_submit_prints_the_batch_and_how_to_finish_it(
        cli_env: str, private_redis: RedisProcess, prompts: Path, server_client: redis.Redis,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    kill_at_enqueue_call(monkeypatch, private_redis, 3)
    assert main(["submit", str(prompts), "--priority", "high"]) == 3
    out, err = capsys.readouterr()
    batch_id = out.strip()
    assert out == batch_id + "\n" and batch_id.startswith("b-")
    again = shlex.join(["producer", "submit", str(prompts), "--batch-id", batch_id,
                        "--priority", "high"])
    assert f"batch {batch_id}: at least {2 * CHUNK} of {LINES} jobs enqueued before Redis" \
           " became unreachable (" in err
    assert f"run `{again}` again to enqueue the rest, without duplicates" in err
    assert "Traceback" not in err

    # The command it prints completes the batch.
    private_redis.start()
    assert main(shlex.split(again)[1:]) == 0
    out, err = capsys.readouterr()
    assert out == batch_id + "\n"
    assert f"{LINES} jobs accepted, {LINES - 2 * CHUNK} new, priority high" in err
    assert_complete_once(server_client, batch_id)
    assert server_client.llen(keys.QUEUE_HIGH) == LINES


def test_cli_resubmit_command_keeps_the_options_that_matter(
        cli_env: str, private_redis: RedisProcess, write_jsonl: Callable[..., Path],
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl([{"prompt": "a"}, {"prompt": ""}], name="with space.jsonl")
    config = tmp_path / "deploy.yaml"
    config.write_text(f"redis: {{url: '{cli_env}'}}\n")
    private_redis.kill()
    assert main(["submit", str(path), "--skip-invalid", "--config", str(config),
                 "--batch-id", "keep"]) == 3
    out, err = capsys.readouterr()
    assert out == "keep\n"
    again = shlex.join(["producer", "submit", str(path), "--batch-id", "keep", "--skip-invalid",
                        "--config", str(config)])
    assert "at least 0 of 1 job enqueued before Redis became unreachable" in err
    assert f"run `{again}` again" in err


# --- wait ------------------------------------------------------------------------------------

def test_wait_rides_out_a_restart(config: DeploymentConfig, private_redis: RedisProcess,
                                  write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl([{"prompt": f"p{i}"} for i in range(3)])
    events: list[tuple[str, Any]] = []

    def progress(status: Any) -> None:
        events.append(("progress", status.finished_count))
        if len(events) == 1:
            private_redis.kill()  # Redis goes away after the first poll

    def on_outage(error: Exception | None) -> None:
        events.append(("outage", error))
        if error is not None:
            # While the wait keeps polling: Redis comes back, the workers finish the batch.
            time.sleep(1)
            private_redis.start()
            finish_all(private_redis.url(), batch_id, 3)

    with Producer(config, outage_s=OUTAGE_S) as producer:
        batch_id = producer.submit(path).batch_id
        status = producer.wait(batch_id, timeout=RESTART_TIMEOUT_S, poll_s=0.05,
                               progress=progress, on_outage=on_outage)
    assert status.succeeded and status.count("done") == 3
    kinds = [kind for kind, _ in events]
    assert kinds == ["progress", "outage", "outage", "progress"]
    assert isinstance(events[1][1], redis.ConnectionError) and events[2][1] is None
    assert events[3] == ("progress", 3)


def test_wait_timeout_applies_while_redis_is_down(config: DeploymentConfig,
                                                  private_redis: RedisProcess,
                                                  write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl([{"prompt": "a"}, {"prompt": "b"}])
    outages: list[Exception | None] = []
    with Producer(config, outage_s=OUTAGE_S) as producer:
        batch_id = producer.submit(path).batch_id
        with pytest.raises(WaitTimeoutError) as caught:
            producer.wait(batch_id, timeout=2, poll_s=0.05,
                          progress=lambda s: private_redis.kill(), on_outage=outages.append)
    assert caught.value.status.total == 2 and caught.value.status.finished_count == 0
    assert len(outages) == 1 and isinstance(outages[0], redis.ConnectionError)


def test_wait_on_a_redis_never_reached_fails(config: DeploymentConfig,
                                             private_redis: RedisProcess) -> None:
    # No Redis for the first read: an error (as for status), not an endless wait.
    private_redis.kill()
    with Producer(config, outage_s=OUTAGE_S) as producer, pytest.raises(redis.ConnectionError):
        producer.wait("b-x")


def test_cli_wait_spans_a_restart(cli_env: str, private_redis: RedisProcess,
                                  write_jsonl: Callable[..., Path],
                                  monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("producer.client.DEFAULT_POLL_S", 0.05)
    monkeypatch.setattr("producer.client.POLL_OUTAGE_S", 0.1)
    path = write_jsonl([{"prompt": f"p{i}"} for i in range(4)])
    assert main(["submit", str(path), "--batch-id", "span"]) == 0
    first_read = threading.Event()
    real = JobStore.batch_counts

    def batch_counts(self: JobStore, batch_id: str) -> dict[str, int]:
        counts = real(self, batch_id)
        first_read.set()
        return counts

    monkeypatch.setattr(JobStore, "batch_counts", batch_counts)

    def restart_and_work() -> None:
        assert first_read.wait(RESTART_TIMEOUT_S)
        private_redis.kill()
        time.sleep(2)
        private_redis.start()
        finish_all(private_redis.url(), "span", 4)

    worker = threading.Thread(target=restart_and_work)
    worker.start()
    try:
        code = main(["wait", "span", "--timeout", str(RESTART_TIMEOUT_S)])
    finally:
        worker.join()
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"Redis at {cli_env} is unreachable (" in err
    assert "retrying until it is back or the timeout" in err
    assert f"Redis at {cli_env} is reachable again; still waiting" in err
    assert err.count("is unreachable") == 1


# --- status, results, cancel -----------------------------------------------------------------

def test_status_results_and_cancel_ride_out_a_restart(config: DeploymentConfig,
                                                      private_redis: RedisProcess,
                                                      write_jsonl: Callable[..., Path]) -> None:
    path = write_jsonl([{"prompt": "a"}, {"prompt": "b"}])
    with Producer(config, outage_s=RESTART_TIMEOUT_S) as producer:
        batch_id = producer.submit(path).batch_id
        for call in (lambda: producer.status(batch_id).total,
                     lambda: len(list(producer.results(batch_id))),
                     lambda: producer.cancel(batch_id)):
            private_redis.kill()
            restart = threading.Thread(target=lambda: (time.sleep(1), private_redis.start()))
            restart.start()
            try:
                assert call() == 2
            finally:
                restart.join()
