"""The service on a weight set of fixed-rate networks, one per quality (``LALIC_WEIGHTS``, ``lalic import``).

The set is small (lalic-s sizes without gains, random weights, one seed per quality) so that the
server starts quickly; the official ``lalic`` networks go through the same code paths.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from model.codec import Codec
from model.codecset import CodecSet, load_codec
from tests.model.weight_sets import write_weight_set
from tests.service.helpers import (
    PNG,
    TEST_BACKEND,
    Server,
    assert_error,
    decode,
    encode,
    ready_server,
    test_image,
)

QUALITIES = (2, 3, 6)


@pytest.fixture(scope="module")
def weight_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_weight_set(tmp_path_factory.mktemp("set") / "set.pt", QUALITIES, seed=10)


@pytest.fixture(scope="module")
def server(weight_file: Path, server_logs: Path) -> Iterator[Server]:
    with ready_server(
        server_logs, random_weights="false", weights=str(weight_file), qualities="2,3,6"
    ) as server:
        yield server


@pytest.fixture(scope="module")
def codecs(weight_file: Path) -> CodecSet:
    torch.set_num_threads(1)  # as in the test servers
    codecs = load_codec(str(weight_file), backend=TEST_BACKEND)
    assert isinstance(codecs, CodecSet)
    return codecs


def test_every_quality_is_served_by_its_own_network(server: Server, codecs: CodecSet) -> None:
    image = test_image(40, 56)
    with server.client() as http:
        models = http.get("/v1/models").json()["models"]
        assert [(m["id"], m["qualities"], m["quality_range"]) for m in models] == [
            ("lalic-s-q2", [2.0], [2.0, 2.0]),
            ("lalic-s-q3", [3.0], [3.0, 3.0]),
            ("lalic-s-q6", [6.0], [6.0, 6.0]),
        ]
        assert [m["weights_digest"] for m in models] == [codecs.codec(q).weights_digest for q in QUALITIES]
        for quality in QUALITIES:
            response = http.post(f"/compress?quality={quality}", content=encode(image), headers=PNG)
            assert response.status_code == 200, response.text
            assert response.content == codecs.compress(image, quality)
            decoded = http.post("/decompress", content=response.content)
            assert decoded.status_code == 200, decoded.text
            assert (decode(decoded.content) == codecs.decompress(response.content)).all()


def test_values_between_the_networks_and_foreign_streams_are_refused(server: Server) -> None:
    image = test_image(32, 32)
    with server.client() as http:
        response = http.post("/compress?quality=2.5", content=encode(image), headers=PNG)
        body = assert_error(response, 422, "invalid_parameter")
        # 2 and 3 are loaded, but a value between them needs a variable-rate network
        assert body["detail"] == "quality 2.5 is not served (one network per quality: [2.0, 3.0, 6.0])"
        missing = http.post("/compress?quality=4", content=encode(image), headers=PNG)
        assert assert_error(missing, 422, "invalid_parameter")["detail"] == (
            "quality 4 is not served (loaded: [2.0, 3.0, 6.0])"
        )
        shipped = Codec.from_pretrained().compress(image, 3)
        body = assert_error(http.post("/decompress", content=shipped), 400, "model_mismatch")
        assert body["detail"].startswith(
            "the stream was made by lalic-s@d0887e03b1845744, this codec is lalic-s-q3@"
        )


@pytest.fixture(scope="module")
def lazy_server(weight_file: Path, server_logs: Path) -> Iterator[Server]:
    with ready_server(
        server_logs, random_weights="false", weights=str(weight_file), qualities="2,3,6", lazy_weights="true"
    ) as server:
        yield server


def test_a_lazy_set_loads_each_network_on_first_use(
    lazy_server: Server, codecs: CodecSet, tmp_path: Path
) -> None:
    image = test_image(40, 56)
    digests = {q: codecs.codec(q).weights_digest for q in QUALITIES}

    def loaded(http: httpx.Client) -> list[tuple[str, str | None, bool]]:
        models = http.get("/v1/models").json()["models"]
        return [(m["id"], m["weights_digest"], m["loaded"]) for m in models]

    with lazy_server.client() as http:
        # ready with the network the cost model was calibrated with (the middle quality)
        assert http.get("/readyz").json() == {
            "status": "ready",
            "qualities": [2.0, 3.0, 6.0],
            "loaded": [3.0],
        }
        assert loaded(http) == [
            ("lalic-s-q2", None, False),
            ("lalic-s-q3", digests[3], True),
            ("lalic-s-q6", None, False),
        ]
        assert lazy_server.metrics()[("lalic_models_loaded", ())] == 1
        # a stream of other weights with the same model id is refused once its network has loaded
        other = load_codec(str(write_weight_set(tmp_path / "other.pt", QUALITIES, seed=50)), lazy=True)
        body = assert_error(http.post("/decompress", content=other.compress(image, 6)), 400, "model_mismatch")
        assert body["detail"].startswith("the stream was made by lalic-s-q6@")
        assert loaded(http)[2] == ("lalic-s-q6", digests[6], True)
        stream = codecs.compress(image, 6)
        decoded = http.post("/decompress", content=stream)
        assert decoded.status_code == 200, decoded.text
        assert (decode(decoded.content) == codecs.decompress(stream)).all()
        response = http.post("/compress?quality=2", content=encode(image), headers=PNG)
        assert response.status_code == 200, response.text
        assert response.content == codecs.compress(image, 2)
        assert http.get("/readyz").json()["loaded"] == [2.0, 3.0, 6.0]
        assert [m[2] for m in loaded(http)] == [True, True, True]
        assert lazy_server.metrics()[("lalic_models_loaded", ())] == 3
        refused = http.post("/compress?quality=4", content=encode(image), headers=PNG)
        assert assert_error(refused, 422, "invalid_parameter")["detail"] == (
            "quality 4 is not served (loaded: [2.0, 3.0, 6.0])"
        )
    log = lazy_server.log()
    assert "loaded the network of quality 6 on first use" in log
    assert "loaded the network of quality 2 on first use" in log
