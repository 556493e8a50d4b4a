"""Static checks of docker/: no Docker engine runs here, so the compose file is checked as data."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
PACKAGES = ("worker", "api_client", "schemas", "migrations")
TOP_LEVEL_KEYS = {"name", "services", "volumes", "networks", "configs", "secrets"}
RESTART_POLICIES = {"no", "always", "on-failure", "unless-stopped"}
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _split_volume(spec: str) -> tuple[str, str, str]:
    """``source:target[:mode]`` where the source may itself contain ``:`` (``${VAR:?message}``)."""
    mode = ""
    if spec.endswith((":ro", ":rw")):
        spec, mode = spec[:-3], spec[-2:]
    source, _, target = spec.rpartition(":")
    return source, target, mode


def _python_sources() -> str:
    return "\n".join(path.read_text() for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def test_top_level_is_well_formed(compose: dict[str, Any]) -> None:
    unknown = {key for key in compose if key not in TOP_LEVEL_KEYS and not key.startswith("x-")}
    assert not unknown, f"unknown top-level keys: {unknown}"
    assert compose["services"], "no services"


def test_every_service_is_well_formed(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        where = f"service {name!r}"
        assert "image" in service or "build" in service, f"{where} has neither image nor build"
        if "build" in service:
            context = (DOCKER / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), f"{where}: Dockerfile missing"
        for key in ("command", "entrypoint"):
            if key in service:
                assert isinstance(service[key], list) and all(isinstance(a, str) for a in service[key]), where
        environment = service.get("environment", {})
        assert isinstance(environment, dict), f"{where}: environment must be a mapping"
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in environment.items()), (
            f"{where}: environment values must be strings (quote booleans and numbers)"
        )
        for volume in service.get("volumes", []):
            source, target, _mode = _split_volume(volume)
            assert target.startswith("/"), f"{where}: volume target {target!r} must be absolute"
            if not source.startswith(("/", ".", "$")):
                assert source in declared_volumes, f"{where}: named volume {source!r} is not declared"
        for dependency, spec in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{where} depends on unknown service {dependency!r}"
            assert spec["condition"] in DEPENDS_CONDITIONS, where
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck to wait for"
        assert str(service.get("restart", "no")) in RESTART_POLICIES, where
    used = {_split_volume(v)[0] for s in services.values() for v in s.get("volumes", [])}
    assert declared_volumes <= used, f"declared but unused volumes: {declared_volumes - used}"


def test_infrastructure_services(services: dict[str, dict[str, Any]]) -> None:
    redis_command = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy noeviction" in redis_command and "--appendonly yes" in redis_command
    assert services["postgres"]["image"].startswith("postgres:")
    assert "-s3" in services["objectstore"]["command"]
    assert services["migrate"]["command"] == ["diffgentor", "db", "upgrade"]
    assert services["sweeper"]["command"] == ["diffgentor", "sweep", "--loop"]
    assert services["create-bucket"]["command"] == ["python", "-m", "worker.storage_init"]
    assert (ROOT / "worker" / "storage_init.py").is_file()
    assert "flower" in services["flower"]["command"]


def test_one_worker_per_gpu(services: dict[str, dict[str, Any]]) -> None:
    workers = {
        name: s
        for name, s in services.items()
        if s.get("build", {}).get("dockerfile") == "docker/worker.Dockerfile"
    }
    assert len(workers) >= 1
    device_ids: list[str] = []
    for name, worker in workers.items():
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["capabilities"] == ["gpu"], name
        assert len(devices[0]["device_ids"]) == 1, f"{name} must reserve exactly one GPU"
        device_ids += devices[0]["device_ids"]
        assert worker["command"][:1] == ["--model_name"], name
        assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert ("/models", "ro") in {_split_volume(v)[1:] for v in worker["volumes"]}, (
            f"{name}: models not read-only"
        )
        assert worker["environment"]["DG_STORAGE_URL"].startswith("s3://")
    assert len(device_ids) == len(set(device_ids)), f"two workers share a GPU: {device_ids}"


def test_worker_image_contract() -> None:
    dockerfile = (DOCKER / "worker.Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", dockerfile, re.M)
    assert 'pip install ".[deepgen,postgres,metrics]"' in dockerfile
    assert "HF_HUB_OFFLINE=1" in dockerfile
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in {"root", "0"}, "the worker must run as a non-root user"
    assert 'ENTRYPOINT ["tini", "--", "diffgentor", "worker"]' in dockerfile
    assert 'CMD ["--model_name", "deepgen"]' in dockerfile


def test_every_dg_variable_is_read_by_the_code() -> None:
    named: set[str] = set()
    for path in [DOCKER / "compose.yaml", *DOCKER.glob("*.Dockerfile")]:
        # Commented-out lines document future settings; only live ones must exist in the code.
        live = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
        named |= set(re.findall(r"\bDG_[A-Z0-9_]+\b", live))
    assert {"DG_DATABASE_URL", "DG_BROKER_URL", "DG_STORAGE_URL", "DG_S3_ENDPOINT_URL"} <= named
    sources = _python_sources()
    unknown = sorted(name for name in named if not re.search(rf"\b{name}\b", sources))
    assert not unknown, f"docker/ sets variables no Python code reads: {unknown}"


def test_every_service_and_volume_is_documented(compose: dict[str, Any]) -> None:
    guide = (DOCKER / "README.md").read_text()
    undocumented = [name for name in [*compose["services"], *compose["volumes"]] if f"`{name}`" not in guide]
    assert not undocumented, f"docker/README.md does not describe: {undocumented}"


def test_every_dg_variable_compose_sets_is_in_the_readme(services: dict[str, dict[str, Any]]) -> None:
    readme = (ROOT / "README.md").read_text()
    named = set()
    for service in services.values():
        environment = service.get("environment") or {}
        names = environment if isinstance(environment, dict) else [e.split("=", 1)[0] for e in environment]
        named |= {name for name in names if name.startswith("DG_")}
    compose_text = (DOCKER / "compose.yaml").read_text()
    live = "\n".join(line.split("#", 1)[0] for line in compose_text.splitlines())
    named |= set(re.findall(r"\bDG_[A-Z0-9_]+\b", live))
    missing = sorted(name for name in named if f"`{name}`" not in readme and name not in readme)
    assert not missing, f"README.md does not document: {missing}"


def test_commands_the_services_run_exist(services: dict[str, dict[str, Any]]) -> None:
    """Every `diffgentor ...` command line in compose parses with the real CLI parser."""
    from api_client.cli import build_parser

    dockerfile = (DOCKER / "worker.Dockerfile").read_text()
    entrypoint = re.search(r"^ENTRYPOINT \[(.*)\]", dockerfile, re.M)
    assert entrypoint is not None
    worker_prefix = [part.strip().strip('"') for part in entrypoint.group(1).split(",")][2:]  # drop tini --
    parser = build_parser()
    checked = 0
    for name, service in services.items():
        command = service.get("command")
        if not command:
            continue
        argv = list(command)
        if name.startswith("worker-"):
            argv = worker_prefix + argv
        if argv[0] == "diffgentor":
            parser.parse_args(argv[1:])  # SystemExit(2) on an unknown command or flag
            checked += 1
        elif argv[:2] == ["python", "-m"]:
            module = __import__(argv[2], fromlist=["main"])
            assert callable(module.main), f"{argv[2]} has no main()"
            checked += 1
    assert checked >= 5  # create-bucket, migrate, sweeper, two workers
