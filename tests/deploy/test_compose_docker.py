"""docker-compose.yml (validated offline by docker-compose), the Dockerfile (hadolint) and .dockerignore."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from model.malloc import MALLOC_ENVIRONMENT
from tests.deploy.conftest import run_tool, tool
from tests.deploy.promql import DOCKER, REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = DOCKER / "Dockerfile"
API_SERVICES = ("api", "api-gpu", "api-replica")


def compose_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LALIC_", "GRAFANA_", "COMPOSE_"))}
    env.update({"GRAFANA_ADMIN_PASSWORD": "test-password", **extra})
    return env


def compose_commands() -> list[list[str]]:
    """Debian's docker-compose (always), plus `docker compose` when that plugin is installed."""
    commands = [[tool("docker-compose")]]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        commands.append([docker, "compose"])
    return commands


def compose_config(*args: str, **env: str) -> dict[str, Any]:
    out = run_tool(
        tool("docker-compose"),
        "-f",
        str(COMPOSE_FILE),
        "--project-directory",
        str(REPO),
        *args,
        "config",
        env=compose_env(**env),
        cwd=REPO,
    ).stdout
    return yaml.safe_load(out)


@pytest.mark.parametrize("profile", [None, "cpu", "gpu", "scale"])
def test_compose_config_is_valid(profile: str | None) -> None:
    profile_args = ["--profile", profile] if profile else []
    for command in compose_commands():
        run_tool(
            *command, "-f", str(COMPOSE_FILE), *profile_args, "config", "-q", env=compose_env(), cwd=REPO
        )


def test_compose_requires_the_grafana_admin_password() -> None:
    env = compose_env()
    del env["GRAFANA_ADMIN_PASSWORD"]
    proc = run_tool(
        tool("docker-compose"), "-f", str(COMPOSE_FILE), "config", "-q", env=env, cwd=REPO, check=False
    )
    assert proc.returncode != 0 and "GRAFANA_ADMIN_PASSWORD" in proc.stderr


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return compose_config()


def test_compose_profiles(config: dict[str, Any]) -> None:
    services = config["services"]
    assert services["api"]["profiles"] == ["cpu"]
    assert services["api-gpu"]["profiles"] == ["gpu"]
    assert services["api-replica"]["profiles"] == ["scale"]
    assert services["lb"]["profiles"] == ["scale"]
    assert "profiles" not in services["prometheus"] and "profiles" not in services["grafana"]


def test_compose_gpu_reservation(config: dict[str, Any]) -> None:
    gpu = config["services"]["api-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    assert gpu["build"]["args"]["VARIANT"] == "cuda" and gpu["environment"]["LALIC_DEVICE"] == "cuda"
    cpu = config["services"]["api"]
    assert cpu["build"]["args"]["VARIANT"] == "cpu" and cpu["environment"]["LALIC_DEVICE"] == "cpu"
    assert "deploy" not in cpu


def test_compose_api_services(config: dict[str, Any]) -> None:
    for name in API_SERVICES:
        service = config["services"][name]
        assert service["build"]["dockerfile"] == "docker/Dockerfile"
        assert Path(service["build"]["context"]) == REPO
        # every API container is discoverable by Prometheus under the shared alias
        assert "lalic-api" in service["networks"]["default"]["aliases"], name
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        assert all(key.startswith(("LALIC_", "XDG_", "NVIDIA_")) for key in service["environment"])
    assert config["services"]["api-replica"]["deploy"]["replicas"] == 2
    assert compose_config(LALIC_REPLICAS="4")["services"]["api-replica"]["deploy"]["replicas"] == 4


def volumes_of(service: dict[str, Any]) -> list[dict[str, str]]:
    """Volumes in long form ({type, source, target}), from either short or long `config` output."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *_ = volume.split(":")
            kind = "bind" if source.startswith(("/", ".")) else "volume"
            volume = {"type": kind, "source": source, "target": target}
        out.append(volume)
    return out


def host_ips_of(service: dict[str, Any]) -> list[str]:
    """Host addresses of published ports, from short ("ip:host:container/proto") or long syntax."""
    ips = []
    for port in service.get("ports", []):
        if isinstance(port, str):
            parts = port.split(":")
            ips.append(parts[0] if len(parts) == 3 else "")
        else:
            ips.append(port.get("host_ip", ""))
    return ips


def test_compose_monitoring(config: dict[str, Any]) -> None:
    services = config["services"]
    prometheus = services["prometheus"]
    mounts = {v["target"]: v for v in volumes_of(prometheus)}
    assert Path(mounts["/etc/prometheus/prometheus.yml"]["source"]) == DOCKER / "prometheus/prometheus.yml"
    assert Path(mounts["/etc/prometheus/rules"]["source"]) == DOCKER / "prometheus/rules"
    assert any(arg.startswith("--storage.tsdb.retention.time=") for arg in prometheus["command"])
    grafana = services["grafana"]
    env = grafana["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == "test-password"
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert (
        compose_config(GRAFANA_ANONYMOUS_ENABLED="true")["services"]["grafana"]["environment"][
            "GF_AUTH_ANONYMOUS_ENABLED"
        ]
        == "true"
    )
    lb = services["lb"]
    assert lb["depends_on"]["api-replica"]["condition"] == "service_healthy"
    assert any(Path(v["source"]) == DOCKER / "nginx/nginx.conf" for v in volumes_of(lb))
    # every bind-mounted path exists, and ports bind to loopback by default
    for name, service in services.items():
        for volume in volumes_of(service):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), f"{name}: {volume['source']}"
        for host_ip in host_ips_of(service):
            assert host_ip == "127.0.0.1", f"{name}: {service['ports']}"


def test_prometheus_scrapes_the_shared_api_alias() -> None:
    config = yaml.safe_load((DOCKER / "prometheus/prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "lalic-api"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["lalic-api"] and sd["type"] == "A" and sd["port"] == 8000


# ------------------------------------------------------------------------------------------ Dockerfile
def test_hadolint() -> None:
    run_tool(tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE))


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text()


def test_dockerfile_variants(dockerfile: str) -> None:
    first_from = dockerfile.index("\nFROM ")
    assert re.search(r"^ARG VARIANT=cpu$", dockerfile[:first_from], flags=re.MULTILINE), (
        "global ARG VARIANT=cpu"
    )
    stages = re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", dockerfile, flags=re.MULTILINE)
    names = [name for _, name in stages]
    assert {"deps-cpu", "deps-cuda", "runtime"} <= set(names) and names[-1] == "runtime"
    assert ("deps-${VARIANT}", "app") in stages
    cpu = dockerfile[dockerfile.index("AS deps-cpu") : dockerfile.index("AS deps-cuda")]
    cuda = dockerfile[dockerfile.index("AS deps-cuda") : dockerfile.index("AS app")]
    assert "download.pytorch.org/whl/cpu" in cpu and "ARG TORCH_VERSION=2.13.0" in cpu
    assert "onnxruntime-gpu" not in cpu
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", cuda) and "onnxruntime-gpu==" in cuda
    assert "ARG TORCH_VERSION=2.13.0" in cuda


def test_dockerfile_runtime(dockerfile: str) -> None:
    runtime = dockerfile[dockerfile.index("AS runtime") :]
    assert "COPY --from=app /opt/venv /opt/venv" in runtime
    users = re.findall(r"^USER\s+(\S+)", runtime, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    assert re.search(r"^HEALTHCHECK .*", runtime, flags=re.MULTILINE)
    assert "/readyz" in runtime[runtime.index("HEALTHCHECK") :]
    assert all(f"{name}={value}" in runtime for name, value in MALLOC_ENVIRONMENT.items())
    assert 'CMD ["lalic", "serve", "--host", "0.0.0.0", "--port", "8000"]' in runtime
    assert "EXPOSE 8000" in runtime


def test_dockerfile_installs_the_project_without_dev_dependencies(dockerfile: str) -> None:
    instructions = "\n".join(line for line in dockerfile.splitlines() if not line.lstrip().startswith("#"))
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", instructions), "pip install ."
    for forbidden in ("[dev]", "[eval]", "pytest", "hypothesis", "ruff", "requirements-dev", ".[", "-e ."):
        assert forbidden not in instructions, forbidden
    # the weights ship inside the package (package-data model/weights/*) and the build checks for them
    assert 'joinpath("weights")' in dockerfile
    assert 'model = ["weights/*"]' in (REPO / "pyproject.toml").read_text()


# ------------------------------------------------------------------------------------------ .dockerignore
def _dockerignore_patterns() -> list[tuple[bool, str]]:
    patterns = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        patterns.append((negate, line.lstrip("!").strip("/")))
    return patterns


def _pattern_matches(pattern: str, path: str) -> bool:
    """Docker's matching: a pattern matches a path or any of its parent directories; ** spans folders."""
    regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
    regex = regex.replace(r"\?", "[^/]")
    parts = path.split("/")
    return any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1))


def in_build_context(path: str) -> bool:
    excluded = False
    for negate, pattern in _dockerignore_patterns():
        if _pattern_matches(pattern, path):
            excluded = not negate
    return not excluded


@pytest.mark.parametrize(
    ("path", "included"),
    [
        ("pyproject.toml", True),
        ("README.md", True),
        ("model/__init__.py", True),
        ("lalic/cli.py", True),
        ("model/weights/lalic-s.pt", True),
        ("service/app.py", True),
        ("model/__pycache__/codec.cpython-311.pyc", False),
        ("service/sub/__pycache__/x.pyc", False),
        (".git/HEAD", False),
        (".venv/bin/python", False),
        ("tests/service/test_worker.py", False),
        ("bench/run.py", False),
        ("docker/Dockerfile", False),
        ("runs/exp1/checkpoint.pt", False),
        ("shared/data.bin", False),
        ("lalic_service.egg-info/PKG-INFO", False),
    ],
)
def test_dockerignore(path: str, included: bool) -> None:
    assert in_build_context(path) is included


def test_dockerignore_keeps_everything_the_build_copies(dockerfile: str) -> None:
    for source in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, flags=re.MULTILINE):
        assert in_build_context(source.rstrip("/")), source
    for tracked in ("lalic", "model", "service"):
        for path in (REPO / tracked).rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            if "__pycache__" not in rel:
                assert in_build_context(rel), rel
    assert fnmatch.fnmatch("x", "*")  # sanity of the module import
