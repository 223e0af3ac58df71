"""What the engine's loop does when a step raises: the policy, kept apart from the loop.

A step runs many requests together, so its failure says nothing about which one is at fault.
The front (engine/engine.py) aborts every live request, then:

* a generic error: runs each request the step ran alone for one step (a probe). A request
  whose probe raises fails with that error; the others are re-admitted from scratch. A failure
  that only shows after a few decode steps passes every probe, so a request that has been in
  `MAX_STEP_FAILURES` failed steps fails anyway, rather than the loop retrying forever.
* device out of memory: frees the allocator's cache and re-admits every request from scratch;
  a request the device runs out of memory on `MAX_OUT_OF_MEMORY` times fails with advice for
  the operator (the deployment's settings that trade batch size for memory).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from engine.request import EngineError, EngineOutOfMemoryError

# Failed steps a request may be part of before it fails, whatever the probes say.
MAX_STEP_FAILURES = 3
# Out-of-memory errors a request may meet: the first one is retried from a freed cache.
MAX_OUT_OF_MEMORY = 2

# The deployment YAML's keys (tasks/config.py) an operator can turn to fit a model's steps.
OUT_OF_MEMORY_ADVICE = (
    "To fit, lower `batch_size_per_gpu`, use `model.dtype: float16` or `int8`, lower"
    " `engine.kv_cache_memory_fraction` (it leaves more memory for a step's activations) or"
    " `engine.max_num_batched_tokens`, or shard the model over more GPUs (`gpus_per_worker`)."
)


@dataclass(frozen=True)
class StepFailure:
    """A failed step, reduced to what recovery needs. It holds no exception: a traceback keeps
    the failed step's frames, and with them its device tensors, alive."""

    out_of_memory: bool
    detail: str  # "ExceptionType: message"

    @classmethod
    def of(cls, err: BaseException) -> StepFailure:
        # A backend may report out of memory itself (EngineOutOfMemoryError).
        oom = isinstance(err, torch.OutOfMemoryError | EngineOutOfMemoryError)
        return cls(oom, f"{type(err).__name__}: {err}")


def out_of_memory_error(request_id: str, detail: str) -> EngineOutOfMemoryError:
    return EngineOutOfMemoryError(
        f"request {request_id}: the device ran out of memory running it, also after the engine"
        f" freed its cached memory and retried ({detail}). {OUT_OF_MEMORY_ADVICE}"
    )


def repeated_failure_error(request_id: str, failures: int, detail: str) -> EngineError:
    return EngineError(
        f"request {request_id}: {failures} engine steps failed with it in the batch, though it"
        f" ran alone without error; the last failure: {detail}"
    )


def free_device_memory() -> None:
    """Give the allocator's cached blocks back, so that a retried step starts unfragmented.
    The collection first: reference cycles may still hold tensors of the failed step."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
