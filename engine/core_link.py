"""The front's side of the link to its engine core: in processes of its own (the default, and
what workers run) or in a thread of this process (tests that hand the engine a ready backend,
debugging). Both carry the same messages (engine/core/engine_core.py), so the front has one
code path.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import queue
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

from engine.backends import create_backend
from engine.checkpoint import require_checkpoint
from engine.config import EngineConfig
from engine.core.backend import GenerationBackend
from engine.core.engine_core import IDLE_WAIT_S, EngineCore, Event, Message, serve
from engine.core_process import free_port, rank_main
from engine.request import EngineError

log = logging.getLogger(__name__)

# Stopping: how long the core may take to leave its loop, then to exit once told to.
_STOP_TIMEOUT_S = 30.0


class CoreGoneError(EngineError):
    """The engine core stopped or died; `reason` says which and why."""


class CoreLink(Protocol):
    tokenizer: Any
    max_model_len: int
    stats: dict[str, Any]

    def send(self, message: Message) -> None:
        """Queue a message for the core; raises CoreGoneError when it is gone."""

    def receive(self, timeout: float) -> list[Event]:
        """The next batch of events ([] after timeout); raises CoreGoneError when the core
        is gone (stopped, or a process of its group died)."""

    def alive(self) -> bool: ...

    def live_stats(self) -> dict[str, Any] | None:
        """The core's counters read now, where that is possible (a core in this process);
        None: the front keeps the last "stats" event instead."""

    def close(self) -> None:
        """Stop the core and wait for it (its live requests are the front's to fail)."""


class ThreadCore:
    """The core loop in a thread of this process, over a backend built here."""

    def __init__(self, backend: GenerationBackend) -> None:
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.max_model_len = backend.max_model_len
        self.core = EngineCore(backend)
        self.stats = self.core.stats()
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue[list[Event]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="tideq-engine-core",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            serve(self.core, self._take, self._outbox.put)
        except BaseException:
            log.exception("engine core loop died")

    def _take(self, timeout: float) -> list[Message]:
        try:
            messages = [self._inbox.get(timeout=timeout) if timeout else
                        self._inbox.get_nowait()]
        except queue.Empty:
            return []
        while True:
            try:
                messages.append(self._inbox.get_nowait())
            except queue.Empty:
                return messages

    def send(self, message: Message) -> None:
        if not self._thread.is_alive():
            raise CoreGoneError("the engine core thread is not running")
        self._inbox.put(message)

    def receive(self, timeout: float) -> list[Event]:
        try:
            return self._outbox.get(timeout=timeout)
        except queue.Empty:
            if not self._thread.is_alive() and self._outbox.empty():
                raise CoreGoneError("the engine core thread stopped") from None
            return []

    def alive(self) -> bool:
        return self._thread.is_alive()

    def live_stats(self) -> dict[str, Any] | None:
        return self.core.stats()

    def close(self) -> None:
        self._inbox.put(("stop",))
        self._thread.join(_STOP_TIMEOUT_S)


class ProcessCore:
    """The core in spawned processes: rank 0 and, for a sharded group, one per further device
    (engine/core_process.py). The front loads the tokenizer itself: it tokenises and
    detokenises; the core sees token ids only."""

    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoTokenizer

        ctx = mp.get_context("spawn")
        world = config.group_size
        port = free_port() if world > 1 else 0
        self._conn, core_end = ctx.Pipe()
        leader_ends: list[Connection] = []
        follower_ends: list[Connection] = []
        for _ in range(world - 1):
            receive_end, send_end = ctx.Pipe(duplex=False)
            follower_ends.append(receive_end)
            leader_ends.append(send_end)
        self.procs = [ctx.Process(target=rank_main, name="tideq-engine-rank0", daemon=True,
                                  args=(config, 0, world, port, core_end, leader_ends, None))]
        for rank in range(1, world):
            self.procs.append(ctx.Process(
                target=rank_main, name=f"tideq-engine-rank{rank}", daemon=True,
                args=(config, rank, world, port, None, [], follower_ends[rank - 1])))
        for proc in self.procs:
            proc.start()
        # Our copies of the children's ends: closed, so that a child's death reads as EOF.
        for end in (core_end, *leader_ends, *follower_ends):
            end.close()
        # Messages for the core, written to its pipe by one sender thread (see send).
        self._outbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="tideq-engine-send",
                                        daemon=True)
        # close() (any thread) and the receiver thread, seeing the processes end, both tear the
        # link down; the second must not close the pipe's descriptor again (EBADF, or worse, a
        # descriptor number already reused).
        self._kill_lock = threading.Lock()
        self._killed = False
        self._gone: str | None = None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(config.model_path)
            self.max_model_len, self.stats = self._wait_ready()
        except BaseException:
            self._kill()
            raise
        self._sender.start()
        log.info("engine core started: %d process(es), pids %s", world,
                 [p.pid for p in self.procs])

    def _wait_ready(self) -> tuple[int, dict[str, Any]]:
        sentinels = [p.sentinel for p in self.procs]
        while True:
            ready = wait([self._conn, *sentinels])
            if self._conn in ready:
                try:
                    message = self._conn.recv()
                except EOFError:
                    message = ("error", self._death_reason(), "")
                if message[0] == "ready":
                    return int(message[1]), dict(message[2])
                raise EngineError(f"the engine core failed to start: {message[1]}")
            raise EngineError(f"the engine core failed to start: {self._death_reason()}")

    def _death_reason(self) -> str:
        dead = [f"{p.name} (pid {p.pid}) exited with {p.exitcode}"
                for p in self.procs if p.exitcode is not None]
        return "; ".join(dead) or "its pipe closed"

    def send(self, message: Message) -> None:
        """Queue the message for the sender thread, which writes whatever has queued up to the
        pipe as one list. A calling thread never waits here: with the task threads each
        writing its own messages under a lock, a `high` request's thread queued for that lock
        behind low ones, each holder needing the GIL back after its write before it let go,
        and a high job reached the core up to 25 ms after its thread handed it over (an H200
        worker under a low flood, TIDEQ_FRONT_TRACE). A message queued as the core dies is
        lost with it: the receiver then fails every live request."""
        if self._gone is not None:
            raise CoreGoneError(self._gone)
        self._outbox.put(message)

    def _send_loop(self) -> None:
        while True:
            batch = [self._outbox.get()]
            while True:
                try:
                    batch.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            try:
                self._conn.send(batch)
            except (OSError, ValueError) as err:  # the core is gone (the receiver tells why)
                log.debug("engine core pipe closed: %s", err)
                return
            if any(message[0] == "stop" for message in batch):
                return

    def receive(self, timeout: float) -> list[Event]:
        if self._gone is not None:
            raise CoreGoneError(self._gone)
        try:
            ready = wait([self._conn, *(p.sentinel for p in self.procs)], timeout)
        except (OSError, ValueError) as err:  # closed by close() meanwhile
            raise CoreGoneError(self._gone or f"the engine core link closed: {err}") from None
        if self._conn in ready:
            try:
                events: list[Event] = self._conn.recv()
                return events
            except (EOFError, OSError):
                pass
        elif not ready:
            return []
        # A process of the group exited (or rank 0's pipe closed): the group is done.
        time.sleep(0.05)  # let the exit codes settle for the message
        self._gone = f"the engine core is gone: {self._death_reason()}"
        self._kill()
        raise CoreGoneError(self._gone)

    def alive(self) -> bool:
        return self._gone is None and all(p.is_alive() for p in self.procs)

    def live_stats(self) -> dict[str, Any] | None:
        return None

    def close(self) -> None:
        if self._gone is None:
            with contextlib.suppress(CoreGoneError):
                self.send(("stop",))
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        self._gone = self._gone or "the engine core was stopped"
        self._kill()

    def _kill(self) -> None:
        with self._kill_lock:
            if self._killed:
                return
            self._killed = True
            for proc in self.procs:
                if proc.is_alive():
                    proc.kill()
            for proc in self.procs:
                proc.join(5)
            self._conn.close()
            self._outbox.put(("stop",))  # wakes the sender, which finds the pipe closed


def open_core(config: EngineConfig, backend: GenerationBackend | None) -> CoreLink:
    """The core the config asks for; a backend given here runs in a thread of this process."""
    if backend is not None:
        return ThreadCore(backend)
    require_checkpoint(config.model_path)
    if config.core == "thread":
        return ThreadCore(create_backend(config))
    return ProcessCore(config)


__all__ = ["IDLE_WAIT_S", "CoreGoneError", "CoreLink", "ProcessCore", "ThreadCore",
           "open_core"]
