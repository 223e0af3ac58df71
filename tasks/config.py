"""The deployment configuration: one YAML file, validated by pydantic.

Chosen by `--config`, else the environment variable TIDEQ_CONFIG, else the built-in defaults
(the CPU demo, the same as configs/default.yaml). TIDEQ_REDIS_URL overrides the Redis URL.
Imports no torch: the producer reads this too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_ENV = "TIDEQ_CONFIG"
REDIS_URL_ENV = "TIDEQ_REDIS_URL"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file, the key and why."""


class _Strict(BaseModel):
    # A misspelled key must be an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", frozen=True)


class RedisSettings(_Strict):
    # The Redis of the queues and the job records (redis://, or rediss:// for TLS; a password
    # goes in the URL: redis://:PASSWORD@host:6379/0). TIDEQ_REDIS_URL overrides it.
    url: str = "redis://127.0.0.1:6379/0"
    # How long job records and results stay in Redis after they were last written (7 days:
    # long enough to collect the results of a weekend's batch).
    result_ttl_s: int = Field(default=7 * 24 * 3600, gt=0)
    # kombu's own redelivery of a message taken but not acknowledged, after this long. The
    # leases and the sweeper redeliver a dead worker's jobs much sooner; this stays as a
    # backstop (a second message for a job that is running or done is skipped).
    visibility_timeout_s: int = Field(default=3600, gt=0)
    # Seconds between a worker's sweeps for messages past their visibility timeout.
    restore_interval_s: int = Field(default=10, gt=0)
    # A sweep holds a Redis lock so that workers take turns. A worker killed mid-sweep leaves
    # it held this long, and no worker redelivers anything until it expires (kombu's own default
    # is 300 s). A sweep itself takes milliseconds, and restoring a message is a transaction, so
    # a short expiry cannot deliver a message twice.
    restore_lock_expire_s: int = Field(default=10, gt=0)
    # A running job's lease: its worker renews it every lease_s / 3 seconds. When a worker
    # dies, the sweeper puts its jobs back in their queues once their leases lapse, so a
    # killed worker's jobs are back in their queue within about lease_s + sweep_interval_s.
    lease_s: float = Field(default=30.0, gt=0)
    # Seconds between sweeps (one worker at a time sweeps, under a Redis lock). A message that
    # vanished between Redis and a worker is re-sent after two sweeps have missed it.
    sweep_interval_s: float = Field(default=10.0, gt=0)
    # How long a worker's Redis commands are retried through an outage (a restart) before the
    # job is left to the sweeper. Longer than lease_s would only delay that.
    outage_s: float = Field(default=60.0, gt=0)
    # Publish each running job's text as it is generated to the Redis stream
    # tideq:stream:<job_id> (read by `producer tail`); off: no stream is written and the
    # engine does no extra decoding. The final result is stored the same either way.
    stream_tokens: bool = False


class ModelSettings(_Strict):
    # A Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer files).
    path: str = ".tideq/models/tiny-llama"
    # Build a small random checkpoint there when the folder is empty (the demo's default).
    build_if_missing: bool = True
    # Weights and activations; int8 is weight-only (bfloat16 activations, native backend).
    # float16/bfloat16 halve the memory of float32; int8 halves it again for the weights.
    dtype: Literal["float32", "float16", "bfloat16", "int8"] = "float32"
    # Longest prompt + output a sequence may hold (capped at the model's own positions).
    max_model_len: int = Field(default=1024, ge=2)
    # "echo" answers every job at once with its prompt's start, no model loaded: for
    # measuring the queue path (bench/bench_queue.py) and smoke-testing a deployment.
    backend: Literal["auto", "native", "hf", "echo"] = "auto"


class EngineSettings(_Strict):
    # Tokens one engine step may process; longer prompts are prefilled in chunks.
    max_num_batched_tokens: int = Field(default=2048, ge=16)
    # Tokens per KV-cache block (the unit of cache allocation and of prefix sharing).
    block_size: int = Field(default=16, ge=1)
    # Share of the device memory left after the weights that the KV cache takes (GPU);
    # lower it to leave more room for a step's activations.
    kv_cache_memory_fraction: float = Field(default=0.9, gt=0, le=1)
    # An explicit KV-cache size in blocks, overriding the fraction (None: from the fraction
    # on a GPU, enough for batch_size_per_gpu full sequences on the CPU).
    num_kv_blocks: int | None = Field(default=None, ge=1)
    # With gpu_allocation_strategy "priority": share of each engine's running slots that only
    # high-priority jobs may take.
    reserved_high_fraction: float = Field(default=0.25, ge=0, lt=1)
    # With gpu_allocation_strategy "priority": while a high job runs or waits, low jobs
    # compute in at most this share of the running slots each step (the others keep their
    # place and sit the step out; a high job that finds every slot taken preempts one of
    # them); 1: no limit. Off by default; the shipped GPU configs set 0.26: on an H200 (1b,
    # batch 256) 0.26 with 512 tokens held a high job to 1.87x its idle latency (p50; p99
    # 1.88-1.93x, against 5.2-5.3x with `even`) and kept low at 0.62 of `even` (README,
    # Benchmarks). A wider lane gives low more and high less.
    low_fraction_while_high: float = Field(default=1.0, gt=0, le=1)
    # With "priority": tokens low jobs may compute in one step while high work is present;
    # 0: no limit.
    low_tokens_while_high: int = Field(default=0, ge=0)
    # With the two above: steps their limits still hold after the last high job has left, so
    # that a stream of high jobs does not meet a step of a whole budget of low prompts (~28 ms
    # at 8192 tokens on an H200) between two of them; ~0.1 s of lane steps at the default.
    lane_linger_steps: int = Field(default=64, ge=0)
    # No CUDA graphs or Triton kernels: plain PyTorch steps (debugging, comparisons).
    enforce_eager: bool = False
    # GPU: launch a greedy decode step's successor while the host reads its tokens (the
    # engine's decode_lookahead); off only to compare or debug.
    decode_lookahead: bool = True
    # Launch each step before the one ahead of it has finished, its input tokens taken on the
    # device, so that the host's scheduling overlaps the device's work (the engine's
    # async_scheduling); off only to compare or debug.
    async_scheduling: bool = True
    # Keep computed KV blocks so that prompts sharing a prefix compute it once (greedy
    # outputs are unchanged; off only to compare).
    enable_prefix_caching: bool = True
    # GPU: steps that prefill replay CUDA graphs captured at padded token counts (the
    # engine's mixed_step_graphs); off only to compare or debug.
    mixed_step_graphs: bool = True
    # With model_shard_strategy tensor on GPUs: a decode step's small all-reduces are pushed
    # into the peers' buffers over symmetric memory (NVLink peer writes; the residual add and
    # norm after the attention block in the same kernel) instead of going to NCCL; off only
    # to compare or debug.
    custom_all_reduce: bool = True


class LimitSettings(_Strict):
    # Longest prompt a job may have, in tokens; longer ones fail as invalid requests.
    max_prompt_tokens: int = Field(default=768, ge=1)
    # Largest max_tokens a job may ask for; the producer refuses more at submit.
    max_output_tokens: int = Field(default=256, ge=1)
    # max_tokens of a job that gives none (OpenAI's completions default is 16; chat jobs
    # usually want more).
    default_max_tokens: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _default_within_max(self) -> LimitSettings:
        if self.default_max_tokens > self.max_output_tokens:
            raise ValueError("default_max_tokens: must not exceed max_output_tokens")
        return self


ShardStrategy = Literal["none", "tensor", "layer"]
_SHARD_ALIASES = {"horizontal": "tensor", "vertical": "layer"}


class DeploymentConfig(_Strict):
    """One deployment. The top-level names are those of the multi-GPU vLLM deployment guide."""

    redis: RedisSettings = RedisSettings()
    model: ModelSettings = ModelSettings()
    engine: EngineSettings = EngineSettings()
    limits: LimitSettings = LimitSettings()

    # GPUs this deployment may use; 0 runs one worker on the CPU.
    num_gpus: int = Field(default=0, ge=0)
    # GPUs of one sharded model group (one worker process, one model replica).
    gpus_per_worker: int = Field(default=1, ge=1)
    # How a group shards its model: tensor (alias horizontal: every layer split over the
    # group's GPUs), layer (alias vertical: consecutive layers per GPU), none (one GPU).
    model_shard_strategy: ShardStrategy = "none"
    # The collectives of a sharded group: nccl on GPUs, gloo on the CPU.
    distributed_backend: Literal["nccl", "gloo"] = "nccl"
    # Sequences a GPU runs at once; the engine runs batch_size_per_gpu x gpus_per_worker.
    batch_size_per_gpu: int = Field(default=32, ge=1)
    # even: every group serves both queues. priority: capacity is held for high (see
    # high_only_workers and engine.reserved_high_fraction).
    gpu_allocation_strategy: Literal["even", "priority"] = "even"
    # With "priority": how many worker groups consume only the high queue.
    high_only_workers: int = Field(default=0, ge=0)
    # Task threads per worker process: the intake. A thread takes a message, starts its jobs,
    # hands them to the engine and takes the next message (finisher threads store the
    # outcomes); a low message waits in its thread while the worker is at max_jobs_in_flight.
    # So these bound only the messages a worker has taken and not started yet, never the
    # jobs it runs, and a few dozen are plenty whatever the batch.
    num_workers: int = Field(default=32, ge=1)
    # Jobs the producer puts in one Celery message. Each job is still started, leased,
    # cancelled, retried and stored on its own; a message of several costs the consumer,
    # Celery and Redis one round of work instead of several. 1: a message per job.
    jobs_per_message: int = Field(default=1, ge=1, le=256)
    # Jobs one worker holds at once (started and not yet stored). A low message waits before
    # starting its jobs while the worker holds this many (they stay queued in Redis, where
    # their state says so); a high message never waits. The full worker also stops taking
    # low messages, until a quarter of this is free again. null: twice the engine's batch
    # (batch_size_per_gpu x gpus_per_worker), so the next jobs already wait inside the engine
    # and a finished sequence's slot is refilled in the step it frees.
    max_jobs_in_flight: int | None = Field(default=None, ge=1)
    # Warm shutdown (SIGTERM): seconds a worker waits for the jobs it holds to finish and be
    # stored before it stops its engine. Jobs still running then are left to their leases,
    # which lapse, and the sweeper sends them again. Under compose's stop_grace_period (5m),
    # so the worker stops its engine processes itself before it is killed.
    drain_timeout_s: float = Field(default=240.0, gt=0)

    # Serve Prometheus metrics from each worker on this port (+ its group index); None: off.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)

    # The worker's seconds between checks of its job's batch for cancellation.
    cancel_poll_s: float = Field(default=0.5, gt=0)

    @field_validator("model_shard_strategy", mode="before")
    @classmethod
    def _alias_shard(cls, value: Any) -> Any:
        return _SHARD_ALIASES.get(value, value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> DeploymentConfig:
        if self.num_gpus and self.num_gpus % self.gpus_per_worker:
            raise ValueError(
                f"num_gpus: {self.num_gpus} is not divisible by gpus_per_worker"
                f" ({self.gpus_per_worker})"
            )
        if self.gpus_per_worker > 1 and self.model_shard_strategy == "none":
            raise ValueError(
                "model_shard_strategy: gpus_per_worker > 1 needs tensor or layer, not none"
            )
        if self.high_only_workers and self.gpu_allocation_strategy != "priority":
            raise ValueError("high_only_workers: needs gpu_allocation_strategy: priority")
        if self.high_only_workers and self.high_only_workers >= max(self.num_worker_groups, 1):
            raise ValueError("high_only_workers: must leave at least one worker for low jobs")
        if self.limits.max_prompt_tokens + 1 > self.model.max_model_len:
            raise ValueError("limits.max_prompt_tokens: must be below model.max_model_len")
        return self

    @property
    def num_worker_groups(self) -> int:
        return self.num_gpus // self.gpus_per_worker if self.num_gpus else 1

    @property
    def max_num_seqs(self) -> int:
        return self.batch_size_per_gpu * (self.gpus_per_worker if self.num_gpus else 1)

    @property
    def jobs_in_flight_limit(self) -> int:
        """max_jobs_in_flight, or twice the engine's batch when unset (README: "Why the GPU
        configs hold twice their batch")."""
        return self.max_jobs_in_flight or 2 * self.max_num_seqs

    def check_hardware(self, gpus_present: int, source: str = "<config>") -> None:
        """Raise ConfigError if this deployment asks for more GPUs than the machine has."""
        if self.num_gpus > gpus_present:
            raise ConfigError(
                f"{source}: num_gpus: {self.num_gpus} GPUs requested but {gpus_present} present"
            )


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "value_error":
            # A cross-field check: its message starts with the key it is about.
            msg = msg.removeprefix("Value error, ")
            key = f"{key}.{msg}" if key else msg
            lines.append(f"{source}: {key}")
        else:
            lines.append(f"{source}: {key or '<top level>'}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, Any] | None, source: str = "<config>") -> DeploymentConfig:
    """Validate a mapping; errors name the source, each bad key and the reason."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, not {type(data).__name__}")
    try:
        config = DeploymentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None
    return config


def load_config(path: str | os.PathLike[str] | None = None) -> DeploymentConfig:
    """Load the deployment config: `path`, else $TIDEQ_CONFIG, else the built-in defaults.

    $TIDEQ_REDIS_URL, when set, replaces redis.url.
    """
    path = path or os.environ.get(CONFIG_ENV) or None
    if path is None:
        config = DeploymentConfig()
    else:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"{source}: cannot read config: {err.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{source}: invalid YAML: {err}") from None
        config = parse_config(data, source)
        config = _resolve_paths(config, Path(path).resolve().parent)
    url = os.environ.get(REDIS_URL_ENV)
    if url:
        config = config.model_copy(update={"redis": config.redis.model_copy(update={"url": url})})
    return config


def _resolve_paths(config: DeploymentConfig, base: Path) -> DeploymentConfig:
    """A relative model.path names a folder relative to the config file's own folder, so a
    config works from whatever directory a worker is started in."""
    model_path = Path(config.model.path).expanduser()
    if model_path.is_absolute():
        return config
    resolved = str((base / model_path).resolve())
    return config.model_copy(update={"model": config.model.model_copy(update={"path": resolved})})


def config_source(path: str | os.PathLike[str] | None = None) -> str:
    """Where load_config(path) reads from, for messages."""
    return str(path or os.environ.get(CONFIG_ENV) or "<built-in defaults>")
