"""The engine core in processes of its own: rank 0 runs the core loop
(engine/core/engine_core.py) and talks to the front over a pipe; a sharded group has one more
process per further device.

Why processes: the front's Python work (hundreds of task threads, Redis round trips,
detokenising) would otherwise compete with the step loop for one GIL.

A sharded group runs SPMD: every rank builds the same backend over its slice of the model,
and rank 0 replays to every other rank, over a pipe each, exactly the backend calls it makes
(add, abort, step), in order, so that the ranks' schedulers make the same decisions and their
collectives line up. The ranks' own step outputs are dropped; rank 0's are the group's.

A group lives and dies together. Ranks ignore SIGINT/SIGTERM (the front drains and then stops
them) and die with their parent (PR_SET_PDEATHSIG), so a killed worker leaves no process
holding device memory; a rank whose pipe closes exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

from engine.config import EngineConfig
from engine.core.backend import GenerationBackend, StepOutput
from engine.core.collector import FullCollections
from engine.request import SamplingParams

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port free on this host now, for the group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ReplicatedBackend(GenerationBackend):
    """Rank 0's backend in a sharded group: every call is sent to the other ranks, then made
    here. add and abort are buffered and travel with the next step, one message per step."""

    def __init__(self, local: GenerationBackend, followers: list[Connection]) -> None:
        self.local = local
        self.followers = followers
        self.tokenizer = local.tokenizer
        self.eos_token_ids = local.eos_token_ids
        self.max_model_len = local.max_model_len
        self._ops: list[tuple[Any, ...]] = []

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling: SamplingParams, priority: int) -> None:
        # Checked here first: a refusal must not reach the followers, which would admit it.
        self.local.add_request(request_id, prompt_token_ids, sampling, priority)
        self._ops.append(("add", request_id, prompt_token_ids, sampling, priority))

    def abort_request(self, request_id: str) -> None:
        self.local.abort_request(request_id)
        self._ops.append(("abort", request_id))

    def step(self) -> list[StepOutput]:
        self._send("step")
        return self.local.step()

    def drain(self) -> list[StepOutput]:
        self._send("drain")
        return self.local.drain()

    def _send(self, call: str) -> None:
        ops, self._ops = self._ops, []
        ops.append((call,))
        for conn in self.followers:
            conn.send(ops)

    def has_unfinished(self) -> bool:
        return self.local.has_unfinished()

    def last_step_request_ids(self) -> set[str] | None:
        return self.local.last_step_request_ids()

    def stats(self) -> dict[str, Any]:
        return self.local.stats()

    def stop_followers(self) -> None:
        for conn in self.followers:
            with contextlib.suppress(OSError):
                conn.send([("stop",)])


def freeze_start_up_heap() -> int:
    """Take what a process holds once started (the model's modules, the captured graphs, the
    tokenizer; in a worker's front also Celery and its runtime, some 235,000 objects) out of
    the garbage collector's sight, and return how many objects that is. Otherwise every full
    collection walks all of them with the GIL held (0.13 s for a worker's front on a 2-core
    dev machine), and a busy step loop or front makes collections come often. Called once in
    each engine rank process and in each worker's front."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def rank_main(config: EngineConfig, rank: int, world: int, port: int,
              front: Connection | None, followers: list[Connection],
              leader: Connection | None) -> None:
    """Entry point of a rank process (spawned). Rank 0 gets the front's pipe and the pipes to
    every other rank; rank r > 0 gets its pipe from rank 0."""
    _detach_from_signals()
    logging.basicConfig(level=logging.INFO,
                        format=f"[%(asctime)s: %(levelname)s/engine-rank{rank}] %(message)s")
    try:
        backend = _build(config, rank, world, port)
    except BaseException as err:  # noqa: BLE001 - reported to the front, then exit
        detail = "".join(traceback.format_exception(err))
        log.error("engine rank %d failed to start:\n%s", rank, detail)
        if front is not None:
            front.send(("error", f"{type(err).__name__}: {err}", detail))
        sys.exit(1)
    # What exists now (the model's modules, the captured graphs, the tokenizer) lives as long
    # as the process.
    freeze_start_up_heap()
    if hasattr(backend, "collector"):  # the native backend: steps that high work waits on
        backend.collector = FullCollections.install()
    code = 0
    try:
        if rank == 0:
            assert front is not None
            _lead(backend, front, followers)
        else:
            assert leader is not None
            _follow(backend, leader)
    except BaseException:  # noqa: BLE001 - logged; the exit code tells the front
        log.exception("engine rank %d stopped on an error", rank)
        code = 1
    finally:
        # Captured graphs hold the group's communicators: release them before anything tears
        # the group down, then leave without the interpreter's exit hooks (a communicator
        # destroyed at exit would wait on them).
        close = getattr(backend, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                log.exception("engine rank %d: closing the backend failed", rank)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _build(config: EngineConfig, rank: int, world: int, port: int) -> GenerationBackend:
    from engine.backends import create_backend

    if world == 1:
        return create_backend(config)
    import torch
    import torch.distributed as dist

    from engine.distributed import ParallelGroup

    if config.device != "cpu" and torch.cuda.is_available():
        # The worker's CUDA_VISIBLE_DEVICES is its group: rank r drives the r-th device.
        torch.cuda.set_device(rank)
    dist.init_process_group(config.distributed_backend, init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    group = ParallelGroup(rank, world, dist.group.WORLD)
    return create_backend(config, group)


def _lead(backend: GenerationBackend, front: Connection, followers: list[Connection]) -> None:
    from engine.core.engine_core import EngineCore, Message, serve

    replicated = ReplicatedBackend(backend, followers) if followers else None
    core = EngineCore(replicated or backend)
    front.send(("ready", backend.max_model_len, core.stats()))

    def receive(timeout: float) -> list[Message]:
        # The front writes lists of messages (engine/core_link.py, ProcessCore.send).
        messages: list[Message] = []
        if not front.poll(timeout):
            return messages
        while True:
            try:
                messages.extend(front.recv())
            except EOFError:  # the front is gone
                return [("stop",)]
            if not front.poll(0):
                return messages

    def emit(events: list[Any]) -> None:
        front.send(events)

    try:
        serve(core, receive, emit)
    finally:
        if replicated is not None:
            replicated.stop_followers()


def _follow(backend: GenerationBackend, leader: Connection) -> None:
    """Replay rank 0's calls. A call that raises here raised on rank 0 as well (the ranks
    compute the same thing), and rank 0's recovery replays its own calls next."""
    while True:
        try:
            ops = leader.recv()
        except EOFError:
            return
        for op in ops:
            kind = op[0]
            try:
                if kind == "add":
                    backend.add_request(op[1], op[2], op[3], op[4])
                elif kind == "abort":
                    backend.abort_request(op[1])
                elif kind == "step":
                    backend.step()
                elif kind == "drain":
                    backend.drain()
                elif kind == "stop":
                    return
            except Exception:
                log.exception("engine rank: %s failed (rank 0 recovers the step)", kind)


def _detach_from_signals() -> None:
    """Leave SIGINT/SIGTERM to the front, which drains its jobs before stopping the core; die
    with the parent process, whatever kills it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:
            pass
        if os.getppid() == 1:  # the parent died before the line above took effect
            os._exit(1)
