"""The engine core in processes of its own: the same tokens as in a thread, a group of two
ranks (tensor parallel over gloo) the same as one, and a killed rank fails the live requests
with a clear reason instead of hanging."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import EngineError, EngineShutDownError, Request, SamplingParams

MAX_TOKENS = 10


def config(path: Path, **kw: object) -> EngineConfig:
    base: dict[str, object] = {"model_path": str(path), "dtype": "float32", "device": "cpu",
                               "max_model_len": 128, "block_size": 4, "max_num_seqs": 8}
    base.update(kw)
    return EngineConfig(**base)  # type: ignore[arg-type]


def greedy(prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[Request]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [Request(f"r{i}", prompt_token_ids=p, sampling=params) for i, p in enumerate(prompts)]


def tokens(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(greedy(prompts))]


@pytest.fixture(scope="module")
def thread_tokens(checkpoint: Callable[[str], Path], prompts: list[list[int]]
                  ) -> dict[str, list[list[int]]]:
    out = {}
    for variant in ("llama", "qwen2"):
        engine = Engine(config(checkpoint(variant), core="thread"))
        try:
            out[variant] = tokens(engine, prompts[:4])
        finally:
            engine.shutdown()
    return out


def test_a_core_process_gives_the_thread_core_s_tokens(checkpoint, prompts, thread_tokens):
    engine = Engine(config(checkpoint("llama")))
    try:
        assert engine.backend is None  # the model lives in the core process, not here
        assert tokens(engine, prompts[:4]) == thread_tokens["llama"]
        stats = engine.stats()
        assert stats["requests"] == 4 and stats["steps"] > 0 and stats["running"] == 0
    finally:
        engine.shutdown()
    assert not engine.is_alive()


def test_a_tensor_group_of_two_gives_the_same_tokens(checkpoint, prompts, thread_tokens):
    engine = Engine(config(checkpoint("qwen2"), group_size=2, shard_strategy="tensor",
                           distributed_backend="gloo"))
    try:
        assert tokens(engine, prompts[:4]) == thread_tokens["qwen2"]
    finally:
        engine.shutdown()


def test_a_killed_rank_fails_the_live_requests_and_ends_the_engine(checkpoint, prompts):
    engine = Engine(config(checkpoint("qwen2"), group_size=2, shard_strategy="tensor",
                           distributed_backend="gloo"))
    try:
        futures = [engine.submit(r) for r in greedy(prompts[:2], max_tokens=100)]
        rank1 = engine._core.procs[1]  # type: ignore[attr-defined]
        os.kill(rank1.pid, signal.SIGKILL)
        for future in futures:
            with pytest.raises(EngineShutDownError, match="rank1.*exited with -9"):
                future.result(60)
        deadline = time.monotonic() + 10
        while engine.is_alive():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(EngineShutDownError):
            engine.submit(greedy(prompts[:1])[0]).result(5)
        # The whole group is gone, not only the rank that was killed.
        for proc in engine._core.procs:  # type: ignore[attr-defined]
            proc.join(10)
            assert not proc.is_alive()
    finally:
        engine.shutdown()


def test_handing_a_request_over_never_waits_for_the_core_to_read(checkpoint):
    """A thread that submits while the core is busy (here: stopped outright, with more
    requests than its pipe's buffer holds) returns at once; the core then takes them all."""
    import threading

    engine = Engine(config(checkpoint("llama")))
    core_pid = engine._core.procs[0].pid  # type: ignore[attr-defined]
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    requests = [Request(f"r{i}", prompt_token_ids=[(i + j) % 90 + 5 for j in range(100)],
                        sampling=params) for i in range(3000)]  # ~1 MB of messages
    futures: list = []
    try:
        os.kill(core_pid, signal.SIGSTOP)
        submitter = threading.Thread(target=lambda: futures.extend(map(engine.submit, requests)))
        submitter.start()
        submitter.join(60)
        stalled = submitter.is_alive()
        os.kill(core_pid, signal.SIGCONT)
        assert not stalled, "submit waited for the stopped core to read its pipe"
        assert all(len(f.result(120).token_ids) == 1 for f in futures)
    finally:
        os.kill(core_pid, signal.SIGCONT)
        engine.shutdown()


def test_a_missing_model_folder_says_what_is_expected(tmp_path):
    with pytest.raises(EngineError, match="missing is not a folder"):
        Engine(config(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EngineError, match="empty has no config.json"):
        Engine(config(tmp_path / "empty", core="thread"))


def test_a_core_that_fails_to_start_says_why(tmp_path, checkpoint):
    # A checkpoint whose weights file is corrupt: the core process fails while loading.
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in checkpoint("llama").iterdir():
        data = b"not safetensors" if item.name.endswith(".safetensors") else item.read_bytes()
        (broken / item.name).write_bytes(data)
    with pytest.raises(EngineError, match="the engine core failed to start: "):
        Engine(config(broken))
