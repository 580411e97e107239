"""Against running replicas (python -m service): the /metrics contract, and a real Prometheus scraping them
with the shipped recording and alerting rules."""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import (
    BITSTREAM_HEADERS,
    PNG_HEADERS,
    Replica,
    free_port,
    stop_process,
    test_png,
    tool,
    wait_http,
)
from tests.deploy.promql import (
    DOCKER,
    PROMETHEUS_SERIES,
    RULES_DIR,
    SERVICE_METRICS,
    alerting_rules,
    base_metric_name,
    metric_names,
    recording_rules,
)
from tests.deploy.test_dashboard import expressions

LOAD_SECONDS = 15.0
SCRAPE_INTERVAL = "1s"


def exposed_metrics(text: str) -> dict[str, str]:
    """Metric name -> type, as exposed (counters under their ``_total`` name)."""
    exposed = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        exposed[name] = family.type
    return exposed


def test_service_exposes_every_contract_metric(replica: Replica) -> None:
    exposed = exposed_metrics(replica.metrics_text())
    missing = {name for name in SERVICE_METRICS if name not in exposed}
    assert not missing, f"the service does not expose {sorted(missing)}"
    for name, kind in SERVICE_METRICS.items():
        assert exposed[name] == kind, f"{name}: {exposed[name]} instead of {kind}"


def test_dashboard_and_rules_only_use_exposed_metrics(replica: Replica) -> None:
    exposed = set(exposed_metrics(replica.metrics_text()))
    recorded = recording_rules()
    import json

    from tests.deploy.promql import DASHBOARD, substitute_grafana_variables

    exprs = [substitute_grafana_variables(e) for _, e in expressions(json.loads(DASHBOARD.read_text()))]
    exprs += list(recorded.values()) + [rule["expr"] for rule in alerting_rules().values()]
    for expr in exprs:
        for name in metric_names(expr):
            if name in recorded or name in PROMETHEUS_SERIES:
                continue
            assert base_metric_name(name) in exposed, f"{name} (in {expr!r}) is not exposed by the service"


# ------------------------------------------------------------------------------------- real Prometheus
def render_prometheus_config(targets: list[str]) -> dict[str, Any]:
    """The shipped prometheus.yml with the lalic-api job pointed at loopback targets, scraped every 1 s."""
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(
        {
            "scrape_interval": SCRAPE_INTERVAL,
            "scrape_timeout": SCRAPE_INTERVAL,
            "evaluation_interval": SCRAPE_INTERVAL,
        }
    )
    config["rule_files"] = [str(RULES_DIR / "*.yml")]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "lalic-api"]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": targets}]
    config["scrape_configs"] = [job]
    return config


@pytest.fixture(scope="module")
def prometheus(replicas: list[Replica], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's prometheus binary on a free loopback port with a temporary TSDB; yields its URL."""
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(render_prometheus_config([r.address for r in replicas])))
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                "nice",
                "-n",
                "10",
                tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/-/ready", 60, process, log)
        yield url
    finally:
        stop_process(process, timeout=20)


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", body
    return body["data"]["result"]


def send_load(replicas: list[Replica], seconds: float) -> int:
    """Compress then decompress small images on both replicas, about one round a second."""
    png = test_png(seed=3)
    clients = [httpx.Client(base_url=r.url, timeout=60) for r in replicas]
    rounds = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            started = time.monotonic()
            client = clients[rounds % len(clients)]
            quality = 2 + rounds % 2
            compressed = client.post(f"/compress?quality={quality}", content=png, headers=PNG_HEADERS)
            assert compressed.status_code == 200, compressed.text
            decompressed = client.post("/decompress", content=compressed.content, headers=BITSTREAM_HEADERS)
            assert decompressed.status_code == 200, decompressed.text
            rounds += 1
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    finally:
        for client in clients:
            client.close()
    return rounds


def wait_for_series(prometheus: str, expr: str, timeout: float = 20) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        result = [r for r in query(prometheus, expr) if not math.isnan(float(r["value"][1]))]
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def test_prometheus_scrapes_the_service_and_evaluates_the_rules(
    live_replicas: list[Replica], prometheus: str
) -> None:
    replicas = live_replicas
    rounds = send_load(replicas, LOAD_SECONDS)
    assert rounds >= 4

    up = {r["metric"]["instance"]: r["value"][1] for r in query(prometheus, 'up{job="lalic-api"}')}
    assert up == {r.address: "1" for r in replicas}

    # latency percentiles: encode and decode, overall and per quality
    for q in ("p50", "p95", "p99"):
        result = wait_for_series(prometheus, f"endpoint:lalic_request_duration_seconds:{q}_5m")
        values = {r["metric"]["endpoint"]: float(r["value"][1]) for r in result}
        assert set(values) == {"compress", "decompress"}, (q, result)
        assert all(0 < v < 5 for v in values.values()), (q, values)
        result = wait_for_series(prometheus, f"endpoint_quality:lalic_request_duration_seconds:{q}_5m")
        qualities = {(r["metric"]["endpoint"], r["metric"]["quality"]) for r in result}
        assert {("compress", "2"), ("compress", "3"), ("decompress", "2"), ("decompress", "3")} <= qualities

    # the fraction of decodes under 150 ms, over every window the burn-rate alerts use
    for window in ("5m", "30m", "1h", "2h", "6h", "1d", "3d"):
        (sli,) = wait_for_series(prometheus, f"lalic:decode_latency_sli:ratio_rate{window}")
        assert 0.0 <= float(sli["value"][1]) <= 1.0

    (errors,) = wait_for_series(prometheus, "lalic:requests_5xx:ratio_rate5m")
    assert float(errors["value"][1]) == 0.0
    assert wait_for_series(prometheus, "operation:lalic_queue_wait_seconds:p95_5m")

    # every rule group evaluates without error, the alerts are loaded, and no target is reported down
    rules = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded_alerts = set()
    for group in rules:
        for rule in group["rules"]:
            assert rule["health"] == "ok", (group["name"], rule.get("name"), rule.get("lastError"))
            if rule["type"] == "alerting":
                loaded_alerts.add(rule["name"])
    assert loaded_alerts == set(alerting_rules())
    firing = {
        a["labels"]["alertname"]
        for a in httpx.get(f"{prometheus}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    }
    assert not firing & {"LalicApiTargetDown", "LalicApiAbsent", "LalicHighServerErrorRatio"}

    # queue saturation needs lalic_queue_capacity next to lalic_queue_depth
    saturation = wait_for_series(prometheus, "instance:lalic_queue_saturation:ratio", timeout=5)
    assert {r["metric"]["instance"] for r in saturation} == {r.address for r in replicas}, (
        "instance:lalic_queue_saturation:ratio is empty: does the service expose lalic_queue_capacity?"
    )
    assert all(0.0 <= float(r["value"][1]) <= 1.0 for r in saturation)


def test_prometheus_config_for_the_test_keeps_the_shipped_job(tmp_path: Path) -> None:
    config = render_prometheus_config(["127.0.0.1:1"])
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "lalic-api" and job["metrics_path"] == "/metrics"
