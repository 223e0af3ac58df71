"""docs/configuration.md is generated from tasks/config.py and must not drift from it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from tasks import config_reference
from tasks.config import CONFIG_ENV, REDIS_URL_ENV, DeploymentConfig
from tasks.config_reference import (
    COMMAND,
    OUTPUT,
    UNDOCUMENTED_ALLOWED,
    UndocumentedField,
    collect_keys,
    render,
)

CONFIG_PY = Path(config_reference.__file__).with_name("config.py")


def leaf_keys(model: type[BaseModel] = DeploymentConfig, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= leaf_keys(annotation, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def test_committed_reference_is_current():
    assert OUTPUT.exists(), f"{OUTPUT} is missing: run `{COMMAND}` to generate it"
    assert OUTPUT.read_text() == render(), (
        f"{OUTPUT} is stale (tasks/config.py changed): run `{COMMAND}` to regenerate it"
    )


def test_every_field_of_every_model_is_documented():
    text = render()
    keys = leaf_keys()
    assert len(keys) > 20
    assert {key.name for key in collect_keys()} == keys
    for key in keys:
        assert f"### `{key}`" in text, key
        assert f"| `{key}` |" in text, key
    for section in ("redis", "model", "engine", "limits"):
        assert f"## `{section}`" in text


def test_types_defaults_bounds_and_comments_come_from_the_code():
    keys = {key.name: key for key in collect_keys()}
    lease = keys["redis.lease_s"]
    assert (lease.type, lease.default, lease.allowed) == ("float", "30.0", "> 0")
    assert lease.meaning.startswith("A running job's lease: its worker renews it")
    assert "#" not in lease.meaning
    dtype = keys["model.dtype"]
    assert dtype.default == '"float32"'
    for value in ("float16", "bfloat16", "int8"):
        assert f'`"{value}"`' in dtype.allowed
    assert keys["engine.kv_cache_memory_fraction"].allowed == "> 0; ≤ 1"
    assert keys["metrics_port"].default == "null"
    assert "horizontal" in keys["model_shard_strategy"].allowed


def test_cross_field_rules_and_environment_are_listed():
    text = render()
    assert "must leave at least one worker for low jobs" in text
    assert "`limits.default_max_tokens`: must not exceed max_output_tokens" in text
    assert f"`{CONFIG_ENV}`" in text and f"`{REDIS_URL_ENV}`" in text


def test_a_field_without_a_comment_fails_the_generator():
    source = CONFIG_PY.read_text()
    comment = "    # The worker's seconds between checks of its job's batch for cancellation.\n"
    assert comment in source
    with pytest.raises(UndocumentedField, match="cancel_poll_s"):
        collect_keys(source.replace(comment, ""))


def test_the_allowance_for_old_undocumented_fields_names_real_keys():
    # Keys that predate the reference may still lack a comment; every other key must have
    # one (collect_keys() above did not raise). The allowance only shrinks.
    assert set(UNDOCUMENTED_ALLOWED).issubset(leaf_keys())
    missing = {k.name for k in collect_keys() if k.meaning == config_reference.NO_COMMENT}
    assert missing <= UNDOCUMENTED_ALLOWED


def test_check_mode_exits_1_on_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    assert config_reference.main(["--check", "--output", str(stale)]) == 1
    assert COMMAND in capsys.readouterr().err
    assert config_reference.main(["--output", str(stale)]) == 0
    assert config_reference.main(["--check", "--output", str(stale)]) == 0
    assert stale.read_text() == render()
