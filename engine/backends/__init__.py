"""The generation backends, each an implementation of the core's contract
(engine.core.backend.GenerationBackend): the native paged engine (scheduler and model runner),
the transformers fallback, and echo (no model: measures and smoke-tests everything around the
engine). `create_backend` picks the one a config names.
"""

from __future__ import annotations

from typing import Any

from engine.core.backend import GenerationBackend


def create_backend(config: Any, group: Any = None) -> GenerationBackend:
    """The backend config.backend names (config: an EngineConfig); "auto" takes the native
    one where it supports the checkpoint's architecture, and says which it chose. `group`:
    the ParallelGroup of a sharded model (native backend only)."""
    import logging

    from engine.request import EngineError

    choice = config.backend
    if choice == "auto":
        from engine.backends import native

        choice = "native" if native.supports(config.model_path) else "hf"
        logging.getLogger(__name__).info("backend auto: chose %s for %s", choice,
                                         config.model_path)
    if choice == "native":
        from engine.backends.native import NativeBackend

        return NativeBackend(config, group)
    if group is not None and group.world_size > 1:
        raise EngineError(f"backend {choice!r} cannot shard a model; use the native backend"
                          " (a Llama-family architecture) or gpus_per_worker: 1")
    if choice == "echo":
        from engine.backends.echo import EchoBackend

        return EchoBackend(config)
    from engine.backends.hf import HFBackend

    return HFBackend(config)
