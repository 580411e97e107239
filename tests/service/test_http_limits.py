"""Hostile HTTP clients cannot grow the server or hold it (issue 36, hole 3), over raw sockets.

Endless or numerous headers get 431 at the limit (the server's memory stays put), slow headers and
bodies get 408, idle connections are closed, connections beyond the limit get 503, and protocol
errors are JSON like every other error.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.service.helpers import Server, ready_server

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
        assert self.headers["content-type"] == "application/json", self
        return json.loads(self.body)


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

    large = b"X-Large: " + b"b" * MAX_HEADER_BYTES + b"\r\n"  # complete, in one piece
    reply = raw_request(limited, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + large + b"\r\n")
    assert reply.status == 431
    assert reply.error()["error"] == "headers_too_large"

    fine = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(MAX_HEADER_COUNT - 2))
    reply = raw_request(
        limited, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fine + b"Connection: close\r\n\r\n"
    )
    assert reply.status == 200 and json.loads(reply.body) == {"status": "ok"}


def test_malformed_requests_get_a_json_400(limited: Server) -> None:
    reply = raw_request(limited, b"NOT HTTP AT ALL\r\n\r\n")
    assert reply.status == 400
    error = reply.error()
    assert error["error"] == "bad_request" and error["detail"].startswith("malformed HTTP request: ")


def test_a_client_sending_its_headers_slowly_gets_408(limited: Server) -> None:
    with connect(limited) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        data, elapsed = drip(sock, b"X")
    reply = parse(data)
    assert reply.status == 408
    assert reply.error() == {
        "error": "request_timeout",
        "detail": f"the request headers did not arrive within {HEADER_TIMEOUT_S:g} s",
    }
    assert HEADER_TIMEOUT_S * 0.9 <= elapsed < WAIT_S


def test_an_idle_connection_is_closed_without_a_response(limited: Server) -> None:
    with connect(limited) as sock:
        started = time.monotonic()
        assert read_until_closed(sock) == b""  # closed, nothing sent: it never asked anything
        assert HEADER_TIMEOUT_S * 0.9 <= time.monotonic() - started < WAIT_S


def test_a_client_sending_its_body_slowly_gets_408(limited: Server) -> None:
    with connect(limited) as sock:
        sock.sendall(b"POST /decompress HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-lalic\r\n")
        sock.sendall(b"Content-Length: 1000\r\n\r\nL")
        data, elapsed = drip(sock, b"A")
    reply = parse(data)
    assert reply.status == 408
    assert reply.error() == {
        "error": "request_timeout",
        "detail": f"the request body did not arrive within {BODY_TIMEOUT_S:g} s",
    }
    assert reply.headers["connection"] == "close" and len(reply.headers["x-request-id"]) == 32
    assert BODY_TIMEOUT_S * 0.9 <= elapsed < WAIT_S


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
        while (response := httpx.get(f"{limited.url}/healthz", timeout=WAIT_S)).status_code == 200:
            assert time.monotonic() < deadline, "the server accepted a connection beyond its limit"
            time.sleep(0.05)
        assert response.status_code == 503
        assert response.json() == {
            "error": "too_many_connections",
            "detail": f"the server has {MAX_CONNECTIONS} connections open already; retry later",
        }
        assert response.headers["retry-after"] == "1" and response.headers["connection"] == "close"
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + WAIT_S
    while httpx.get(f"{limited.url}/healthz", timeout=WAIT_S).status_code != 200:
        assert time.monotonic() < deadline, "the server kept refusing after the connections closed"
        time.sleep(0.05)
