"""The shipped weights: present, intact, and reproducing their manifest's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.codec import Codec
from model.image import load_image
from model.metrics import psnr
from model.paths import KODAK_DIR
from model.zoo import MANIFEST, WEIGHTS_DIR, default_weights, load_network, save_weights, sha256_file

KODAK = KODAK_DIR


@pytest.fixture(scope="module")
def entry() -> dict:
    return json.loads(MANIFEST.read_text())["models"][0]


def test_manifest_matches_the_file(entry: dict) -> None:
    path = WEIGHTS_DIR / entry["file"]
    assert sha256_file(path) == entry["sha256"]
    assert entry["file"] == f"{entry['name']}-{entry['sha256'][:8]}.pt"
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.iterdir())
    assert total <= 40e6
    assert default_weights() == path
    assert entry["config"]["name"] == "lalic-s" and entry["config"]["variable_rate"]


def test_corrupt_weights_are_refused(tmp_path: Path, entry: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "weights"
    fake.mkdir()
    blob = bytearray((WEIGHTS_DIR / entry["file"]).read_bytes())
    blob[len(blob) // 2] ^= 1
    (fake / entry["file"]).write_bytes(bytes(blob))
    (fake / "manifest.json").write_text(MANIFEST.read_text())
    monkeypatch.setattr("model.zoo.WEIGHTS_DIR", fake)
    monkeypatch.setattr("model.zoo.MANIFEST", fake / "manifest.json")
    with pytest.raises(ValueError, match="sha256"):
        default_weights()


def test_shipped_weights_reproduce_the_manifest(entry: dict) -> None:
    check = entry["check"]
    image = load_image(KODAK / check["image"])
    codec = Codec.from_pretrained()
    data = codec.compress(image, check["quality"])
    out = codec.decompress(data)
    bpp = 8 * len(data) / (image.shape[0] * image.shape[1])
    assert bpp == pytest.approx(check["bpp"], rel=0.01)
    assert psnr(image, out) == pytest.approx(check["psnr_rgb"], rel=0.01)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    net = load_network()
    path = tmp_path / "w.pt"
    save_weights(net, path, half=True)
    again = load_network(path)
    for (k, a), (_, b) in zip(net.state_dict().items(), again.state_dict().items(), strict=True):
        assert np.array_equal(a.numpy(), b.numpy()), k


def test_shipped_weights_load_unchanged(entry: dict) -> None:
    """Their stored config predates ``param_width_rounding``: it loads as ``nearest``, the widths and
    the weights digest (what every stream made with them carries) stay as they were."""
    assert "param_width_rounding" not in entry["config"]
    codec = Codec.from_pretrained()
    assert codec.net.config.param_width_rounding == "nearest"
    widths = [tuple(b.proj.out_features for b in p.blocks[:2]) for p in codec.net.context.params]
    assert widths == [(139, 96), (160, 96), (213, 139), (213, 139), (320, 224)]  # floor: 138 for 139
    assert codec.weights_digest == "d0887e03b1845744"
