"""Round trips through the real server equal the codec's own results, byte for byte."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.service.helpers import LALIC, PNG, Server, assert_error, decode, encode, test_image

QUALITIES = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 2.5]


@pytest.mark.parametrize("quality", QUALITIES)
def test_roundtrip_matches_the_codec(main_server: Server, codec: Any, quality: float) -> None:
    image = test_image(70, 90, seed=int(quality * 10))
    with main_server.client() as http:
        compressed = http.post(f"/compress?quality={quality}", content=encode(image), headers=PNG)
        assert compressed.status_code == 200, compressed.text
        stream = compressed.content
        assert compressed.headers["content-type"] == "application/x-lalic"
        assert stream == codec.compress(image, quality)
        headers = compressed.headers
        assert float(headers["x-lalic-quality"]) == quality
        assert (headers["x-lalic-width"], headers["x-lalic-height"]) == ("90", "70")
        assert int(headers["x-lalic-bytes"]) == len(stream)
        assert float(headers["x-lalic-bpp"]) == pytest.approx(len(stream) * 8 / (70 * 90), rel=1e-5)

        restored = http.post("/decompress", content=stream, headers=LALIC)
        assert restored.status_code == 200, restored.text
        assert restored.headers["content-type"] == "image/png"
        assert "accept" in restored.headers["vary"].lower()
        assert np.array_equal(decode(restored.content), codec.decompress(stream))


def test_a_stream_coded_flipped_decodes_the_right_way_up(main_server: Server, codec: Any) -> None:
    """Streams of ``lalic compress --orientations`` (orientation bits in the header) decode upright."""
    image = test_image(70, 90, seed=11)
    turned = codec.decompress(codec.compress(np.ascontiguousarray(image[::-1, ::-1]), 3))
    with main_server.client() as http:
        for orientation in (1, 2, 3):
            stream = codec.compress(image, 3, orientations=(orientation,))
            restored = http.post("/decompress", content=stream, headers=LALIC)
            assert restored.status_code == 200, restored.text
            assert np.array_equal(decode(restored.content), codec.decompress(stream))
        assert np.array_equal(decode(restored.content), turned[::-1, ::-1])  # orientation 3: turned back


def test_multipart_upload_equals_raw_body(main_server: Server) -> None:
    data = encode(test_image(64, 64, seed=5))
    with main_server.client() as http:
        raw = http.post("/compress?quality=3", content=data, headers=PNG)
        form = http.post("/compress?quality=3", files={"image": ("x.png", data, "image/png")})
        unnamed = http.post("/compress?quality=3", files={"image": ("x", data, "application/octet-stream")})
    assert raw.status_code == form.status_code == unnamed.status_code == 200
    assert raw.content == form.content == unnamed.content


@pytest.mark.parametrize(
    ("fmt", "media_type", "options"),
    [
        ("JPEG", "image/jpeg", {"quality": 90}),
        ("WEBP", "image/webp", {"lossless": True}),
        ("TIFF", "image/tiff", {}),
        ("BMP", "image/bmp", {}),
        ("AVIF", "image/avif", {}),
    ],
)
def test_input_formats(
    main_server: Server, codec: Any, fmt: str, media_type: str, options: dict[str, Any]
) -> None:
    from PIL import features

    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("Pillow without AVIF")
    data = encode(test_image(48, 40, seed=7), fmt, **options)
    expected = codec.compress(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), 2.0)
    with main_server.client() as http:
        response = http.post("/compress?quality=2", content=data, headers={"content-type": media_type})
    assert response.status_code == 200, response.text
    assert response.content == expected


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P"])
def test_pixel_modes_are_converted(main_server: Server, mode: str) -> None:
    pil = Image.fromarray(test_image(33, 47, seed=3)).convert(mode)
    with main_server.client() as http:
        response = http.post("/compress?quality=4", content=encode(pil), headers=PNG)
    assert response.status_code == 200, response.text
    assert (response.headers["x-lalic-width"], response.headers["x-lalic-height"]) == ("47", "33")


def test_output_formats_follow_format_then_accept(main_server: Server) -> None:
    with main_server.client() as http:
        stream = http.post("/compress?quality=3", content=encode(test_image(40, 40)), headers=PNG).content
        cases = [
            ({}, "", "image/png"),
            ({"accept": "image/webp,*/*;q=0.8"}, "", "image/webp"),
            ({"accept": "image/jpeg"}, "", "image/jpeg"),
            ({"accept": "image/webp"}, "?format=png", "image/png"),
            ({}, "?format=jpg", "image/jpeg"),
        ]
        for headers, query, media_type in cases:
            response = http.post(f"/decompress{query}", content=stream, headers=headers)
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == media_type
            assert response.headers["vary"] == "Accept"
            assert Image.open(io.BytesIO(response.content)).size == (40, 40)


def test_smallest_images(main_server: Server, codec: Any) -> None:
    image = test_image(2, 3, seed=1)
    with main_server.client() as http:
        response = http.post("/compress?quality=6", content=encode(image), headers=PNG)
        assert response.status_code == 200, response.text
        assert response.content == codec.compress(image, 6.0)
        restored = http.post("/decompress", content=response.content)
    assert decode(restored.content).shape == (2, 3, 3)


def test_models_endpoint(main_server: Server, codec: Any) -> None:
    with main_server.client() as http:
        body = http.get("/v1/models").json()
    (model,) = body["models"]
    assert model["id"] == codec.model_id
    assert model["weights_digest"] == codec.weights_digest
    assert model["qualities"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert model["device"] == "cpu" and model["backend"] == "torch"


@pytest.mark.parametrize(("quality", "shown"), [(3.37, "3.37"), (2.5, "2.5"), (4.0, "4"), (1.1, "1.1")])
def test_both_endpoints_report_the_quality_the_same_way(
    main_server: Server, quality: float, shown: str
) -> None:
    """The stream stores float32: both endpoints show its shortest text (not 3.369999885559082)."""
    with main_server.client() as http:
        compressed = http.post(
            f"/compress?quality={quality}", content=encode(test_image(32, 48)), headers=PNG
        )
        assert compressed.headers["x-lalic-quality"] == shown
        restored = http.post("/decompress", content=compressed.content, headers=LALIC)
        assert restored.headers["x-lalic-quality"] == shown


def test_an_image_wider_than_webp_allows_never_gets_a_500(main_server: Server, codec: Any) -> None:
    """WebP sides stop at 16383 pixels: format=webp is refused (422), Accept falls back (issue 36)."""
    width, height = 16400, 8
    stream = codec.compress(np.full((height, width, 3), 128, dtype=np.uint8), 3.0)
    with main_server.client(timeout=300) as http:
        refused = http.post("/decompress?format=webp", content=stream, headers=LALIC)
        assert assert_error(refused, 422, "invalid_parameter")["detail"] == (
            "format=webp cannot hold a 16400x8 image (WEBP sides are at most 16383 pixels); "
            "ask for png, which holds any size"
        )

        fallback = http.post("/decompress", content=stream, headers={**LALIC, "accept": "image/webp"})
        assert fallback.status_code == 200, fallback.text
        assert fallback.headers["content-type"] == "image/png"
        assert fallback.headers["x-lalic-format-fallback"] == "webp"
        assert decode(fallback.content).shape == (height, width, 3)

        second_choice = http.post(
            "/decompress", content=stream, headers={**LALIC, "accept": "image/webp, image/jpeg;q=0.8"}
        )
        assert second_choice.status_code == 200, second_choice.text
        assert second_choice.headers["content-type"] == "image/jpeg"
        assert second_choice.headers["x-lalic-format-fallback"] == "webp"
        assert Image.open(io.BytesIO(second_choice.content)).size == (width, height)

        plain = http.post(
            "/decompress", content=stream, headers=LALIC
        )  # no header when nothing was passed over
        assert plain.status_code == 200 and "x-lalic-format-fallback" not in plain.headers
