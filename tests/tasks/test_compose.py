"""compose.yaml as a deployment: secrets only from .env, start-up gated on health, one pinned
worker per GPU group, Prometheus scraping every worker, every container on the same config.

Renders the file with `docker compose config` where the compose plugin is installed, else
parses it with PyYAML and substitutes the variables the way compose does. No container runs.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tasks.config import load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
APP_DIR = PurePosixPath("/app")  # the image's WORKDIR, where `COPY configs configs` lands

_VAR = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


class MissingVariable(Exception):
    pass


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's substitution: ${VAR}, ${VAR:-default}, ${VAR:?error}, $$ for a literal $."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg")
        current = env.get(name)
        missing = current is None or (current == "" and op is not None and op.startswith(":"))
        if op is not None and op.endswith("?") and missing:
            raise MissingVariable(f"{name}: {arg}")
        if op is not None and op.endswith("-") and missing:
            return arg
        return current or ""

    return _VAR.sub(sub, value)


def _docker_compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
    return [docker, "compose"] if probe.returncode == 0 else None


def render(env: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    """The compose model with `env` as the .env file (raises MissingVariable when compose
    would refuse it)."""
    tool = _docker_compose()
    if tool is not None:
        env_file = tmp_path / "test.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
        proc = subprocess.run(
            [*tool, "-f", str(COMPOSE), "--project-directory", str(ROOT), "--env-file",
             str(env_file), "--profile", "tools", "config", "--format", "json"],
            capture_output=True, text=True, check=False,
            env={"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path)},
        )
        if proc.returncode != 0:
            raise MissingVariable(proc.stderr)
        # compose writes a literal $ back as $$.
        return json.loads(proc.stdout.replace("$$", "$"))
    return _interpolate(yaml.safe_load(COMPOSE.read_text()), env)


@pytest.fixture
def env() -> dict[str, str]:
    return {
        "REDIS_PASSWORD": "redis-" + secrets.token_hex(8),
        "FLOWER_USER": "ops-" + secrets.token_hex(4),
        "FLOWER_PASSWORD": "flower-" + secrets.token_hex(8),
    }


@pytest.fixture
def services(env: dict[str, str], tmp_path: Path) -> dict[str, dict[str, Any]]:
    return render(env, tmp_path)["services"]


def _argv(value: Any) -> list[str]:
    if value is None:
        return []
    return value.split() if isinstance(value, str) else [str(v) for v in value]


def _environment(svc: dict[str, Any]) -> dict[str, str]:
    envs = svc.get("environment") or {}
    if isinstance(envs, list):
        envs = dict(e.split("=", 1) for e in envs)
    return {k: str(v) for k, v in envs.items()}


def _depends_on(svc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):  # short syntax: started, not healthy
        return {d: {"condition": "service_started"} for d in deps}
    return deps


def _is_tideq(svc: dict[str, Any]) -> bool:
    return str(svc.get("image", "")).startswith("tideq")


def _workers(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: svc for name, svc in services.items()
        if _argv(svc.get("command"))[:1] == ["celery"] and "worker" in _argv(svc["command"])
    }


def _option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _tideq_executables() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    scripts, deps = project["scripts"], project["dependencies"]
    assert any(d.startswith(("celery[", "celery>", "celery=")) for d in deps)
    assert any(d.startswith("flower") for d in deps)
    return {"celery", "python", *scripts}


def test_every_command_runs_an_executable_its_image_has(services: dict[str, Any]) -> None:
    expected = {"tideq": _tideq_executables(), "redis": {"redis-server"},
                "prom/prometheus": {"prometheus"}}
    seen = set()
    for name, svc in services.items():
        argv = _argv(svc.get("entrypoint")) or _argv(svc.get("command"))
        assert argv, f"{name}: no command (the image's default is not what runs here)"
        image = str(svc["image"]).split(":")[0]
        assert image in expected, f"{name}: unexpected image {svc['image']}"
        exe = PurePosixPath(argv[0]).name
        assert exe in expected[image], f"{name}: {exe} is not in image {image}"
        seen.add(exe)
        if exe == "celery":
            assert _argv(svc["command"])[1:3] == ["-A", "tasks"], name
    assert {"celery", "producer", "prometheus", "redis-server"} <= seen
    # The image holds what -A tasks and TIDEQ_CONFIG need, under /app.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M)
    for folder in ("tasks", "engine", "producer", "configs"):
        assert re.search(rf"^COPY {folder} {folder}$", dockerfile, re.M), folder


def test_dockerfile_pins_torch_and_drops_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r'^ARG TORCH_SPEC="?torch==2\.13\.0"?$', dockerfile, re.M)
    install = dockerfile.index("${TORCH_SPEC}")
    assert install < dockerfile.index("RUN pip install ."), "torch must come first"
    users = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    ignored = set((ROOT / ".dockerignore").read_text().split())
    for path in (".venv", ".git", ".tideq", ".devbundle", "bench/results", ".env"):
        assert path in ignored, path
    assert "**/__pycache__" in ignored or "__pycache__" in ignored


def test_every_tideq_container_runs_one_existing_config(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TIDEQ_REDIS_URL", raising=False)
    tideq = {name: svc for name, svc in services.items() if _is_tideq(svc)}
    assert {"flower", "producer"} <= set(tideq) and _workers(services)
    configs = {name: _environment(svc).get("TIDEQ_CONFIG") for name, svc in tideq.items()}
    assert None not in configs.values(), f"without TIDEQ_CONFIG: {configs}"
    # Producer limits and Flower's view must be the workers' own.
    assert len(set(configs.values())) == 1, configs
    path = PurePosixPath(next(iter(configs.values())))
    local = ROOT / path.relative_to(APP_DIR)
    assert local.parent == ROOT / "configs" and local.is_file(), path
    config = load_config(local)
    assert config.num_gpus >= 1
    assert config.metrics_port is not None


def test_every_config_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIDEQ_REDIS_URL", raising=False)
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config = load_config(path)
        # GPU deployments serve metrics; the CPU demo stays as it was.
        assert (config.metrics_port is not None) == (config.num_gpus > 0), path.name


def test_passwords_come_only_from_the_env_file(
    services: dict[str, Any], env: dict[str, str]
) -> None:
    text = COMPOSE.read_text()
    # Every Redis URL's password is the variable, never a literal.
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    urls = re.findall(r"rediss?://\S*", code)
    assert urls
    for url in urls:
        assert url.startswith("redis://:${REDIS_PASSWORD:?"), url
    assert re.search(r'"--requirepass", "\$\{REDIS_PASSWORD:\?', text)
    # The placeholders shipped in .env.example are not in the compose file.
    example = dict(
        line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert {"REDIS_PASSWORD", "FLOWER_USER", "FLOWER_PASSWORD"} <= set(example)
    for key in ("REDIS_PASSWORD", "FLOWER_PASSWORD"):
        assert example[key] not in text
    # Rendered: every tideq container reaches Redis with the password, Flower has basic auth.
    for name, svc in services.items():
        if _is_tideq(svc):
            url = _environment(svc)["TIDEQ_REDIS_URL"]
            assert url == f"redis://:{env['REDIS_PASSWORD']}@redis:6379/0", name
    assert env["REDIS_PASSWORD"] in _argv(services["redis"]["command"])
    assert _environment(services["redis"])["REDISCLI_AUTH"] == env["REDIS_PASSWORD"]
    flower = _argv(services["flower"]["command"])
    assert f"--basic-auth={env['FLOWER_USER']}:{env['FLOWER_PASSWORD']}" in flower
    # With auth on, the API needs no FLOWER_UNAUTHENTICATED_API (that would open it to all).
    assert "FLOWER_UNAUTHENTICATED_API" not in _environment(services["flower"])


@pytest.mark.parametrize("missing", ["REDIS_PASSWORD", "FLOWER_PASSWORD"])
def test_a_missing_secret_is_an_error(
    env: dict[str, str], tmp_path: Path, missing: str
) -> None:
    del env[missing]
    with pytest.raises(MissingVariable, match=missing):
        render(env, tmp_path)


def test_redis_is_persistent_and_healthchecked(services: dict[str, Any]) -> None:
    redis = services["redis"]
    argv = _argv(redis["command"])
    assert _option(argv, "--appendonly") == "yes"
    assert _option(argv, "--appendfsync") == "always"
    check = " ".join(_argv(redis["healthcheck"]["test"]))
    assert "redis-cli" in check and "ping" in check


def test_start_up_waits_for_health(services: dict[str, Any]) -> None:
    any_deps = False
    for name, svc in services.items():
        for dep, how in _depends_on(svc).items():
            any_deps = True
            assert how.get("condition") == "service_healthy", f"{name} -> {dep}"
            assert services[dep].get("healthcheck", {}).get("test"), f"{dep}: no healthcheck"
    assert any_deps
    for name, svc in services.items():
        if _is_tideq(svc):
            assert "redis" in _depends_on(svc), name


def test_one_pinned_worker_per_gpu_group(services: dict[str, Any]) -> None:
    workers = _workers(services)
    assert len(workers) >= 2
    gpus: list[str] = []
    indexes, nodes = set(), set()
    for name, svc in workers.items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and "gpu" in devices[0]["capabilities"], name
        gpus += devices[0]["device_ids"]
        index = int(_environment(svc)["TIDEQ_WORKER_INDEX"])
        indexes.add(index)
        argv = _argv(svc["command"])
        node = _option(argv, "-n")
        nodes.add(node)
        assert node == f"gpu{index}@%h", f"{name}: node {node} does not match its index"
        assert _option(argv, "-Q") == "high,low"
        assert svc.get("stop_grace_period"), name
        # The healthcheck pings this worker's own node, which must exist for it to pass.
        check = " ".join(_argv(svc["healthcheck"]["test"]))
        assert "inspect ping" in check, name
        assert "-d gpu${TIDEQ_WORKER_INDEX}@${HOSTNAME}" in check, name
    assert len(gpus) == len(set(gpus)), f"a GPU reserved twice: {gpus}"
    assert indexes == set(range(len(workers))), "worker indexes must be 0..n-1"
    assert len(nodes) == len(workers)


def _duration_s(value: Any) -> float:
    """A compose duration ("5m", "1m30s", "90s") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", str(value))
    assert parts and "".join(n + u for n, u in parts) == str(value), value
    return sum(float(n) * units[u] for n, u in parts)


def test_a_worker_drains_before_compose_kills_it(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SIGTERM a worker waits at most drain_timeout_s for the jobs it holds, then stops its
    engine processes itself: that must end before Docker's stop_grace_period kills it."""
    monkeypatch.delenv("TIDEQ_REDIS_URL", raising=False)
    for name, svc in _workers(services).items():
        path = PurePosixPath(_environment(svc)["TIDEQ_CONFIG"])
        config = load_config(ROOT / path.relative_to(APP_DIR))
        assert config.drain_timeout_s < _duration_s(svc["stop_grace_period"]), name


def _prometheus_config(services: dict[str, Any]) -> dict[str, Any]:
    prom = services["prometheus"]
    config_arg = next(a for a in _argv(prom["command"]) if a.startswith("--config.file="))
    target = config_arg.split("=", 1)[1]
    for volume in prom["volumes"]:
        if isinstance(volume, dict):
            source, dest = volume["source"], volume["target"]
        else:
            source, dest = volume.split(":")[:2]
        if dest == target:
            path = Path(source)
            return yaml.safe_load((path if path.is_absolute() else ROOT / path).read_text())
    raise AssertionError(f"{target} is not mounted into prometheus")


def test_prometheus_scrapes_every_worker(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TIDEQ_REDIS_URL", raising=False)
    scraped = set()
    for job in _prometheus_config(services)["scrape_configs"]:
        for static in job.get("static_configs", []):
            scraped |= set(static["targets"])
    expected = set()
    for name, svc in _workers(services).items():
        environment = _environment(svc)
        config = load_config(ROOT / PurePosixPath(environment["TIDEQ_CONFIG"]).relative_to(APP_DIR))
        assert config.metrics_port is not None, f"{name}: metrics off"
        expected.add(f"{name}:{config.metrics_port + int(environment['TIDEQ_WORKER_INDEX'])}")
    missing = expected - scraped
    assert not missing, f"not scraped: {sorted(missing)}"
    # No target for a worker that does not exist (or on a port it does not serve).
    stale = {t for t in scraped if t.split(":")[0].startswith("worker")} - expected
    assert not stale, f"scraped but no such worker: {sorted(stale)}"
