"""Prometheus configuration and rules: promtool check config / check rules / test rules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from service.errors import ErrorCode
from tests.deploy.conftest import run_tool, tool
from tests.deploy.promql import (
    DOCKER,
    RULES_DIR,
    SERVICE_METRICS,
    alerting_rules,
    recording_rules,
    unknown_metric_names,
)

PROM_DIR = DOCKER / "prometheus"
RULE_FILES = sorted(RULES_DIR.glob("*.yml"))
TEST_FILES = sorted((PROM_DIR / "tests").glob("*.yml"))

REQUIRED_ALERTS = {
    "LalicDecodeLatencyP99High",
    "LalicDecodeErrorBudgetBurn1h",
    "LalicDecodeErrorBudgetBurn6h",
    "LalicDecodeErrorBudgetBurn1d",
    "LalicDecodeErrorBudgetBurn3d",
    "LalicHighServerErrorRatio",
    "LalicQueueSaturated",
    "LalicQueueRejectingRequests",
    "LalicApiTargetDown",
    "LalicApiAbsent",
    "LalicJobsAbandoned",
    "LalicQueueDrainAboveDeadline",
    "LalicConnectionRefusals",
}


def test_promtool_check_config_as_shipped() -> None:
    run_tool(tool("promtool"), "check", "config", str(PROM_DIR / "prometheus.yml"))


def test_promtool_check_config_with_the_rules(tmp_path: Path) -> None:
    """The shipped config with rule_files pointing at the repository, so promtool checks both."""
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"], "compose mounts the rules there"
    config["rule_files"] = [str(RULES_DIR / "*.yml")]
    rendered = tmp_path / "prometheus.yml"
    rendered.write_text(yaml.safe_dump(config))
    out = run_tool(tool("promtool"), "check", "config", str(rendered)).stdout
    for path in RULE_FILES:
        assert f"{path}" in out or path.name in out, out


def test_promtool_check_rules() -> None:
    assert len(RULE_FILES) >= 2
    run_tool(tool("promtool"), "check", "rules", *map(str, RULE_FILES))


def test_promtool_test_rules() -> None:
    """Unit tests with input series that trigger, and that do not trigger, each alert."""
    assert TEST_FILES, "docker/prometheus/tests/*.yml missing"
    out = run_tool(
        tool("promtool"), "test", "rules", *map(str, TEST_FILES), cwd=PROM_DIR / "tests", timeout=120
    )
    assert out.stdout.count("SUCCESS") == len(TEST_FILES), out.stdout


def _alert_tests() -> dict[str, dict[str, int]]:
    """alertname -> {"firing": n, "quiet": n} over the promtool unit tests."""
    seen: dict[str, dict[str, int]] = {}
    for path in TEST_FILES:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                kind = "firing" if case.get("exp_alerts") else "quiet"
                seen.setdefault(case["alertname"], {"firing": 0, "quiet": 0})[kind] += 1
    return seen


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    alerts = alerting_rules()
    assert set(alerts) >= REQUIRED_ALERTS
    seen = _alert_tests()
    for name in alerts:
        assert seen.get(name, {}).get("firing", 0) >= 1, f"no unit test where {name} fires"
        assert seen.get(name, {}).get("quiet", 0) >= 1, f"no unit test where {name} stays quiet"


def test_every_alert_has_summary_description_runbook_and_severity() -> None:
    readme = (DOCKER / "README.md").read_text()
    anchors = {_github_anchor(h) for h in re.findall(r"^#+\s+(.+)$", readme, flags=re.MULTILINE)}
    for name, rule in alerting_rules().items():
        annotations = rule.get("annotations", {})
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        assert rule.get("labels", {}).get("severity") in {"critical", "warning"}, name
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path == "docker/README.md" and anchor in anchors, (
            f"{name}: runbook anchor {anchor!r} not in README"
        )
        assert name in readme, f"{name} not explained in docker/README.md"


def _github_anchor(heading: str) -> str:
    """The anchor GitHub generates for a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_recording_rules_cover_latency_percentiles_and_sli() -> None:
    recorded = recording_rules()
    for q in ("p50", "p95", "p99"):
        assert f"endpoint:lalic_request_duration_seconds:{q}_5m" in recorded
        assert f"endpoint_quality:lalic_request_duration_seconds:{q}_5m" in recorded
    for window in ("5m", "30m", "1h", "2h", "6h", "1d", "3d"):
        expr = recorded[f"lalic:decode_latency_sli:ratio_rate{window}"]
        assert 'le="0.15"' in expr and 'endpoint="decompress"' in expr and f"[{window}]" in expr
    assert (
        'endpoint=~"compress|decompress"'
        in recorded["endpoint_quality_le:lalic_request_duration_seconds_bucket:rate5m"]
    )


@pytest.mark.parametrize(
    ("alert", "long_window", "short_window", "factor"),
    [
        ("LalicDecodeErrorBudgetBurn1h", "1h", "5m", "14.4"),
        ("LalicDecodeErrorBudgetBurn6h", "6h", "30m", "6"),
        ("LalicDecodeErrorBudgetBurn1d", "1d", "2h", "3"),
        ("LalicDecodeErrorBudgetBurn3d", "3d", "6h", "1"),
    ],
)
def test_burn_rate_alerts_follow_the_sre_workbook(
    alert: str, long_window: str, short_window: str, factor: str
) -> None:
    rule = alerting_rules()[alert]
    expr = " ".join(rule["expr"].split())
    assert f"ratio_rate{long_window}) > ({factor} * 0.01)" in expr
    assert f"ratio_rate{short_window}) > ({factor} * 0.01)" in expr
    assert " and " in expr
    assert rule["labels"]["long_window"] == long_window and rule["labels"]["short_window"] == short_window


def test_decode_p99_alert_is_150ms_for_10_minutes() -> None:
    rule = alerting_rules()["LalicDecodeLatencyP99High"]
    assert rule["for"] == "10m"
    assert 'p99_5m{endpoint="decompress"} > 0.15' in rule["expr"]


def test_rules_use_only_contract_metrics() -> None:
    recorded = recording_rules()
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                unknown = unknown_metric_names(rule["expr"], recorded)
                assert not unknown, f"{rule.get('record') or rule.get('alert')}: unknown metrics {unknown}"
    used = " ".join(rule for rule in recorded.values()) + " ".join(
        r["expr"] for r in alerting_rules().values()
    )
    for name in (
        "lalic_request_duration_seconds",
        "lalic_requests_total",
        "lalic_queue_depth",
        "lalic_queue_capacity",
        "lalic_errors_total",
        "lalic_jobs_abandoned_total",
        "lalic_queue_drain_seconds",
        "lalic_request_timeout_seconds",
    ):
        assert name in used and name in SERVICE_METRICS


def test_overload_alerts_thresholds() -> None:
    """The thresholds docker/README.md documents: 3 abandoned jobs a minute for 10 minutes, a drain time
    above the request deadline for 5 minutes, 12 connection refusals a minute (by code) for 10 minutes."""
    alerts = alerting_rules()
    recorded = recording_rules()
    abandoned = alerts["LalicJobsAbandoned"]
    assert abandoned["expr"].strip() == "instance_operation:lalic_jobs_abandoned:rate5m > 0.05"
    assert abandoned["for"] == "10m"
    assert (
        "rate(lalic_jobs_abandoned_total[5m])" in recorded["instance_operation:lalic_jobs_abandoned:rate5m"]
    )
    drain = alerts["LalicQueueDrainAboveDeadline"]
    assert drain["expr"].strip() == "instance:lalic_queue_drain:ratio_request_timeout > 1"
    assert drain["for"] == "5m"
    assert recorded["instance:lalic_queue_drain:ratio_request_timeout"].strip() == (
        "lalic_queue_drain_seconds / lalic_request_timeout_seconds"
    )
    refusals = alerts["LalicConnectionRefusals"]
    assert refusals["expr"].strip() == "instance_code:lalic_connection_refusals:rate5m > 0.2"
    assert refusals["for"] == "10m"
    expr = recorded["instance_code:lalic_connection_refusals:rate5m"]
    assert 'code=~"headers_too_large|request_timeout|too_many_connections"' in expr
    codes = {code.value for code in ErrorCode}
    assert {"headers_too_large", "request_timeout", "too_many_connections"} <= codes
    assert "by (job, instance, code)" in expr
