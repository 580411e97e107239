"""Every client error gets its status and JSON body from the real server; none is a 500."""

from __future__ import annotations

import socket
import struct
import zlib
from typing import Any

import httpx
import pytest

from tests.service.helpers import LALIC, MAIN_SERVER_SETTINGS, PNG, Server, assert_error, encode, test_image

MAX_BODY = MAIN_SERVER_SETTINGS["max_body_bytes"]


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def stream(main_server: Server) -> bytes:
    with main_server.client() as http:
        response = http.post("/compress?quality=3", content=encode(test_image(64, 80)), headers=PNG)
    assert response.status_code == 200
    return response.content


def test_garbage_and_corrupt_bitstreams_are_400(main_server: Server, stream: bytes) -> None:
    corrupt_payload = bytearray(stream)
    corrupt_payload[-1] ^= 0xFF
    corrupt_header = bytearray(stream)
    corrupt_header[12] ^= 0xFF
    cases = [b"", b"garbage", b"LALC" + b"\0" * 100, stream[: len(stream) // 2], stream + b"x"]
    cases += [bytes(corrupt_payload), bytes(corrupt_header)]
    with main_server.client() as http:
        for body in cases:
            assert_error(http.post("/decompress", content=body, headers=LALIC), 400, "bad_bitstream")


def test_streams_of_another_model_are_400(main_server: Server, codec: Any) -> None:
    from model.bitstream import Header, pack

    header = Header(
        model_id=codec.model_id,
        weights_digest=b"\1" * 8,
        quality=3.0,
        height=64,
        width=64,
        y_shape=(1, 1, 1),
        z_shape=(1, 1, 1),
        symbol_crc32=0,
    )
    with main_server.client() as http:
        assert_error(
            http.post("/decompress", content=pack(header, [b"\0"]), headers=LALIC), 400, "model_mismatch"
        )


def test_undecodable_images_are_400(main_server: Server) -> None:
    png = encode(test_image(64, 64))
    cases = [
        (b"not an image", "image/png"),
        (png[: len(png) // 2], "image/png"),  # truncated
        (png[:40] + b"\0" * 200, "image/png"),  # corrupt pixel data
        (b"\xff\xd8\xff\xe0" + b"\0" * 50, "image/jpeg"),
        (encode(test_image(8, 8), "GIF"), "image/png"),  # a format we do not accept, whatever the header says
    ]
    with main_server.client() as http:
        for body, media_type in cases:
            assert_error(
                http.post("/compress?quality=3", content=body, headers={"content-type": media_type}),
                400,
                "bad_image",
            )
        too_small = http.post("/compress?quality=3", content=encode(test_image(1, 1)), headers=PNG)
        assert_error(too_small, 400, "image_too_small")


def test_body_over_the_limit_is_413(main_server: Server) -> None:
    with main_server.client() as http:
        chunked = http.post("/compress?quality=3", content=iter([b"\0" * (MAX_BODY // 2)] * 3), headers=PNG)
        assert_error(chunked, 413, "payload_too_large")
    # Refused on Content-Length alone, before any body byte is sent.
    host, port = main_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST /compress?quality=3 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode()
        )
        received = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            received += chunk
    reply = received.decode("latin-1")
    assert reply.startswith("HTTP/1.1 413"), reply
    assert '"error":"payload_too_large"' in reply


def test_pixel_bombs_are_413(main_server: Server, codec: Any) -> None:
    from model.bitstream import Header, pack

    with main_server.client() as http:
        assert_error(
            http.post("/compress?quality=3", content=png_declaring(100_000, 100_000), headers=PNG),
            413,
            "too_many_pixels",
        )
        # Over the server's max_pixels (4 M) but under Pillow's own default guard.
        assert_error(
            http.post("/compress?quality=3", content=png_declaring(2100, 2000), headers=PNG),
            413,
            "too_many_pixels",
        )
        header = Header(
            model_id=codec.model_id,
            weights_digest=b"\0" * 8,
            quality=3.0,
            height=60_000,
            width=60_000,
            y_shape=(1, 1, 1),
            z_shape=(1, 1, 1),
            symbol_crc32=0,
        )
        assert_error(
            http.post("/decompress", content=pack(header, [b"\0"]), headers=LALIC), 413, "too_many_pixels"
        )


def test_unsupported_media_types_are_415(main_server: Server, stream: bytes) -> None:
    with main_server.client() as http:
        for headers in ({"content-type": "text/plain"}, {}, {"content-type": "image/gif"}):
            assert_error(
                http.post("/compress?quality=3", content=b"hello", headers=headers),
                415,
                "unsupported_media_type",
            )
        form = http.post("/compress?quality=3", files={"image": ("a.txt", b"hello", "text/plain")})
        assert_error(form, 415, "unsupported_media_type")
        assert_error(http.post("/decompress", content=stream, headers=PNG), 415, "unsupported_media_type")


def test_bad_parameters_are_422(main_server: Server) -> None:
    png = encode(test_image(16, 16))
    with main_server.client() as http:
        for query in ("quality=7", "quality=abc", "quality=0", "quality=nan", "quality=-inf", ""):
            assert_error(http.post(f"/compress?{query}", content=png, headers=PNG), 422, "invalid_parameter")
        assert_error(
            http.post("/compress?quality=3", files={"picture": ("a.png", png, "image/png")}),
            422,
            "invalid_parameter",
        )
        assert_error(
            http.post("/decompress?format=gif", content=b"x", headers=LALIC), 422, "invalid_parameter"
        )


def test_no_client_error_was_a_500(main_server: Server) -> None:
    samples = main_server.metrics()
    errors_5xx = [
        key
        for key, value in samples.items()
        if key[0] == "lalic_requests_total"
        and ("status_class", "5xx") in key[1]
        and ("endpoint", "readyz") not in key[1]  # 503 while the model was loading
        and value
    ]
    assert errors_5xx == []
    assert httpx.get(f"{main_server.url}/healthz").status_code == 200
