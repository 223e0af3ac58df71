"""Worker start-up and shutdown: pin the process to its GPU group before CUDA is touched, build
ONE engine, and hang it (with the job store) on the app for the task threads.

Hooks are `worker_init` / `worker_shutdown`: `worker_process_init` does not fire in the threads
pool, and the engine must exist before the consumer takes its first message. A warm shutdown
finishes every job the worker holds before the engine stops (drain), although the messages of
those jobs were acknowledged when the jobs started.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, bootsteps, signals

from tasks.admission import AdmissionGate
from tasks.config import ConfigError, DeploymentConfig, config_source
from tasks.finishers import FINISHER_THREADS, Finishers
from tasks.front_trace import FrontTrace
from tasks.intake import FollowIntakes, QueueIntake, queue_intakes
from tasks.leases import LeaseKeeper
from tasks.store import JobStore
from tasks.sweeper import Sweeper

log = logging.getLogger(__name__)

# Set by the launcher: the physical GPU ids of this worker's group, e.g. "2,3".
GPUS_ENV = "TIDEQ_GPUS"
# Pools that keep the engine in this process (module names of celery.concurrency). prefork
# would fork after CUDA is initialised.
_POOLS_OK = ("thread", "solo")
# Keys of the deployment's `engine:` section that the engine does not take as they are.
DEPLOYMENT_ONLY_ENGINE_KEYS = {"reserved_high_fraction", "low_fraction_while_high",
                               "low_tokens_while_high"}
# Redis connections beyond one per task thread and finisher (the lease keeper, Celery's own).
_SPARE_CONNECTIONS = 4
# Seconds the finisher threads get to end at shutdown, once the drain is over (or timed out):
# work still in progress then is a store retrying through an outage, left to the lease.
_FINISHERS_STOP_S = 5.0
# How long CPython lets a thread that runs Python code keep the GIL while another waits for it.
# This one process runs the Celery consumer, the task threads, the engine's front thread (which
# unpickles every step's tokens and detokenises finished jobs), the sender and the finishers.
# With CPython's 5 ms default, a thread woken by its socket (the consumer by a new high
# message, a task thread by a Redis reply) waits up to 5 ms behind whichever of them holds the
# GIL, and a high job wakes a thread several times on its way to the engine: under a low flood
# that was most of the 3-15 ms a high job took from Redis to the engine. $TIDEQ_GIL_SWITCH_MS
# overrides it (benchmarks compare).
GIL_SWITCH_INTERVAL_S = 0.0005
GIL_SWITCH_ENV = "TIDEQ_GIL_SWITCH_MS"


@dataclass
class WorkerRuntime:
    """What the task threads share: the config, the engine, the job store, who we are, the
    admission gate (the jobs held), the finisher threads (which store their outcomes) and the
    intakes that stop taking `low` messages while the gate is full (`high` far beyond it)."""

    config: DeploymentConfig
    engine: Any
    store: JobStore
    worker_name: str
    gpu_label: str
    model_name: str
    leases: LeaseKeeper
    gate: AdmissionGate
    finishers: Finishers
    metrics: Any = None
    intakes: tuple[QueueIntake, ...] = ()
    # $TIDEQ_FRONT_TRACE's trace of high messages (tasks/front_trace.py), or None.
    front_trace: FrontTrace | None = None
    # Held while a low message's jobs start (the store's round trip, tokenising, the hand-over
    # to the engine). When a full worker takes `low` again, every task thread takes a low
    # message at once; started side by side under one GIL they all finish late, together,
    # and until one is acknowledged (once its jobs started) kombu has no prefetch slot for a
    # high message: 10-12 ms under a flood. One at a time, the first is acknowledged after
    # its own start, and the next high message is taken then. High messages never take it.
    low_starts: threading.Lock = field(default_factory=threading.Lock)


def pin_gpu_group(config: DeploymentConfig, gpus: str | None = None) -> str:
    """Restrict this process to its GPU group; returns the group's label ("cpu" or "0,1").

    The group is `gpus` (the worker's --gpus option), else $TIDEQ_GPUS (set by the launcher),
    else CUDA_VISIBLE_DEVICES as inherited. Must run before CUDA is initialised: a process sees
    the devices that CUDA_VISIBLE_DEVICES names at that moment, for good.
    """
    if config.num_gpus == 0:
        return "cpu"
    group = gpus or os.environ.get(GPUS_ENV)
    if group:
        torch_mod = sys.modules.get("torch")
        if torch_mod is not None and torch_mod.cuda.is_initialized():
            raise RuntimeError("CUDA was initialised before the worker pinned its GPU group")
        os.environ["CUDA_VISIBLE_DEVICES"] = group
    return os.environ.get("CUDA_VISIBLE_DEVICES", "all")


def engine_config_for(config: DeploymentConfig) -> Any:
    """Map the deployment's settings onto the engine's own.

    The `engine:` section's keys are EngineConfig's own names and pass through as they are
    (tests/tasks/test_deployment_config.py holds the two to the same names and defaults);
    what remains is derived from the deployment's top-level vocabulary."""
    from engine.config import EngineConfig

    reserved = 0
    low_seqs: int | None = None
    low_tokens: int | None = None
    if config.gpu_allocation_strategy == "priority":
        settings = config.engine
        reserved = int(settings.reserved_high_fraction * config.max_num_seqs)
        if settings.low_fraction_while_high < 1:
            low_seqs = max(1, int(settings.low_fraction_while_high * config.max_num_seqs))
        low_tokens = settings.low_tokens_while_high or None
    return EngineConfig(
        **config.engine.model_dump(exclude=DEPLOYMENT_ONLY_ENGINE_KEYS),
        model_path=config.model.path,
        dtype=config.model.dtype,
        max_model_len=config.model.max_model_len,
        backend=config.model.backend,
        device="cpu" if config.num_gpus == 0 else "cuda",
        max_num_seqs=config.max_num_seqs,
        reserved_high_slots=min(reserved, config.max_num_seqs - 1),
        low_seqs_while_high=low_seqs,
        low_tokens_while_high=low_tokens,
        max_prompt_tokens=config.limits.max_prompt_tokens,
        shard_strategy=config.model_shard_strategy,
        group_size=config.gpus_per_worker if config.num_gpus else 1,
        distributed_backend=config.distributed_backend,
    )


def gil_switch_interval(environ: Mapping[str, str] | None = None) -> float:
    """The GIL switch interval a worker runs with, in seconds: GIL_SWITCH_INTERVAL_S, or
    $TIDEQ_GIL_SWITCH_MS (milliseconds, in (0, 1000])."""
    raw = (os.environ if environ is None else environ).get(GIL_SWITCH_ENV, "").strip()
    if not raw:
        return GIL_SWITCH_INTERVAL_S
    try:
        seconds = float(raw) / 1000.0
    except ValueError:
        seconds = -1.0
    if not 0.0 < seconds <= 1.0:
        raise ConfigError(f"${GIL_SWITCH_ENV}: {raw!r} is not a number of milliseconds"
                          " in (0, 1000]")
    return seconds


def set_gil_switch_interval(environ: Mapping[str, str] | None = None) -> float:
    """Set this process's GIL switch interval (gil_switch_interval); returns it in seconds."""
    seconds = gil_switch_interval(environ)
    sys.setswitchinterval(seconds)
    return seconds


def build_runtime(config: DeploymentConfig, worker_name: str,
                  gpus: str | None = None, threads: int | None = None) -> WorkerRuntime:
    """Pin, build the checkpoint if the demo asks for it, load the engine, start the lease
    keeper. `threads`: the task threads actually started (-c overrides num_workers)."""
    set_gil_switch_interval()
    gpu_label = pin_gpu_group(config, gpus)
    import torch

    if config.num_gpus:
        visible = torch.cuda.device_count()
        if visible < config.gpus_per_worker:
            raise ConfigError(
                f"{config_source()}: gpus_per_worker: {config.gpus_per_worker} GPUs per worker"
                f" but this worker sees {visible} (CUDA_VISIBLE_DEVICES={gpu_label})"
            )
    if config.model.build_if_missing:
        from engine.random_checkpoint import ensure_checkpoint

        ensure_checkpoint(config.model.path)
    from engine.checkpoint import checkpoint_problem

    problem = checkpoint_problem(config.model.path)
    if problem is not None:
        raise ConfigError(f"{config_source()}: model.path: {problem}")
    from engine.engine import Engine

    engine = Engine(engine_config_for(config))
    # One pooled connection per task thread and finisher, plus the lease keeper's and a few
    # spare: a thread that finds them all busy waits for one rather than failing its job.
    threads = max(threads or 0, config.num_workers)
    # Each task thread tokenises with a copy of its own: made now, while the worker starts.
    engine.prepare_tokenizers(threads)
    store = JobStore.from_url(config.redis.url, config.redis.result_ttl_s,
                              outage_s=config.redis.outage_s,
                              max_connections=threads + FINISHER_THREADS + _SPARE_CONNECTIONS)
    leases = start_lease_keeper(config, store, engine.cancel, worker_name)
    from tasks.metrics import WorkerMetrics

    gate = AdmissionGate(config.jobs_in_flight_limit)
    intakes = queue_intakes(gate, worker_name)
    metrics = WorkerMetrics(engine, store.client, gpu=bool(config.num_gpus), gate=gate,
                            intakes=intakes)
    if config.metrics_port is not None:
        metrics.serve(config.metrics_port)
    watch_engine(engine, worker_name)
    # The "ready" line is logged at worker_ready (connect_signals): logging is not set up yet.
    return WorkerRuntime(config, engine, store, worker_name, gpu_label,
                         os.path.basename(os.path.normpath(config.model.path)), leases,
                         gate, Finishers(), metrics, intakes, FrontTrace.from_env())


def watch_engine(engine: Any, worker_name: str, interval_s: float = 1.0) -> threading.Thread:
    """End the worker when its engine core dies (a rank process killed, a device fault): a
    worker without an engine must not take jobs. Its running jobs fail back to the sweeper
    (their leases lapse), and the launcher or the service manager starts a new worker."""

    def watch() -> None:
        while engine.is_alive():
            time.sleep(interval_s)
        if engine.stopped:
            return  # shut down on purpose
        log.critical("worker %s: its engine core is gone (%s); stopping the worker, its jobs"
                     " return through the sweeper", worker_name,
                     engine.gone_reason or "see the log above")
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="tideq-engine-watch", daemon=True)
    thread.start()
    return thread


def start_lease_keeper(config: DeploymentConfig, store: JobStore,
                       stop_job: Callable[[str], None], worker_name: str) -> LeaseKeeper:
    """The thread that renews this worker's leases, stops cancelled jobs and sweeps."""
    lease_s = config.redis.lease_s
    sweeper = Sweeper(store, lease_s=lease_s, grace_s=config.redis.sweep_interval_s,
                      owner=worker_name)
    keeper = LeaseKeeper(store, lease_s=lease_s, beat_s=min(config.cancel_poll_s, lease_s / 3),
                         stop_job=stop_job, sweeper=sweeper,
                         sweep_s=config.redis.sweep_interval_s)
    keeper.start()
    return keeper


def connect_signals(app: Celery) -> None:
    def pool_asked(argv: list[str]) -> str | None:
        # Celery takes an explicit `-P prefork` for its default and quietly runs the configured
        # pool (threads) instead, so the command line itself is read to refuse it.
        for i, arg in enumerate(argv):
            if arg in ("-P", "--pool") and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith("--pool="):
                return arg.split("=", 1)[1]
            if arg.startswith("-P") and len(arg) > 2 and not arg.startswith("--"):
                return arg[2:]
        return None

    @signals.worker_init.connect(weak=False)
    def _start(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        pool = getattr(sender, "pool_cls", "")
        pool_name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
        asked = pool_asked(sys.argv)
        if asked is not None and not any(name in asked for name in _POOLS_OK):
            pool_name = asked
        if not any(name in pool_name for name in _POOLS_OK):
            raise SystemExit(
                f"tideq workers run with -P threads (or solo), not {pool_name}: CUDA does not"
                " survive fork, and one process must hold the one engine"
            )
        name = getattr(sender, "hostname", None) or socket.gethostname()
        try:
            gpus = (getattr(sender, "options", None) or {}).get("gpus")
            threads = getattr(sender, "concurrency", None)
            runtime = build_runtime(getattr(app, "tideq_config"), name, gpus,  # noqa: B009
                                    threads if isinstance(threads, int) else None)
            setattr(app, "tideq_runtime", runtime)  # noqa: B010
        except ConfigError as err:
            # A deployment mistake: one line that names the file and the key, no traceback.
            log.error("worker start-up failed: %s", err)
            raise SystemExit(f"tideq worker start-up failed: {err}") from None
        except Exception as err:
            # Celery logs and swallows a signal handler's exception; a worker without an engine
            # must not start consuming, so end the process here with the reason.
            log.exception("worker start-up failed")
            raise SystemExit(f"tideq worker start-up failed: {err}") from err

    @signals.worker_ready.connect(weak=False)
    def _ready(sender: Any = None, **_: Any) -> None:
        # Logged here rather than at worker_init: Celery sets up logging after worker_init,
        # so a line logged there is dropped at any -l level.
        from engine.core_process import freeze_start_up_heap

        runtime = getattr(app, "tideq_runtime", None)
        if runtime is None or getattr(sender, "app", None) is not app:
            return
        config, engine_config = runtime.config, runtime.engine.config
        try:
            stats = runtime.engine.stats()
        except Exception:  # noqa: BLE001 - the summary must not stop the worker
            stats = {}
        try:
            queues = ",".join(q.name for q in sender.task_consumer.queues)
        except AttributeError:
            queues = "?"
        kv = stats.get("kv_blocks_total")
        port = getattr(runtime.metrics, "port", None)
        summary = (
            f"tideq worker {runtime.worker_name} ready: model {config.model.path}"
            f" (backend {stats.get('backend') or engine_config.backend},"
            f" dtype {engine_config.dtype}, max_model_len {engine_config.max_model_len}),"
            f" devices {runtime.gpu_label}, engine max_num_seqs {engine_config.max_num_seqs}"
            f" max_num_batched_tokens {engine_config.max_num_batched_tokens}"
            f" block_size {engine_config.block_size}"
            + (f" kv_blocks {kv}" if kv is not None else "")
            + f", queues {queues}"
            + (f", metrics :{port}/metrics" if port is not None else "")
        )
        events = ("task events are off until a monitor asks for them: Flower turns them on"
                  " when it starts (the banner's 'task events: OFF' is expected)")
        frozen = freeze_start_up_heap()
        log.info("%s; engine stats %s; start-up heap frozen (%d objects)", summary, stats,
                 frozen)
        log.info("%s", events)
        # On stderr at any -l level: what `docker compose logs` shows.
        for line in (summary, events):
            print(line, file=sys.__stderr__, flush=True)

    @signals.worker_shutdown.connect(weak=False)
    def _stop(sender: Any = None, **_: Any) -> None:
        runtime = getattr(app, "tideq_runtime", None)
        if runtime is not None and getattr(sender, "app", None) is app:
            # The task threads have ended by now (warm shutdown); the jobs they started may
            # still run: finish them, then stop the engine, then the leases (renewed until
            # the last job was stored or given up).
            drain(runtime, runtime.config.drain_timeout_s)
            runtime.engine.shutdown()
            runtime.leases.stop()

    app.steps["worker"].add(LetWaitersInOnStop)
    app.steps["consumer"].add(FollowIntakes)


class LetWaitersInOnStop(bootsteps.StartStopStep):
    """Stops with the worker after the consumer (no message comes in any more) and before the
    pool, whose stop waits for every task thread: the threads that wait at the admission gate
    are let through at once instead of waiting for room.

    They run their jobs rather than give their messages back. The engine still runs: it stops
    only after the drain, which finishes these jobs with the others. A message given back
    (Celery's Reject with requeue) goes to the far end of its queue, behind messages enqueued
    after it, where the sweeper's check for vanished messages takes its jobs for lost and
    sends them a second time. Either way nothing is lost; running them keeps each job on one
    path, and what the drain cannot finish in time comes back through its lapsed lease."""

    requires = ("celery.worker.components:Pool",)

    def stop(self, parent: Any) -> None:
        runtime = getattr(parent.app, "tideq_runtime", None)
        if runtime is None:
            return
        waiting = runtime.gate.waiting
        if waiting:
            log.info("worker %s: stopping; the %d messages waiting for room start now",
                     runtime.worker_name, waiting)
        runtime.gate.close()

    def terminate(self, parent: Any) -> None:
        self.stop(parent)


def drain(runtime: WorkerRuntime, timeout_s: float) -> bool:
    """Warm shutdown: wait until no job is in flight and the finishers are idle (at most
    timeout_s seconds), then stop the finishers. Jobs still running then store nothing: their
    leases are no longer renewed once the lease keeper stops, and the sweeper sends them again.
    Returns whether everything was finished."""
    runtime.gate.close()
    deadline = time.monotonic() + timeout_s
    held = runtime.gate.in_flight
    if held:
        log.info("worker %s: finishing the %d jobs it holds before stopping (at most %.0f s)",
                 runtime.worker_name, held, timeout_s)
    finished = (runtime.gate.wait_empty(timeout_s)
                and runtime.finishers.wait_idle(max(0.0, deadline - time.monotonic())))
    if not finished:
        log.warning("worker %s: %d jobs not finished after %.0f s; left to their leases, the"
                    " sweeper sends them again", runtime.worker_name, runtime.gate.in_flight,
                    timeout_s)
    runtime.finishers.stop(_FINISHERS_STOP_S)
    return finished
