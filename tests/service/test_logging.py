"""Structured logs: one JSON line per request from a real server, with nothing secret in them."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from service.logs import (
    ACCESS_LOGGER,
    JsonFormatter,
    RequestIdFilter,
    TextFormatter,
    current_request_id,
    log_request,
)
from tests.service.helpers import LALIC, PNG, encode, start_server, test_image

KEY = "logging-test-key-0123456789"
WRONG_KEY = "wrong-key-but-also-secret-42"


def parse_log(text: str) -> list[dict[str, Any]]:
    """Every line of the server's stderr is one JSON object."""
    entries = []
    for line in text.splitlines():
        if line.strip():
            entry = json.loads(line)  # fails the test on any line that is not JSON
            assert isinstance(entry, dict) and {"ts", "level", "logger", "message"} <= set(entry), line
            entries.append(entry)
    return entries


def test_request_lines(server_logs: Path) -> None:
    server = start_server(
        server_logs, api_keys=KEY, qualities="3", max_batch_delay_ms=0, log_format="json", log_level="info"
    )
    image = encode(test_image(40, 30))
    auth = {"authorization": f"Bearer {KEY}"}
    try:
        server.wait_ready()
        with server.client() as http:
            compressed = http.post(
                "/compress?quality=3",
                content=image,
                headers={**PNG, **auth, "x-request-id": "log-compress-1"},
            )
            assert compressed.status_code == 200, compressed.text
            restored = http.post("/decompress", content=compressed.content, headers={**LALIC, **auth})
            assert restored.status_code == 200
            generated_id = restored.headers["x-request-id"]
            assert http.post("/compress?quality=3", content=image, headers=PNG).status_code == 401
            wrong = {**PNG, "authorization": f"Bearer {WRONG_KEY}", "x-request-id": "log-wrong-1"}
            assert http.post("/compress?quality=3", content=image, headers=wrong).status_code == 403
            assert http.get("/no/such/path?token=hunter2", headers=auth).status_code == 404
            assert http.post("/compress?quality=9", content=image, headers={**PNG, **auth}).status_code == 422
    finally:
        assert server.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean exit
    text = server.log()
    entries = parse_log(text)
    for secret in (KEY, WRONG_KEY, "hunter2", "Bearer"):
        assert secret not in text
    requests = {entry["request_id"]: entry for entry in entries if entry["logger"] == ACCESS_LOGGER}
    first = requests["log-compress-1"]
    assert first["method"] == "POST" and first["route"] == "/compress" and first["status"] == 200
    assert first["bytes_in"] == len(image) and first["bytes_out"] == len(compressed.content)
    assert first["quality"] == 3.0 and first["duration_ms"] > 0 and first["level"] == "INFO"
    second = requests[generated_id]
    assert second["route"] == "/decompress" and second["quality"] == 3.0
    assert second["bytes_in"] == len(compressed.content) and second["bytes_out"] == len(restored.content)
    assert requests["log-wrong-1"]["status"] == 403 and requests["log-wrong-1"]["quality"] is None
    probes = {"/healthz", "/readyz"}  # start_server and wait_ready poll these
    statuses = sorted(entry["status"] for entry in requests.values() if entry["route"] not in probes)
    assert statuses == [200, 200, 401, 403, 404, 422]
    not_found = next(entry for entry in requests.values() if entry["status"] == 404)
    assert not_found["route"] is None  # never the raw path
    assert not any(entry["logger"].startswith("uvicorn.access") for entry in entries)
    assert any(entry["logger"] == "service.engine" and "ready" in entry["message"] for entry in entries)


def test_json_formatter_and_level(caplog: pytest.LogCaptureFixture) -> None:
    handler = logging.StreamHandler()
    formatter = JsonFormatter()
    handler.addFilter(RequestIdFilter())
    token = current_request_id.set("ctx-1")
    try:
        caplog.set_level(logging.WARNING, logger=ACCESS_LOGGER)
        log_request({"status": 200})
        assert not caplog.records  # request lines are INFO: log_level=warning silences them
        caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
        log_request({"status": 201, "route": "/compress"})
        (record,) = caplog.records
        handler.filter(record)
        entry = json.loads(formatter.format(record))
    finally:
        current_request_id.reset(token)
    assert entry["request_id"] == "ctx-1" and entry["status"] == 201 and entry["route"] == "/compress"
    try:
        raise ValueError("multi\nline")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed:\n%s", ("detail",), None)
        record.exc_info = sys.exc_info()
    line = formatter.format(record)
    assert "\n" not in line and json.loads(line)["exc"].startswith("Traceback")


def test_text_format() -> None:
    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 1, "request", (), None)
    record.lalic_fields = {"request_id": "r-1", "route": "/compress", "status": 200}
    RequestIdFilter().filter(record)
    line = TextFormatter().format(record)
    assert line.endswith("request request_id=r-1 route=/compress status=200") and "INFO lalic.access" in line
