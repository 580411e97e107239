"""Kubernetes manifests: schema validation with kubernetes-validate (offline), and the essentials."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from model.malloc import MALLOC_ENVIRONMENT
from tests.deploy.conftest import run_tool, tool
from tests.deploy.promql import DOCKER

K8S = DOCKER / "k8s"
RESOURCE_FILES = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", ["1.28.0", "1.37.0"])
def test_kubernetes_validate_strict(version: str) -> None:
    """Strict schema validation (unknown fields rejected) against an older and the newest schema."""
    assert len(RESOURCE_FILES) >= 4
    out = run_tool(tool("kubernetes-validate"), "--strict", "-k", version, *map(str, RESOURCE_FILES))
    assert out.stdout.count(" passed for resource ") == len(RESOURCE_FILES), out.stdout + out.stderr


@pytest.fixture(scope="module")
def resources() -> dict[str, dict[str, Any]]:
    found = {}
    for path in RESOURCE_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            found[doc["kind"]] = doc
    return found


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in RESOURCE_FILES)


def test_deployment(resources: dict[str, dict[str, Any]]) -> None:
    deployment = resources["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["port"] == "http"
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
    resources_ = container["resources"]
    assert resources_["limits"]["nvidia.com/gpu"] == "1" == resources_["requests"]["nvidia.com/gpu"]
    assert container["command"] == ["lalic", "serve", "--host", "0.0.0.0", "--port", "8000"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["LALIC_DEVICE"] == "cuda"
    assert {name: env[name] for name in MALLOC_ENVIRONMENT} == MALLOC_ENVIRONMENT
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_service_pdb_select_the_pods(resources: dict[str, dict[str, Any]]) -> None:
    labels = resources["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert resources["Service"]["spec"]["selector"].items() <= labels.items()
    assert resources["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    pdb = resources["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < resources["HorizontalPodAutoscaler"]["spec"]["minReplicas"]


def test_hpa_scales_on_cpu_and_queue_depth(resources: dict[str, dict[str, Any]]) -> None:
    hpa = resources["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": resources["Deployment"]["metadata"]["name"],
    }
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == "lalic_queue_depth"
    assert metrics["Pods"]["pods"]["target"]["type"] == "AverageValue"


def test_prometheus_adapter_exposes_queue_depth(resources: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load(resources["ConfigMap"]["data"]["config.yaml"])
    (rule,) = config["rules"]
    assert rule["seriesQuery"].startswith("lalic_queue_depth")
    assert rule["name"]["as"] == "lalic_queue_depth"
    assert Path(K8S / "prometheus-adapter-rules.yaml").exists()
