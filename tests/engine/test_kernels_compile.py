"""The decode step's Triton kernels compile for a Hopper GPU (sm_90) with programmatic dependent
launch on, on a machine without one: Triton's own compiler and ptxas, no device.

The interpreter tests run the kernels' arithmetic on the CPU but never compile them, so what
only the compiler rejects (a global that is not a constexpr, a tensor whose shape changes in
a branch) would otherwise first show on the GPU. This also checks that the PDL instructions
are in the code exactly when asked for.
"""

from __future__ import annotations

from typing import Any

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
FLOAT_ARGS = {"eps", "scale_log2"}


def compile_ptx(fn: Any, constexprs: dict[str, Any], pointers: dict[str, str]) -> str:
    """PTX of `fn` for sm_90: pointers bf16 unless named in `pointers`, other runtime
    arguments int32 (float32 for FLOAT_ARGS)."""
    signature: dict[str, str] = {}
    for name, param in zip(fn.arg_names, fn.params, strict=True):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, "*bf16")
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
    missing = {n for n, t in signature.items() if t == "constexpr"} - constexprs.keys()
    assert not missing, f"{fn.__name__}: no value for {missing}"
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    ptx: str = triton.compile(source, target=HOPPER, options={"num_warps": 4}).asm["ptx"]
    return ptx


def kernels() -> list[tuple[str, Any, dict[str, Any], dict[str, str]]]:
    from engine.kernels import all_reduce, argmax, attention, elementwise, gemv

    gemv_kernel = gemv._gemv_kernel
    common = dict(HAS_SCALE=False, HAS_BIAS=True, BLOCK_M=1, BLOCK_N=4, BLOCK_K=1024)
    long_ptrs = {
        "rows_ptr": "*i64", "tables_ptr": "*i64", "lens_ptr": "*i64", "counters_ptr": "*i32",
        "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32",
    }  # fmt: skip
    return [
        ("gemv", gemv_kernel, dict(PROLOGUE=0, HAS_RES=False, **common), {}),
        ("gemv+norm", gemv_kernel, dict(PROLOGUE=1, HAS_RES=True, **common), {}),
        ("gemv+silu", gemv_kernel, dict(PROLOGUE=2, HAS_RES=False, **common), {}),
        ("gemv int8", gemv_kernel, dict(PROLOGUE=0, HAS_RES=False, **{**common, "HAS_SCALE": True}),
         {"w_ptr": "*i8"}),  # fmt: skip
        ("rms_norm", elementwise._rms_norm_kernel, dict(HAS_RES=True, BLOCK=2048), {}),
        ("rotary+cache", elementwise._rotary_cache_kernel,
         dict(NUM_Q=32, NUM_K=8, BLOCK_Q=32, BLOCK_K=8, HALF=32, BLOCK_HALF=32),
         {"pos_ptr": "*i64", "slot_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32"}),
        ("decode attention", attention._decode_kernel,
         dict(BLOCK_SIZE=16, GROUP=4, GROUP_P2=4, BLOCK_G=16, HEAD_DIM=64, BLOCK_D=64,
              BLOCK_N=64, PRECISION="tf32", SPLITS=8, MIN_SPLIT=64), long_ptrs),
        ("decode attention, whole contexts", attention._decode_kernel,
         dict(BLOCK_SIZE=16, GROUP=4, GROUP_P2=4, BLOCK_G=16, HEAD_DIM=64, BLOCK_D=64,
              BLOCK_N=128, PRECISION="tf32", SPLITS=1, MIN_SPLIT=64), long_ptrs),
        ("argmax blocks", argmax._block_max_kernel, dict(BLOCK=2048),
         {"val_ptr": "*fp32", "idx_ptr": "*i64"}),
        ("argmax pick", argmax._pick_kernel, dict(BLOCK_P=64),
         {"val_ptr": "*fp32", "idx_ptr": "*i64", "out_ptr": "*i64"}),
        ("push all-reduce + norm", all_reduce._push_all_reduce_kernel,
         dict(RANK=1, WORLD=2, SLOTS_=all_reduce.SLOTS, SENTINEL=all_reduce.SENTINELS[2],
              BITS=triton.language.int16, BLOCK=4096, NORM=True),
         {"buffers_ptr": "*i64", "state_ptr": "*i32"}),
    ]  # fmt: skip


@pytest.mark.parametrize("index", range(len(kernels())), ids=[k[0] for k in kernels()])
def test_kernel_compiles_for_hopper_with_and_without_pdl(
    index: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Newer Triton warns when this is unset; 1 is what every Triton so far has done.
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    _, fn, constexprs, pointers = kernels()[index]
    with_pdl = compile_ptx(fn, {**constexprs, "USE_PDL": True}, pointers)
    assert "griddepcontrol.wait" in with_pdl and "griddepcontrol.launch_dependents" in with_pdl
    without = compile_ptx(fn, {**constexprs, "USE_PDL": False}, pointers)
    assert "griddepcontrol" not in without
