"""Hostile HTTP clients cannot grow the server or hold it (issue 36, hole 3), over raw sockets.

Endless or numerous headers get 431 at the limit (the server's memory stays put), slow headers and
bodies get 408, idle connections are closed, connections beyond the limit get 503, and protocol
errors are JSON like every other error. Each refusal carries an X-Request-ID (the client's when its
headers were read, else a new one), the same id in its body, and is logged as one request line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import uvicorn

from service.logs import ACCESS_LOGGER, FIELDS_ATTR
from service.middleware import RequestLogMiddleware
from service.protocol import BODY_TIMEOUT_GRACE_S, HttpLimits, protocol_class
from tests.service.helpers import Server, free_port, ready_server

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 1.0
MAX_HEADER_BYTES = 8192
MAX_HEADER_COUNT = 32
MAX_CONNECTIONS = 8
WAIT_S = 30.0
"""How long a test waits for the server before failing (the limits above are what is tested)."""
ENDLESS_BYTES = 64 * 1024 * 1024
"""How much header an endless-header client sends at most (the old server buffered all of it)."""
RSS_GROWTH_LIMIT = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def limited(server_logs: Path) -> Iterator[Server]:
    with ready_server(
        server_logs,
        qualities="3",
        header_timeout_s=HEADER_TIMEOUT_S,
        body_timeout_s=BODY_TIMEOUT_S,
        keep_alive_timeout_s=KEEP_ALIVE_S,
        max_header_bytes=MAX_HEADER_BYTES,
        max_header_count=MAX_HEADER_COUNT,
        max_connections=MAX_CONNECTIONS,
    ) as server:
        yield server


@dataclass
class Reply:
    """One HTTP response read off a raw socket."""

    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, str]:
        """The JSON error body less its ``request_id``, which must be the X-Request-ID header's."""
        assert self.headers["content-type"] == "application/json", self
        body = json.loads(self.body)
        assert body.pop("request_id") == self.headers["x-request-id"], self
        return body


NEW_ID = re.compile(r"[0-9a-f]{32}")
"""A request id the server made (the client sent none, or one that could not be read)."""


def request_lines(server: Server, request_id: str, status: int) -> list[dict[str, object]]:
    """The server's request log lines with this id, once one with ``status`` was written."""
    deadline = time.monotonic() + WAIT_S
    while True:
        lines = []
        for line in server.log().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("message") == "request" and entry.get("request_id") == request_id:
                lines.append(entry)
        if any(entry["status"] == status for entry in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def assert_refusal_logged(server: Server, request_id: str, status: int, code: str) -> dict[str, object]:
    """The connection's refusal was logged as one request line with its id, status and code."""
    (line,) = request_lines(server, request_id, status)
    assert line["status"] == status and line["error"] == code and line["route"] is None, line
    assert line["bytes_out"] > 0 and line["duration_ms"] >= 0, line
    return line


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=WAIT_S)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def parse(data: bytes) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)
    }
    length = int(headers.get("content-length", len(body)))
    return Reply(int(status_line.split()[1]), headers, body[:length])


def drip(sock: socket.socket, byte: bytes, every_s: float = 0.5) -> tuple[bytes, float]:
    """Send ``byte`` every ``every_s``, whatever the server answers, until it closes the connection;
    returns what it sent and when it closed (seconds)."""
    started = time.monotonic()
    data = b""
    while time.monotonic() - started < WAIT_S:
        if select.select([sock], [], [], every_s)[0]:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return data, time.monotonic() - started
            data += chunk
            continue
        try:
            sock.sendall(byte)
        except (BrokenPipeError, ConnectionResetError):
            return data + read_until_closed(sock), time.monotonic() - started
    raise AssertionError(f"the server held a dripping client for {WAIT_S} s")


def test_an_endless_header_is_cut_off_at_the_limit_with_431(limited: Server) -> None:
    process = psutil.Process(limited.process.pid)
    before = process.memory_info().rss
    chunk = b"a" * 65536
    sent = 0
    with connect(limited) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        while sent < ENDLESS_BYTES:
            readable, writable, _ = select.select([sock], [sock], [], WAIT_S)
            if readable:
                break
            try:
                sent += sock.send(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        data = read_until_closed(sock)
    growth = process.memory_info().rss - before
    reply = parse(data)
    assert reply.status == 431, data[:200]
    assert reply.error() == {
        "error": "headers_too_large",
        "detail": f"the request line and headers exceed {MAX_HEADER_BYTES} bytes",
    }
    assert reply.headers["connection"] == "close"
    assert NEW_ID.fullmatch(reply.headers["x-request-id"])
    line = assert_refusal_logged(limited, reply.headers["x-request-id"], 431, "headers_too_large")
    assert line["method"] is None  # the head was never complete
    assert sent < ENDLESS_BYTES // 8  # refused long before the client gave up
    assert growth < RSS_GROWTH_LIMIT, f"the server grew by {growth / 2**20:.1f} MiB"
    assert limited.metrics()[("lalic_errors_total", (("code", "headers_too_large"),))] >= 1


def raw_request(server: Server, request: bytes) -> Reply:
    with connect(server) as sock:
        sock.sendall(request)
        return parse(read_until_closed(sock))


def test_too_many_or_too_large_headers_are_431(limited: Server) -> None:
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADER_COUNT))  # with Host and Connection: 34
    reply = raw_request(
        limited, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"Connection: close\r\n\r\n"
    )
    assert reply.status == 431
    count = MAX_HEADER_COUNT + 2
    assert reply.error()["detail"] == f"{count} headers, more than the limit of {MAX_HEADER_COUNT}"
    assert NEW_ID.fullmatch(reply.headers["x-request-id"])

    large = b"X-Large: " + b"b" * MAX_HEADER_BYTES + b"\r\n"  # complete, in one piece
    reply = raw_request(limited, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + large + b"\r\n")
    assert reply.status == 431
    assert reply.error()["error"] == "headers_too_large"

    fine = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(MAX_HEADER_COUNT - 2))
    reply = raw_request(
        limited, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fine + b"Connection: close\r\n\r\n"
    )
    assert reply.status == 200 and json.loads(reply.body) == {"status": "ok"}


def test_a_431_for_complete_headers_echoes_the_clients_request_id(limited: Server) -> None:
    """Too many headers, all read: the client's sane X-Request-ID is echoed, and logged."""
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADER_COUNT))
    reply = raw_request(
        limited,
        b"POST /compress HTTP/1.1\r\nHost: x\r\nX-Request-ID: many-headers.431\r\n" + many + b"\r\n",
    )
    assert reply.status == 431 and reply.error()["error"] == "headers_too_large"
    assert reply.headers["x-request-id"] == "many-headers.431"
    line = assert_refusal_logged(limited, "many-headers.431", 431, "headers_too_large")
    assert line["method"] == "POST" and line["bytes_in"] == 0

    # an id that is not sane is replaced, as the app does
    reply = raw_request(limited, b"GET / HTTP/1.1\r\nHost: x\r\nX-Request-ID: not sane!\r\n" + many + b"\r\n")
    assert reply.status == 431 and NEW_ID.fullmatch(reply.headers["x-request-id"])
    assert reply.error()["error"] == "headers_too_large"


def test_malformed_requests_get_a_json_400(limited: Server) -> None:
    reply = raw_request(limited, b"NOT HTTP AT ALL\r\n\r\n")
    assert reply.status == 400
    error = reply.error()
    assert error["error"] == "bad_request" and error["detail"].startswith("malformed HTTP request: ")
    assert_refusal_logged(limited, reply.headers["x-request-id"], 400, "bad_request")


def test_a_client_sending_its_headers_slowly_gets_408(limited: Server) -> None:
    with connect(limited) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Request-ID: cut-")  # cut off: never read
        data, elapsed = drip(sock, b"X")
    reply = parse(data)
    assert reply.status == 408
    assert reply.error() == {
        "error": "request_timeout",
        "detail": f"the request headers did not arrive within {HEADER_TIMEOUT_S:g} s",
    }
    assert HEADER_TIMEOUT_S * 0.9 <= elapsed < WAIT_S
    assert NEW_ID.fullmatch(reply.headers["x-request-id"])
    line = assert_refusal_logged(limited, reply.headers["x-request-id"], 408, "request_timeout")
    assert line["method"] is None and line["duration_ms"] >= HEADER_TIMEOUT_S * 900


def test_an_idle_connection_is_closed_without_a_response(limited: Server) -> None:
    with connect(limited) as sock:
        started = time.monotonic()
        assert read_until_closed(sock) == b""  # closed, nothing sent: it never asked anything
        assert HEADER_TIMEOUT_S * 0.9 <= time.monotonic() - started < WAIT_S


def test_a_client_sending_its_body_slowly_gets_408(limited: Server) -> None:
    with connect(limited) as sock:
        sock.sendall(b"POST /decompress HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-lalic\r\n")
        sock.sendall(b"X-Request-ID: slow-body-1\r\nContent-Length: 1000\r\n\r\nL")
        data, elapsed = drip(sock, b"A")
    reply = parse(data)
    assert reply.status == 408
    assert reply.error() == {
        "error": "request_timeout",
        "detail": f"the request body did not arrive within {BODY_TIMEOUT_S:g} s",
    }
    assert reply.headers["connection"] == "close" and reply.headers["x-request-id"] == "slow-body-1"
    assert BODY_TIMEOUT_S * 0.9 <= elapsed < WAIT_S
    (line,) = request_lines(limited, "slow-body-1", 408)  # one line (the app answered, and logged it)
    assert line["status"] == 408 and line["route"] == "/decompress"


def test_a_body_nobody_reads_is_cut_off(limited: Server) -> None:
    """A request refused before its body is read (quality 9 is invalid) cannot drip the body forever."""
    with connect(limited) as sock:
        sock.sendall(b"POST /compress?quality=9 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n")
        sock.sendall(b"Content-Length: 100000\r\n\r\nx")
        data, elapsed = drip(sock, b"x")
    reply = parse(data)
    assert reply.status == 422 and reply.error()["error"] == "invalid_parameter"
    assert BODY_TIMEOUT_S * 0.9 <= elapsed < WAIT_S  # closed, though the client was still sending


def test_an_idle_keep_alive_connection_is_closed(limited: Server) -> None:
    with connect(limited) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        data = read_until_closed(sock)
        elapsed = time.monotonic() - started
    reply = parse(data)
    assert reply.status == 200 and json.loads(reply.body) == {"status": "ok"}
    assert KEEP_ALIVE_S * 0.9 <= elapsed < KEEP_ALIVE_S + 2.5  # uvicorn's own default is 5 s


def test_connections_beyond_the_limit_get_503(limited: Server) -> None:
    idle = [connect(limited) for _ in range(MAX_CONNECTIONS)]
    try:
        deadline = time.monotonic() + HEADER_TIMEOUT_S * 0.75  # before the idle ones time out
        tries = 0
        while (
            response := httpx.get(
                f"{limited.url}/healthz", headers={"X-Request-ID": f"beyond-{tries}"}, timeout=WAIT_S
            )
        ).status_code == 200:
            assert time.monotonic() < deadline, "the server accepted a connection beyond its limit"
            tries += 1
            time.sleep(0.05)
        assert response.status_code == 503
        assert response.json() == {
            "error": "too_many_connections",
            "detail": f"the server has {MAX_CONNECTIONS} connections open already; retry later",
            "request_id": f"beyond-{tries}",
        }
        assert response.headers["x-request-id"] == f"beyond-{tries}"
        assert response.headers["retry-after"] == "1" and response.headers["connection"] == "close"
        line = assert_refusal_logged(limited, f"beyond-{tries}", 503, "too_many_connections")
        assert line["method"] == "GET"
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + WAIT_S
    while httpx.get(f"{limited.url}/healthz", timeout=WAIT_S).status_code != 200:
        assert time.monotonic() < deadline, "the server kept refusing after the connections closed"
        time.sleep(0.05)


STALL_BODY_TIMEOUT_S = 0.5


@pytest.fixture
def stalled_server() -> Iterator[tuple[str, threading.Event]]:
    """A uvicorn server with the limited protocol and the request-log middleware in front of an app that
    never reads request bodies (a handler that forgot to): only the connection's body timeout answers.
    Yields its URL and an event set once the app's request-log middleware is done with the request."""
    done = threading.Event()

    async def stalled(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(STALL_BODY_TIMEOUT_S + BODY_TIMEOUT_GRACE_S + 1.0)
        assert (await receive())["type"] == "http.disconnect"  # the connection refused the request
        await send({"type": "http.response.start", "status": 500, "headers": []})  # dropped

    logged = RequestLogMiddleware(stalled)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await logged(scope, receive, send)
        finally:
            done.set()

    limits = HttpLimits(
        max_header_bytes=MAX_HEADER_BYTES,
        max_header_count=MAX_HEADER_COUNT,
        header_timeout_s=WAIT_S,
        body_timeout_s=STALL_BODY_TIMEOUT_S,
        max_connections=MAX_CONNECTIONS,
    )
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        http=protocol_class(limits),
        lifespan="off",
        log_config=None,
        access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", done
    finally:
        server.should_exit = True
        thread.join(WAIT_S)


def test_a_body_the_app_never_reads_gets_408_with_the_clients_request_id(
    stalled_server: tuple[str, threading.Event], caplog: pytest.LogCaptureFixture
) -> None:
    """The connection's own body timeout (the handler's did not fire): the client's id, in the header and
    the body, and one request line, the connection's (the app's middleware leaves it out)."""
    caplog.set_level(logging.INFO, logger=ACCESS_LOGGER)
    url, app_done = stalled_server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
        sock.sendall(b"POST /compress HTTP/1.1\r\nHost: x\r\nX-Request-ID: stalled-body.7\r\n")
        sock.sendall(b"Content-Type: image/png\r\nContent-Length: 100\r\n\r\nabc")
        started = time.monotonic()
        reply = parse(read_until_closed(sock))
        elapsed = time.monotonic() - started
    assert reply.status == 408 and reply.headers["x-request-id"] == "stalled-body.7"
    assert reply.error() == {
        "error": "request_timeout",
        "detail": f"the request body did not arrive within {STALL_BODY_TIMEOUT_S:g} s",
    }
    assert STALL_BODY_TIMEOUT_S + BODY_TIMEOUT_GRACE_S * 0.9 <= elapsed < WAIT_S
    assert app_done.wait(WAIT_S)  # the app has given up (its middleware would log its own line then)
    lines = [getattr(r, FIELDS_ATTR) for r in caplog.records if r.name == ACCESS_LOGGER]
    assert [line["request_id"] for line in lines] == ["stalled-body.7"], lines
    (line,) = lines
    assert line["status"] == 408 and line["error"] == "request_timeout" and line["method"] == "POST"
    assert line["bytes_in"] == 3 and line["route"] is None
