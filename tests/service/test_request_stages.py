"""Where a request's time goes: ``lalic_request_stage_seconds`` (service/timeline.py) through a real
server. Each successful request records its consecutive stages once, and they add up to its
``lalic_request_duration_seconds``."""

from __future__ import annotations

from collections import defaultdict

from tests.service.helpers import PNG, MetricKey, Server, encode, test_image

REQUESTS = 4
COMPRESS_STAGES = {"read_body", "decode_image", "queue", "codec", "handoff", "respond"}
DECOMPRESS_STAGES = {"read_body", "parse", "queue", "codec", "handoff", "encode_image", "respond"}


def _by_endpoint(metrics: dict[MetricKey, float], name: str, by: str) -> dict[tuple[str, str], float]:
    """Samples of ``name`` summed over every label but ``endpoint`` and ``by``."""
    sums: dict[tuple[str, str], float] = defaultdict(float)
    for (sample, labels), value in metrics.items():
        if sample == name:
            label = dict(labels)
            sums[label["endpoint"], label.get(by, "")] += value
    return sums


def test_stages_of_successful_requests_add_up_to_their_duration(main_server: Server) -> None:
    image = test_image(64, 96)
    before = main_server.metrics()
    with main_server.client() as http:
        for _ in range(REQUESTS):
            stream = http.post("/compress?quality=3", content=encode(image), headers=PNG)
            assert stream.status_code == 200, stream.text
            decoded = http.post("/decompress?format=png", content=stream.content)
            assert decoded.status_code == 200, decoded.text
        assert http.post("/decompress", content=b"not a stream").status_code == 400  # not recorded
    after = main_server.metrics()

    def delta(name: str, by: str) -> dict[tuple[str, str], float]:
        old = _by_endpoint(before, name, by)
        return {key: value - old.get(key, 0.0) for key, value in _by_endpoint(after, name, by).items()}

    counts = {key: n for key, n in delta("lalic_request_stage_seconds_count", "stage").items() if n}
    assert counts == {
        **{("compress", stage): REQUESTS for stage in COMPRESS_STAGES},
        **{("decompress", stage): REQUESTS for stage in DECOMPRESS_STAGES},
    }
    stages = delta("lalic_request_stage_seconds_sum", "stage")
    durations = delta("lalic_request_duration_seconds_sum", "quality")
    assert min(stages.values()) >= 0
    compress_total = sum(v for (endpoint, _), v in stages.items() if endpoint == "compress")
    compress_duration = sum(v for (endpoint, _), v in durations.items() if endpoint == "compress")
    assert abs(compress_total - compress_duration) <= 0.002 * REQUESTS
    # the 400 is in the decompress durations but not in the stages: compare with the 200s alone
    decompress_total = sum(v for (endpoint, _), v in stages.items() if endpoint == "decompress")
    decompress_duration = sum(v for (endpoint, _), v in durations.items() if endpoint == "decompress")
    assert decompress_total <= decompress_duration
    assert decompress_total >= 0.9 * decompress_duration - 0.002 * REQUESTS
    assert stages["compress", "codec"] > 0 and stages["decompress", "codec"] > 0
