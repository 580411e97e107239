"""nginx load balancer: `nginx -t` on the config, then a real nginx in front of two real replicas."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.deploy.conftest import (
    BITSTREAM_HEADERS,
    PNG_HEADERS,
    Replica,
    decoded_pixels,
    free_port,
    run_tool,
    stop_process,
    test_png,
    tool,
    wait_http,
)
from tests.deploy.promql import DOCKER

NGINX_CONF = DOCKER / "nginx" / "nginx.conf"


def render_nginx_conf(upstreams: list[str], listen: str, access_log: Path) -> str:
    """The shipped config with the compose-only parts replaced: upstream servers, listen address, log."""
    text = NGINX_CONF.read_text()
    server = re.compile(r"^(\s*)server\s+api-replica:8000(\s[^;]*)?;\s*$", flags=re.MULTILINE)
    match = server.search(text)
    assert match and len(server.findall(text)) == 1, "expected one `server api-replica:8000 ...;` line"
    indent, params = match.group(1), match.group(2) or ""
    lines = "\n".join(f"{indent}server {address}{params};" for address in upstreams)
    text = server.sub(lambda _: lines, text)
    text, listens = re.subn(r"^(\s*)listen\s+8080;", rf"\1listen {listen};", text, flags=re.MULTILINE)
    text, logs = re.subn(r"access_log\s+/dev/stdout\s+upstream;", f"access_log {access_log} upstream;", text)
    assert listens == 1 and logs == 1
    return text


def test_nginx_config_syntax(tmp_path: Path) -> None:
    """`nginx -t` with a temporary prefix; the compose host name resolves to loopback here."""
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx_conf(["127.0.0.1:8000"], "127.0.0.1:8080", tmp_path / "access.log"))
    proc = run_tool(tool("nginx"), "-t", "-p", f"{tmp_path}/", "-c", str(conf), "-e", "stderr")
    assert "syntax is ok" in proc.stderr and "test is successful" in proc.stderr


def test_nginx_config_essentials() -> None:
    text = NGINX_CONF.read_text()
    assert re.search(r"upstream\s+lalic_api\s*\{", text) and "proxy_pass http://lalic_api;" in text
    assert "least_conn;" in text and "keepalive" in text
    assert re.search(r"client_max_body_size\s+\d+m;", text)
    assert "proxy_next_upstream error timeout http_502 http_503 non_idempotent;" in text
    assert "user " not in re.sub(r"#.*", "", text).split("events")[0], "no `user`: run as the image's default"


@pytest.fixture(scope="module")
def balancer(replicas: list[Replica], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real nginx on a free loopback port balancing the two replicas; yields (url, access log)."""
    prefix = tmp_path_factory.mktemp("nginx")
    port = free_port()
    access_log = prefix / "access.log"
    conf = prefix / "nginx.conf"
    conf.write_text(render_nginx_conf([r.address for r in replicas], f"127.0.0.1:{port}", access_log))
    log = prefix / "nginx.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [tool("nginx"), "-p", f"{prefix}/", "-c", str(conf), "-e", "stderr", "-g", "daemon off;"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/lb-healthz", 20, process, log)
        yield url, access_log
    finally:
        stop_process(process, timeout=10)


def test_requests_spread_over_both_replicas(live_replicas: list[Replica], balancer: tuple[str, Path]) -> None:
    replicas = live_replicas
    url, access_log = balancer
    before = [r.counter("lalic_requests_total", endpoint="compress", status_class="2xx") for r in replicas]
    png = test_png(seed=1)
    with httpx.Client(base_url=url, timeout=60) as client:
        for index in range(6):
            response = client.post(f"/compress?quality={2 + index % 2}", content=png, headers=PNG_HEADERS)
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "application/x-lalic"
    after = [r.counter("lalic_requests_total", endpoint="compress", status_class="2xx") for r in replicas]
    served = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(served) == 6 and all(n >= 1 for n in served), f"requests per replica: {served}"
    log = access_log.read_text()
    for replica in replicas:
        assert f"upstream={replica.address}" in log


def test_bitstream_from_one_replica_decodes_identically_on_the_other(
    live_replicas: list[Replica], balancer: tuple[str, Path]
) -> None:
    replicas = live_replicas
    png = test_png(seed=2)
    first, second = (httpx.Client(base_url=r.url, timeout=60) for r in replicas)
    with first, second:
        compressed = first.post("/compress?quality=3", content=png, headers=PNG_HEADERS)
        assert compressed.status_code == 200, compressed.text
        stream = compressed.content
        on_first = first.post("/decompress", content=stream, headers=BITSTREAM_HEADERS)
        on_second = second.post("/decompress", content=stream, headers=BITSTREAM_HEADERS)
        assert on_first.status_code == on_second.status_code == 200
        assert on_second.headers["content-type"] == "image/png"
        image = decoded_pixels(on_first.content)
        assert image.shape == decoded_pixels(png).shape
        np.testing.assert_array_equal(decoded_pixels(on_second.content), image)
        # the other way round, and through the balancer (whichever replica it picks)
        from_second = second.post("/compress?quality=3", content=png, headers=PNG_HEADERS).content
        assert from_second == stream, "same weights and input: the replicas produce the same bitstream"
    url, _ = balancer
    with httpx.Client(base_url=url, timeout=60) as client:
        for _ in range(2):
            via_lb = client.post("/decompress", content=stream, headers=BITSTREAM_HEADERS)
            assert via_lb.status_code == 200
            np.testing.assert_array_equal(decoded_pixels(via_lb.content), image)


def test_balancer_hides_replica_metrics(balancer: tuple[str, Path]) -> None:
    url, _ = balancer
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 404
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
