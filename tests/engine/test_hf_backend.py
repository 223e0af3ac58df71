"""The transformers fallback backend: same greedy tokens as transformers' generate, static
batches formed high priority first."""

from __future__ import annotations

from engine.backends.hf import HFBackend
from engine.config import EngineConfig
from engine.request import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def test_greedy_matches_generate_with_staggered_arrivals(checkpoint, prompts, hf_greedy, drive):
    path = checkpoint("qwen2")
    backend = HFBackend(EngineConfig(model_path=str(path), dtype="float32", device="cpu",
                                     backend="hf", max_num_seqs=4, max_model_len=256))
    requests = [(f"r{i}", p, GREEDY, i % 2) for i, p in enumerate(prompts)]
    results = drive(backend, requests, stagger=2)
    expected = hf_greedy(path, prompts, 12)
    for i, want in enumerate(expected):
        got = results[f"r{i}"]
        assert got.token_ids == want[: len(got.token_ids)]
        assert got.finish_reason == ("stop" if len(got.token_ids) < 12 else "length")


def test_batches_are_formed_high_first(checkpoint, prompts):
    backend = HFBackend(EngineConfig(model_path=str(checkpoint("llama")), dtype="float32",
                                     device="cpu", backend="hf", max_num_seqs=2))
    for i, p in enumerate(prompts[:4]):
        backend.add_request(f"low{i}", p, GREEDY, 1)
    backend.add_request("high", prompts[4], GREEDY, 0)
    first = {out.request_id for out in backend.step()}
    assert first == {"high", "low0"}
    backend.abort_request("low0")
    assert "low0" not in {out.request_id for out in backend.step()}
