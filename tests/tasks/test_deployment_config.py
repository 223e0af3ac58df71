"""The deployment config: errors name the file, the key and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import EngineConfig
from tasks.config import ConfigError, DeploymentConfig, load_config, parse_config
from tasks.launch import main as launch_main
from tasks.launch import plan_workers
from tasks.worker import engine_config_for

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deploy.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    load_config(REPO / "configs" / name)


def test_the_shipped_gpu_configs_give_their_engines_the_measured_lane():
    # The README's W-priority figures come from configs/gpu-1x.yaml run with `priority`: 66 of
    # 256 slots and 512 tokens a step for low work while high work is present, 64 slots
    # reserved. `even` (the file as shipped, W-system) must not read the lane; each worker of
    # gpu-4x-priority is that same measured deployment.
    one = load_config(REPO / "configs" / "gpu-1x.yaml")
    as_shipped = engine_config_for(one)
    assert (as_shipped.low_seqs_while_high, as_shipped.low_tokens_while_high) == (None, None)
    measured = one.model_copy(update={"gpu_allocation_strategy": "priority"})
    priority = engine_config_for(measured)
    assert (priority.max_num_seqs, priority.reserved_high_slots, priority.low_seqs_while_high,
            priority.low_tokens_while_high) == (256, 64, 66, 512)
    four_config = load_config(REPO / "configs" / "gpu-4x-priority.yaml")
    assert engine_config_for(four_config) == priority
    assert four_config.model_dump(exclude={"num_gpus", "metrics_port"}) == measured.model_dump(
        exclude={"num_gpus", "metrics_port"})
    assert four_config.num_worker_groups == 4


def test_defaults_equal_the_default_yaml():
    # The CPU demo names gloo (no NCCL without GPUs); every other value is the default, the
    # model path resolved against the file's folder as every relative path in a config is.
    default = DeploymentConfig()
    model = default.model.model_copy(update={"path": str(REPO / default.model.path)})
    expected = default.model_copy(update={"distributed_backend": "gloo", "model": model})
    assert load_config(REPO / "configs" / "default.yaml") == expected


def test_max_jobs_in_flight_defaults_to_twice_the_engine_s_batch():
    assert parse_config({"batch_size_per_gpu": 8}).jobs_in_flight_limit == 16
    sharded = parse_config({"num_gpus": 4, "gpus_per_worker": 2, "batch_size_per_gpu": 64,
                            "model_shard_strategy": "tensor"})
    assert sharded.max_num_seqs == 128 and sharded.jobs_in_flight_limit == 256
    assert parse_config({"max_jobs_in_flight": 5}).jobs_in_flight_limit == 5
    with pytest.raises(ConfigError, match="max_jobs_in_flight: Input should be greater"):
        parse_config({"max_jobs_in_flight": 0})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("num_gpuz: 2\n", "deploy.yaml: num_gpuz: Extra inputs are not permitted"),
        ("model:\n  dtyp: float16\n", "deploy.yaml: model.dtyp: Extra inputs are not permitted"),
        ("num_gpus: two\n", "deploy.yaml: num_gpus: Input should be a valid integer"),
        ("model:\n  dtype: int4\n", "deploy.yaml: model.dtype: Input should be 'float32'"),
        ("batch_size_per_gpu: 0\n", "deploy.yaml: batch_size_per_gpu: Input should be greater"),
        ("num_gpus: 3\ngpus_per_worker: 2\nmodel_shard_strategy: tensor\n",
         "deploy.yaml: num_gpus: 3 is not divisible by gpus_per_worker (2)"),
        ("num_gpus: 2\ngpus_per_worker: 2\n",
         "deploy.yaml: model_shard_strategy: gpus_per_worker > 1 needs tensor or layer"),
        ("high_only_workers: 1\n",
         "deploy.yaml: high_only_workers: needs gpu_allocation_strategy: priority"),
        ("limits:\n  default_max_tokens: 500\n  max_output_tokens: 100\n",
         "deploy.yaml: limits.default_max_tokens: must not exceed max_output_tokens"),
        ("- a\n- b\n", "deploy.yaml: the top level must be a mapping"),
        ("num_gpus: [\n", "deploy.yaml: invalid YAML"),
    ],
)
def test_bad_configs_name_file_key_and_reason(tmp_path, text, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert expected in str(err.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_more_gpus_than_present_is_an_error(tmp_path):
    config = load_config(write(tmp_path, "num_gpus: 8\n"))
    with pytest.raises(ConfigError, match="num_gpus: 8 GPUs requested but 2 present"):
        config.check_hardware(2, "deploy.yaml")
    # The launcher refuses too, with the same message, before starting anything.
    assert launch_main(["--config", str(tmp_path / "deploy.yaml"), "--dry-run"]) == 2


def test_environment_chooses_config_and_redis(tmp_path, monkeypatch):
    path = write(tmp_path, "num_workers: 3\nredis:\n  url: redis://h:1/0\n")
    monkeypatch.setenv("TIDEQ_CONFIG", str(path))
    assert load_config().num_workers == 3
    assert load_config().redis.url == "redis://h:1/0"
    monkeypatch.setenv("TIDEQ_REDIS_URL", "redis://other:2/5")
    assert load_config().redis.url == "redis://other:2/5"


def test_seed_aliases_and_derived_sizes(tmp_path):
    config = load_config(write(tmp_path, (
        "num_gpus: 4\ngpus_per_worker: 2\nmodel_shard_strategy: horizontal\n"
        "batch_size_per_gpu: 16\ngpu_allocation_strategy: priority\nhigh_only_workers: 1\n"
        "engine:\n  reserved_high_fraction: 0.25\n  decode_lookahead: false\n"
    )))
    assert config.model_shard_strategy == "tensor"
    assert config.num_worker_groups == 2
    assert config.max_num_seqs == 32
    engine_config = engine_config_for(config)
    assert engine_config.max_num_seqs == 32 and engine_config.reserved_high_slots == 8
    assert engine_config.group_size == 2 and engine_config.device == "cuda"
    assert engine_config.decode_lookahead is False and EngineConfig("m").decode_lookahead


def test_launcher_pins_each_group_and_reserves_high_only_workers(tmp_path):
    config = load_config(write(tmp_path, (
        "num_gpus: 4\ngpu_allocation_strategy: priority\nhigh_only_workers: 1\n"
    )))
    plan = plan_workers(config)
    assert [w.gpus for w in plan] == [[0], [1], [2], [3]]
    assert [w.queues for w in plan] == [("high",), ("high", "low"), ("high", "low"),
                                        ("high", "low")]
    env = plan[2].env("x.yaml")
    assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["TIDEQ_CONFIG"] == "x.yaml"
    command = plan[0].command(32, "info")
    assert command[command.index("-Q") + 1] == "high"
    assert command[command.index("-P") + 1] == "threads"


def test_worker_pins_its_group_before_cuda(monkeypatch, tmp_path):
    from tasks.worker import pin_gpu_group

    config = load_config(write(tmp_path, "num_gpus: 4\n"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setenv("TIDEQ_GPUS", "3")
    assert pin_gpu_group(config) == "3"
    assert pin_gpu_group(config, gpus="1,2") == "1,2"  # the worker's --gpus wins
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1,2"
    assert pin_gpu_group(DeploymentConfig()) == "cpu"


def test_celery_worker_accepts_gpus_option():
    from tasks.app import app

    option_names = {name for opt in app.user_options["worker"] for name in opt.opts}
    assert "--gpus" in option_names


def test_redelivery_settings_reach_the_broker_channel(tmp_path, redis_url):
    """kombu's Redis channel sweeps for unacknowledged messages with our settings; in
    particular a worker killed mid-sweep blocks redelivery for restore_lock_expire_s, not
    kombu's default 300 s."""
    from tasks.app import create_app

    config = load_config(write(tmp_path, (
        f"redis:\n  url: {redis_url}\n  visibility_timeout_s: 7\n  restore_interval_s: 1\n"
        "  restore_lock_expire_s: 4\n"
    )))
    with create_app(config).connection_for_write() as connection:
        channel = connection.default_channel
        assert channel.unacked_mutex_expire == 4
        assert channel.visibility_timeout == 7
        assert channel.unacked_restore_throttle == 1


def test_the_engine_section_is_the_engine_s_own_settings():
    """One source of truth: every key of the deployment's `engine:` section is an EngineConfig
    field of the same name and default, passed through as it is (no hand-kept copy)."""
    import dataclasses

    from tasks.config import EngineSettings
    from tasks.worker import DEPLOYMENT_ONLY_ENGINE_KEYS

    engine_fields = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    for name, field in EngineSettings.model_fields.items():
        if name in DEPLOYMENT_ONLY_ENGINE_KEYS:
            continue
        assert name in engine_fields, name
        assert field.default == engine_fields[name], name
    changed = {"max_num_batched_tokens": 4096, "block_size": 32, "num_kv_blocks": 99,
               "kv_cache_memory_fraction": 0.5, "enforce_eager": True,
               "decode_lookahead": False, "enable_prefix_caching": False,
               "custom_all_reduce": False, "mixed_step_graphs": False,
               "async_scheduling": False, "lane_linger_steps": 5}
    assert set(changed) == set(EngineSettings.model_fields) - DEPLOYMENT_ONLY_ENGINE_KEYS
    engine_config = engine_config_for(parse_config({"engine": changed}))
    for name, value in changed.items():
        assert getattr(engine_config, name) == value, name


def test_a_relative_model_path_starts_at_the_config_file_s_folder(tmp_path, monkeypatch):
    (tmp_path / "deploy").mkdir()
    path = tmp_path / "deploy" / "x.yaml"
    path.write_text("model:\n  path: ../models/m\n")
    monkeypatch.chdir("/")
    assert load_config(path).model.path == str(tmp_path / "models" / "m")
    path.write_text("model:\n  path: /abs/m\n")
    assert load_config(path).model.path == "/abs/m"


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "is not a folder"),
    ("hub", "looks like a hub id"),
    ("no_config", "has no config.json"),
    ("no_weights", "has no \\*.safetensors weights"),
    ("no_tokenizer", "has no tokenizer"),
])
def test_a_bad_model_folder_is_one_line_naming_the_key(tmp_path, monkeypatch, setup, message):
    from tasks.worker import build_runtime

    folder = tmp_path / "model"
    if setup != "missing":
        folder.mkdir()
    if setup in ("no_weights", "no_tokenizer"):
        (folder / "config.json").write_text("{}")
    if setup == "no_tokenizer":
        (folder / "model.safetensors").write_bytes(b"")
    model_path = "meta-llama/Llama-3.2-1B" if setup == "hub" else str(folder)
    monkeypatch.chdir(tmp_path)
    config = parse_config({"model": {"path": model_path, "build_if_missing": False}})
    with pytest.raises(ConfigError, match=f"model.path: .*{message}") as info:
        build_runtime(config, "w@test")
    assert "\n" not in str(info.value)


def test_the_priority_strategy_holds_slots_and_on_request_a_fast_lane_for_high_jobs():
    base = {"num_gpus": 0, "batch_size_per_gpu": 64}
    even = engine_config_for(parse_config(base))
    assert (even.reserved_high_slots, even.low_seqs_while_high,
            even.low_tokens_while_high) == (0, None, None)
    priority = engine_config_for(parse_config({**base, "gpu_allocation_strategy": "priority"}))
    assert (priority.reserved_high_slots, priority.low_seqs_while_high,
            priority.low_tokens_while_high) == (16, None, None)
    lane = engine_config_for(parse_config({
        **base, "gpu_allocation_strategy": "priority",
        "engine": {"low_fraction_while_high": 0.25, "low_tokens_while_high": 512}}))
    assert (lane.low_seqs_while_high, lane.low_tokens_while_high) == (16, 512)
    even_lane = engine_config_for(parse_config({
        **base, "engine": {"low_fraction_while_high": 0.25, "low_tokens_while_high": 512}}))
    assert (even_lane.low_seqs_while_high, even_lane.low_tokens_while_high) == (None, None)
