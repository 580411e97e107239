"""PromQL helpers for the deployment tests: the service's metric contract and metric-name extraction."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
RULES_DIR = DOCKER / "prometheus" / "rules"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "lalic.json"

# The metrics the service exposes at GET /metrics (the contract of issue 5, and issue 36's overload
# metrics from lalic_jobs_abandoned_total on), by type.
SERVICE_METRICS: dict[str, str] = {
    "lalic_request_duration_seconds": "histogram",
    "lalic_queue_wait_seconds": "histogram",
    "lalic_request_stage_seconds": "histogram",
    "lalic_model_compute_seconds": "histogram",
    "lalic_entropy_coding_seconds": "histogram",
    "lalic_batch_size": "histogram",
    "lalic_request_body_bytes": "histogram",
    "lalic_response_body_bytes": "histogram",
    "lalic_bits_per_pixel": "histogram",
    "lalic_requests_total": "counter",
    "lalic_errors_total": "counter",
    "lalic_queue_depth": "gauge",
    "lalic_in_flight_requests": "gauge",
    "lalic_models_loaded": "gauge",
    "lalic_queue_capacity": "gauge",
    "lalic_jobs_abandoned_total": "counter",
    "lalic_queue_drain_seconds": "gauge",
    "lalic_request_timeout_seconds": "gauge",
    "lalic_cost_fixed_seconds": "gauge",
    "lalic_cost_seconds_per_megapixel": "gauge",
}

# Series Prometheus itself produces, which dashboards and rules may use besides the service's.
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE"}

_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Values substituted for Grafana variables before handing an expression to promtool.
GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "6h",
    "__range_s": "21600",
    "slo_window": "30d",
    "quality": ".*",
    "instance": ".*",
}

_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "atan2",
    "inf",
    "nan",
    "start",
    "end",
}


def substitute_grafana_variables(expr: str) -> str:
    """Replace ``$var``, ``${var}`` and ``[[var]]`` by test values; unknown variables raise KeyError."""

    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        name = name.split(":")[0]  # ${var:format}
        return GRAFANA_VARIABLES[name]

    return re.sub(r"\$\{([A-Za-z0-9_:]+)\}|\$([A-Za-z_][A-Za-z0-9_]*)|\[\[([A-Za-z0-9_]+)\]\]", value, expr)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (names and ``__name__="..."`` matchers)."""
    names = set(re.findall(r'__name__\s*=\s*"([^"]+)"', expr))
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals
    text = re.sub(r"'(?:\\.|[^'\\])*'", "''", text)
    text = re.sub(r"#[^\n]*", " ", text)  # comments
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # range and subquery durations
    text = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text, flags=re.IGNORECASE
    )
    for match in re.finditer(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", text):
        token, is_call = match.group(1), match.group(2)
        if is_call or token.lower() in _KEYWORDS:
            continue
        # a number's exponent (1e3) or a duration (5m) never starts with a letter here: skip unit tails
        start = match.start(1)
        if start > 0 and text[start - 1].isdigit():
            continue
        names.add(token)
    return names


def base_metric_name(name: str) -> str:
    """``lalic_x_bucket`` -> ``lalic_x`` for the contract's histograms; other names unchanged."""
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and SERVICE_METRICS.get(name[: -len(suffix)]) == "histogram":
            return name[: -len(suffix)]
    return name


def recording_rules(paths: Iterable[Path] | None = None) -> dict[str, str]:
    """Recorded series name -> expression, over the rule files."""
    rules: dict[str, str] = {}
    for path in paths or sorted(RULES_DIR.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    rules[rule["record"]] = rule["expr"]
    return rules


def alerting_rules(paths: Iterable[Path] | None = None) -> dict[str, dict]:
    """Alert name -> rule, over the rule files."""
    alerts: dict[str, dict] = {}
    for path in paths or sorted(RULES_DIR.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    alerts[rule["alert"]] = rule
    return alerts


def unknown_metric_names(expr: str, recorded: Iterable[str]) -> set[str]:
    """Names in ``expr`` that are neither contract metrics, Prometheus' own, nor recorded series."""
    allowed = set(SERVICE_METRICS) | PROMETHEUS_SERIES | set(recorded)
    return {name for name in metric_names(expr) if base_metric_name(name) not in allowed}
