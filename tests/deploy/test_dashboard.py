"""The Grafana dashboard and provisioning: every PromQL expression parses (promtool), uses known metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import run_tool, tool
from tests.deploy.promql import (
    DASHBOARD,
    DOCKER,
    SERVICE_METRICS,
    base_metric_name,
    metric_names,
    recording_rules,
    substitute_grafana_variables,
    unknown_metric_names,
)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return panels


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, annotation and query variable."""
    found = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            found.append((f"panel {panel['id']} {panel['title']!r} target {target['refId']}", target["expr"]))
    for annotation in dashboard["annotations"]["list"]:
        if annotation.get("expr"):
            found.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query.strip(), flags=re.DOTALL)
            assert match, f"variable {variable['name']}: unexpected query {query!r}"
            found.append((f"variable {variable['name']}", match.group(1)))
    return found


def test_dashboard_promql_passes_promtool(dashboard: dict[str, Any], tmp_path: Path) -> None:
    """Each expression, with Grafana variables substituted, as a recording rule for `promtool check rules`."""
    exprs = expressions(dashboard)
    assert len(exprs) >= 30
    rules = [
        {"record": f"dashboard:expr_{index}", "expr": substitute_grafana_variables(expr)}
        for index, (_, expr) in enumerate(exprs)
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = run_tool(tool("promtool"), "check", "rules", str(path), check=False)
    where = "\n".join(f"dashboard:expr_{i}: {w}" for i, (w, _) in enumerate(exprs))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{where}"
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


def test_dashboard_uses_only_contract_metrics(dashboard: dict[str, Any]) -> None:
    recorded = recording_rules()
    used: set[str] = set()
    for where, expr in expressions(dashboard):
        names = metric_names(substitute_grafana_variables(expr))
        assert names, f"{where}: no metric in {expr!r}"
        unknown = unknown_metric_names(substitute_grafana_variables(expr), recorded)
        assert not unknown, f"{where}: unknown metrics {unknown}"
        used |= {base_metric_name(name) for name in names}
    # recorded series used by the dashboard exist and themselves only use contract metrics
    for name in used & set(recorded):
        assert not unknown_metric_names(recorded[name], recorded)
    # every metric of the contract is shown somewhere
    assert set(SERVICE_METRICS) <= used, f"not on the dashboard: {set(SERVICE_METRICS) - used}"


def test_dashboard_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "quality", "instance", "slo_window"} <= set(variables)
    quality = variables["quality"]
    assert quality["type"] == "query" and quality["includeAll"] and quality["multi"]
    assert quality["allValue"] == ".*"
    assert "quality" in json.dumps(quality["query"])
    # per-quality panels: latency and bits per pixel filter on the variable
    filtered = [
        p["title"]
        for p in all_panels(dashboard)
        if any('quality=~"$quality"' in t["expr"] for t in p.get("targets", []))
    ]
    assert any("Decode latency" in t for t in filtered)
    assert any("Encode latency" in t for t in filtered)
    assert any("Bits per pixel" in t for t in filtered)
    # the provisioned datasource is the variable's default
    assert variables["datasource"]["query"] == "prometheus"
    for panel in all_panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def _panel(dashboard: dict[str, Any], title_part: str) -> dict[str, Any]:
    matches = [p for p in all_panels(dashboard) if title_part.lower() in p["title"].lower()]
    assert matches, f"no panel titled like {title_part!r}"
    return matches[0]


@pytest.mark.parametrize("title", ["Decode latency (POST /decompress)", "Encode latency (POST /compress)"])
def test_latency_panels_have_percentiles_and_150ms_line(dashboard: dict[str, Any], title: str) -> None:
    panel = _panel(dashboard, title)
    exprs = " ".join(t["expr"] for t in panel["targets"])
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}," in exprs
    assert "sum by (quality, le)" in exprs
    defaults = panel["fieldConfig"]["defaults"]
    assert defaults["unit"] == "s"
    assert defaults["custom"]["thresholdsStyle"]["mode"] in {"line", "dashed", "line+area", "dashed+area"}
    assert 0.15 in [step["value"] for step in defaults["thresholds"]["steps"]]


@pytest.mark.parametrize(
    ("title", "needle"),
    [
        ("SLO compliance", 'le="0.15"'),
        ("Error budget remaining", "(1 - 0.99)"),
        ("Requests by endpoint and status", "lalic_requests_total"),
        ("Errors by code", "lalic_errors_total"),
        ("Queue depth", "lalic_queue_depth"),
        ("Queue wait", "lalic_queue_wait_seconds_bucket"),
        ("Batch size", "lalic_batch_size"),
        ("Model compute per batch by stage", "sum by (stage)"),
        ("Entropy coding", "lalic_entropy_coding_seconds_bucket"),
        ("Bits per pixel by quality", "lalic_bits_per_pixel"),
        ("Body size", "lalic_response_body_bytes"),
        ("Error budget burn rate", "lalic:decode_latency_sli:ratio_rate1h"),
        ("Abandoned jobs by operation", "sum by (operation) (rate(lalic_jobs_abandoned_total"),
        ("Queue drain time vs request deadline", "lalic_queue_drain_seconds"),
        ("Queue drain time vs request deadline", "lalic_request_timeout_seconds"),
        ("Connection refusals by reason", 'code=~"headers_too_large|request_timeout|too_many_connections"'),
        ("Cost model: fixed seconds per image", "lalic_cost_fixed_seconds"),
        ("Cost model: seconds per megapixel", "lalic_cost_seconds_per_megapixel"),
        ("Request stages of /decompress", 'lalic_request_stage_seconds_sum{endpoint="decompress"'),
        ("Request stages of /compress", 'lalic_request_stage_seconds_count{endpoint="compress"'),
    ],
)
def test_dashboard_has_required_panels(dashboard: dict[str, Any], title: str, needle: str) -> None:
    panel = _panel(dashboard, title)
    assert any(needle in t["expr"] for t in panel["targets"]), f"{panel['title']}: {needle!r} not queried"


def test_dashboard_layout_is_valid(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "lalic-service"
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    occupied: set[tuple[int, int]] = set()
    for panel in all_panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        for target in panel.get("targets", []):
            assert target["refId"] and target["expr"].strip()


def test_grafana_provisioning() -> None:
    datasources = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert source["uid"] == "prometheus" and source["isDefault"]
    providers = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/lalic.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    compose = yaml.safe_load((DOCKER.parent / "docker-compose.yml").read_text())
    volumes = compose["services"]["grafana"]["volumes"]
    assert "./docker/grafana/dashboards:/var/lib/grafana/dashboards:ro" in volumes
    assert "./docker/grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
