"""The fast GPU path of the runner (Triton attention, decode steps through the static buffers of
engine.executor.cuda_graphs) gives the same greedy tokens as the plain PyTorch path.

On the CPU the decode steps run the graphs' static buffers eagerly (no capture) and the Triton
kernels in the interpreter, in a subprocess (TRITON_INTERPRET must not leak into other tests).
On a GPU the graphs are captured and replayed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402
from triton_interpreter import run_in_interpreter  # noqa: E402

from engine.backends.native import NativeBackend  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.request import SamplingParams  # noqa: E402

MAX_TOKENS = 12
# Lengths around block boundaries and one longer than a prefill tile of the Triton kernel.
LENGTHS = [3, 17, 40, 9, 70, 25]


def prompts() -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(4, 1000) for _ in range(n)] for n in LENGTHS]


def generate(backend: NativeBackend, stagger: int = 2) -> dict[str, list[int]]:
    """Greedy outputs, request i added at step i * stagger (mixed and pure decode steps)."""
    sampling = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    pending = [(f"r{i}", p) for i, p in enumerate(prompts())]
    out: dict[str, list[int]] = {rid: [] for rid, _ in pending}
    step = 0
    while pending or backend.has_unfinished():
        while pending and step >= (len(out) - len(pending)) * stagger:
            rid, p = pending.pop(0)
            backend.add_request(rid, p, sampling, 0)
        for o in backend.step():
            out[o.request_id].extend(o.new_token_ids)
        step += 1
    return out


def generate_with_abort(backend: NativeBackend) -> dict[str, list[int]]:
    """Three greedy requests decoding together, one finishing early on its max_tokens and
    one aborted mid-way (as a stop string does): the batch changes under a step launched
    ahead (a pending lookahead step, or the async scheduler's next step)."""
    out: dict[str, list[int]] = {}
    for i, p in enumerate(prompts()[:3]):
        sampling = SamplingParams(max_tokens=(5, 12, 12)[i], temperature=0.0, ignore_eos=True)
        backend.add_request(f"r{i}", p, sampling, 0)
        out[f"r{i}"] = []
    step = 0
    while backend.has_unfinished():
        if step == 7:  # a lookahead step for r1 and r2 is pending here
            backend.abort_request("r1")
        for o in backend.step():
            out[o.request_id].extend(o.new_token_ids)
        step += 1
    return out


def assert_same_up_to_the_abort(got: dict[str, list[int]], want: dict[str, list[int]]) -> None:
    """generate_with_abort's outputs against a run where each step waited for the one
    before: the same, but for the aborted request, which may have a token fewer (the one a
    step launched ahead computed, dropped with the abort)."""
    assert got["r0"] == want["r0"] and got["r2"] == want["r2"], (got, want)
    r1, want_r1 = got["r1"], want["r1"]
    assert r1 == want_r1[: len(r1)] and len(want_r1) - 1 <= len(r1), (got, want)


def config(path: Path, device: str, **overrides: object) -> EngineConfig:
    settings: dict[str, object] = dict(
        dtype="float32", device=device, max_model_len=128, max_num_seqs=8, block_size=4
    )
    settings.update(overrides)
    return EngineConfig(model_path=str(path), **settings)  # type: ignore[arg-type]


def check_static_buffers_on_cpu(path: str, async_scheduling: bool) -> None:
    """Run in the subprocess: Triton attention, the fused layers, the GEMV kernel (one-row
    decode steps) and the graphs' buffers, run eagerly on the CPU; with async scheduling
    the graph steps take their input tokens from the step before on the device (patched
    into their buffers), without it pure decode steps are launched ahead (lookahead)."""
    import engine.executor.runner as runner_module
    from engine.executor.cuda_graphs import DecodeGraphs
    from engine.executor.mixed_graphs import MixedGraphs
    from engine.kernels import gemv as triton_gemv
    from engine.kernels.attention import PREFILL_BLOCK_M

    gemv_calls: list[bool] = []
    plain_gemv = triton_gemv.gemv

    def counted_gemv(*args: object, **kwargs: object) -> object:
        gemv_calls.append(bool(kwargs.get("silu_mul") or kwargs.get("norm_weight") is not None))
        return plain_gemv(*args, **kwargs)  # type: ignore[arg-type]

    triton_gemv.gemv = counted_gemv  # type: ignore[assignment]

    want = generate(NativeBackend(config(Path(path), "cpu", async_scheduling=False)))
    want_abort = generate_with_abort(
        NativeBackend(config(Path(path), "cpu", async_scheduling=False)))
    runner_module.use_triton = lambda device, config: True  # the GPU path's layers

    def fast_backend() -> NativeBackend:
        backend = NativeBackend(config(Path(path), "cpu", async_scheduling=async_scheduling))
        runner = backend.runner
        runner.graphs = DecodeGraphs(
            runner.model,
            runner.kv_caches,
            8,
            runner.max_blocks,
            runner.block_size,
            runner.scratch_block,
            runner.device,
            replay=False,
        )
        # Steps of up to 64 tokens through the mixed steps' buffers; the step that prefills
        # the 70-token prompt is larger and runs eagerly.
        runner.mixed = MixedGraphs(
            runner.model,
            runner.kv_caches,
            64,
            8,
            runner.max_blocks,
            runner.block_size,
            runner.scratch_block,
            PREFILL_BLOCK_M,
            runner.device,
            replay=False,
        )
        runner.profile = []
        return backend

    backend = fast_backend()
    patched = count_patches(backend)
    got = generate(backend)
    kinds = {step["kind"] for step in backend.runner.profile}
    # "lookahead": decode steps launched before the scheduler asked for them; "mixed": steps
    # with prefill chunks, decode rows among them or not
    if async_scheduling:
        assert kinds == {"graph", "mixed", "eager"}, kinds
        assert patched["decode"] > 0 and patched["mixed"] > 0, patched
    else:
        assert kinds == {"graph", "lookahead", "mixed", "eager"}, kinds
        assert patched == {"decode": 0, "mixed": 0}, patched
    mixed = [s for s in backend.runner.profile if s["kind"] == "mixed"]
    assert any(s["seqs"] > 1 for s in mixed) and any(s["seqs"] == 1 for s in mixed)
    assert got == want, (got, want)
    assert any(gemv_calls) and not all(gemv_calls), "the GEMV path, fused and plain, must run"

    backend = fast_backend()
    graphs = backend.runner.graphs
    assert graphs is not None
    launched_ahead: list[bool] = []
    plain_launch = graphs.launch

    def counted_launch(*args: object, **kwargs: object) -> object:
        launched_ahead.append(kwargs.get("ids_from") is not None)
        return plain_launch(*args, **kwargs)  # type: ignore[arg-type]

    graphs.launch = counted_launch  # type: ignore[method-assign]
    got = generate_with_abort(backend)
    assert_same_up_to_the_abort(got, want_abort)
    assert len(got["r1"]) < 12 and len(got["r0"]) == 5  # the abort and the early finish
    served = sum(step["kind"] == "lookahead" for step in backend.runner.profile)
    if not async_scheduling:
        assert 0 < served < sum(launched_ahead), "lookaheads served, and one discarded"


def count_patches(backend: NativeBackend) -> dict[str, int]:
    """Counts of the decode-graph and mixed steps launched with input tokens patched in
    from the step before, kept up to date as the backend runs."""
    counts = {"decode": 0, "mixed": 0}
    runner = backend.runner
    assert runner.graphs is not None and runner.mixed is not None
    decode_launch, mixed_launch = runner.graphs.launch, runner.mixed.launch

    def decode(*args: object, **kwargs: object) -> object:
        counts["decode"] += kwargs.get("patch") is not None
        return decode_launch(*args, **kwargs)  # type: ignore[arg-type]

    def mixed(chunks, layout, prev_tokens=None):  # type: ignore[no-untyped-def]
        counts["mixed"] += any(c.input_from is not None for c in chunks)
        return mixed_launch(chunks, layout, prev_tokens)

    runner.graphs.launch = decode  # type: ignore[method-assign]
    runner.mixed.launch = mixed  # type: ignore[method-assign]
    return counts


def test_static_buffers_match_torch_path_on_cpu(checkpoint) -> None:  # type: ignore[no-untyped-def]
    path = checkpoint("mistral")  # sliding window shorter than the prompts
    # With and without async scheduling, side by side.
    run_in_interpreter(
        __file__, *(f"t.check_static_buffers_on_cpu({str(path)!r}, {mode})"
                    for mode in (True, False)),
        timeout=280)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", ["llama", "mistral"])
def test_graphs_match_eager_on_gpu(variant: str, checkpoint) -> None:  # type: ignore[no-untyped-def]
    path = checkpoint(variant)
    # the references wait for each step, eagerly
    eager = config(path, "cuda", enforce_eager=True, async_scheduling=False)
    want = generate(NativeBackend(eager))
    for async_scheduling in (True, False):
        backend = NativeBackend(config(path, "cuda", async_scheduling=async_scheduling))
        assert backend.runner.graphs is not None
        patched = count_patches(backend)
        backend.runner.profile = []
        got = generate(backend)
        kinds = {s["kind"] for s in backend.runner.profile}
        if async_scheduling:
            assert kinds == {"graph", "mixed"} and patched["decode"] and patched["mixed"]
        else:
            assert kinds == {"graph", "lookahead", "mixed"}
        assert got == want, async_scheduling
    want = generate_with_abort(NativeBackend(eager))
    for async_scheduling in (True, False):
        backend = NativeBackend(config(path, "cuda", async_scheduling=async_scheduling))
        assert_same_up_to_the_abort(generate_with_abort(backend), want)
