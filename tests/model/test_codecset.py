"""A weight set of fixed-rate networks, one per quality, served through the Codec API (CodecSet).

The networks are a small fixed-rate configuration (lalic-s's sizes without gains) with random
weights, one seed per quality: what matters here is which network codes and decodes which stream.
The official ``lalic`` networks go through the same code in ``test_official.py``.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lalic.cli import main as lalic
from model import evaluate
from model.bitstream import BitstreamError, ModelMismatchError, pack
from model.codec import Codec
from model.codecset import CodecSet, load_codec
from model.configs import get_config
from model.zoo import WeightSet, WeightSetMember, load_network
from tests.model.weight_sets import write_weight_set

QUALITIES = (1, 3, 6)


@pytest.fixture(scope="module")
def weight_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_weight_set(tmp_path_factory.mktemp("set") / "set.pt", QUALITIES)


@pytest.fixture(scope="module")
def codecs(weight_file: Path) -> CodecSet:
    codecs = load_codec(str(weight_file))
    assert isinstance(codecs, CodecSet)
    return codecs


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return (np.random.default_rng(0).random((48, 80, 3)) * 255).astype(np.uint8)


def test_a_weight_set_loads_as_a_codec_set(weight_file: Path, codecs: CodecSet) -> None:
    assert isinstance(load_network(weight_file), WeightSet)
    with pytest.raises(ValueError, match="is a weight set .* load it with model.codecset.load_codec"):
        Codec.from_pretrained(str(weight_file))
    assert codecs.qualities == (1.0, 3.0, 6.0) and codecs.loaded == (1.0, 3.0, 6.0)
    assert codecs.model_id == "lalic-s" and (codecs.device, codecs.backend) == ("cpu", "torch")
    assert [codecs.codec(q).model_id for q in QUALITIES] == ["lalic-s-q1", "lalic-s-q3", "lalic-s-q6"]
    digests = codecs.digests
    assert len(set(digests.values())) == 3
    assert len(codecs.weights_digest) == 16 and codecs.weights_digest not in digests.values()


def test_each_quality_codes_with_its_own_network(
    weight_file: Path, codecs: CodecSet, image: np.ndarray
) -> None:
    weights = load_network(weight_file)
    for quality in QUALITIES:
        data = codecs.compress(image, quality)
        header = codecs.read_header(data)
        alone = Codec(weights.network(quality))
        assert (header.model_id, header.weights_digest.hex()) == (f"lalic-s-q{quality}", alone.weights_digest)
        assert header.quality == quality
        assert data == alone.compress(image, quality)
        assert np.array_equal(codecs.decompress(data), alone.decompress(data))


def test_a_batch_of_streams_decodes_with_the_network_of_each_header(
    codecs: CodecSet, image: np.ndarray
) -> None:
    streams = [codecs.compress(image, q) for q in (6, 1, 6, 3)]
    batch = codecs.decompress_batch(streams)
    for stream, decoded in zip(streams, batch, strict=True):
        assert np.array_equal(decoded, codecs.decompress(stream))
    assert codecs.compress_batch([image, image[::-1].copy()], 3)[0] == streams[3]


def test_qualities_outside_the_set_are_refused(codecs: CodecSet, image: np.ndarray) -> None:
    message = "quality 2.5 is not served: this set has one fixed-rate network per quality (1, 3, 6); "
    with pytest.raises(
        ValueError,
        match=re.escape(message + "fractional qualities need a variable-rate model such as lalic-s"),
    ):
        codecs.compress(image, 2.5)
    with pytest.raises(ValueError, match="quality 2 is not served: .* import a checkpoint trained for it"):
        codecs.compress_batch([image], 2)
    with pytest.raises(ValueError, match="quality nan is not served"):
        codecs.compress(image, float("nan"))


def test_streams_of_other_networks_are_refused(codecs: CodecSet, image: np.ndarray) -> None:
    shipped = Codec.from_pretrained()
    with pytest.raises(
        BitstreamError,
        match=r"^the stream was made by lalic-s@d0887e03b1845744 at quality 2.5; "
        r"this set serves lalic-s-q1, lalic-s-q3, lalic-s-q6$",
    ):
        codecs.decompress(shipped.compress(image, 2.5))
    with pytest.raises(
        BitstreamError, match=r"^the stream was made by lalic-s@d0887e03b1845744, this codec is lalic-s-q3@"
    ):
        codecs.decompress(shipped.compress(image, 3))


def test_a_lazy_set_builds_a_network_on_first_use(
    weight_file: Path, codecs: CodecSet, image: np.ndarray
) -> None:
    lazy = CodecSet.from_file(weight_file, lazy=True)
    assert lazy.loaded == () and lazy.weights_digest == codecs.weights_digest
    data = lazy.compress(image, 3)
    assert lazy.loaded == (3.0,) and data == codecs.compress(image, 3)
    assert np.array_equal(
        lazy.decompress(codecs.compress(image, 6)), codecs.decompress(codecs.compress(image, 6))
    )
    assert lazy.loaded == (3.0, 6.0)
    lazy.warmup([1])
    assert lazy.loaded == (1.0, 3.0, 6.0)


def test_a_lazy_set_parses_without_building_and_checks_the_digest_on_decode(
    weight_file: Path, codecs: CodecSet, image: np.ndarray, tmp_path: Path
) -> None:
    lazy = CodecSet.from_file(weight_file, lazy=True)
    stream = codecs.compress(image, 6)
    container = lazy.parse(stream)
    assert lazy.loaded == ()  # the service parses on the request thread: no network is built there
    shipped = Codec.from_pretrained().compress(image, 3)
    with pytest.raises(
        ModelMismatchError,
        match=r"^the stream was made by lalic-s@d0887e03b1845744, this set serves quality 3 with lalic-s-q3$",
    ):
        lazy.parse(shipped)
    with pytest.raises(BitstreamError, match=r"^latent shapes \(1, 4, 6\)/"):
        lazy.parse(pack(replace(container.header, y_shape=(1, 4, 6)), container.streams))
    other = CodecSet.from_file(write_weight_set(tmp_path / "other.pt", QUALITIES, seed=50), lazy=True)
    foreign = other.compress(image, 6)  # same model id, other weights: only the digest tells
    assert other.loaded == (6.0,) and lazy.loaded == ()
    foreign_container = lazy.parse(foreign)
    assert lazy.loaded == ()
    with pytest.raises(
        ModelMismatchError, match=r"^the stream was made by lalic-s-q6@[0-9a-f]{16}, this codec is"
    ):
        lazy.decompress_batch([foreign_container])
    assert lazy.loaded == (6.0,)  # built to decode, and then it knew the digest
    assert np.array_equal(lazy.decompress_batch([container])[0], codecs.decompress(stream))
    with pytest.raises(ModelMismatchError):
        lazy.parse(foreign)  # once built, the parse checks the digest itself


def test_labels_must_make_valid_model_ids() -> None:
    config = get_config("lalic-s", variable_rate=False)
    for label in ("q 3", "", "x" * 30):
        with pytest.raises(ValueError, match=f"label {label!r} must be letters, digits"):
            WeightSet(config, (WeightSetMember(1.0, label, 0.0018, {}),), {})
    with pytest.raises(ValueError, match=r"a weight set needs distinct qualities, got \[1.0, 1.0\]"):
        WeightSet(config, (WeightSetMember(1.0, "a", 0.1, {}), WeightSetMember(1.0, "b", 0.1, {})), {})


def test_the_command_line_serves_a_weight_set(
    weight_file: Path, codecs: CodecSet, image: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    Image.fromarray(image).save(tmp_path / "in.png")
    stream, decoded = tmp_path / "x.lalic", tmp_path / "out.png"
    assert (
        lalic(["compress", str(tmp_path / "in.png"), str(stream), "-q", "6", "--weights", str(weight_file)])
        == 0
    )
    assert stream.read_bytes() == codecs.compress(image, 6)
    assert lalic(["decompress", str(stream), str(decoded), "--weights", str(weight_file)]) == 0
    assert np.array_equal(np.asarray(Image.open(decoded)), codecs.decompress(stream.read_bytes()))
    capsys.readouterr()
    assert (
        lalic(["compress", str(tmp_path / "in.png"), str(stream), "-q", "2.5", "--weights", str(weight_file)])
        == 2
    )
    assert "lalic compress: error: quality 2.5 is not served" in capsys.readouterr().err


def test_eval_measures_a_weight_set(weight_file: Path, tmp_path: Path) -> None:
    images = tmp_path / "tiny"
    images.mkdir()
    Image.fromarray((np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8)).save(
        images / "a.png"
    )
    parser = argparse.ArgumentParser()
    evaluate.add_eval_arguments(parser)
    argv = ["--images", str(images), "--qualities", "1", "6", "--weights", str(weight_file), "--no-baselines"]
    args = parser.parse_args(
        [*argv, "--out", str(tmp_path / "out"), "--reference-dir", str(tmp_path), "--no-progress"]
    )
    assert evaluate.run_eval(args) == 0
    result = json.loads((tmp_path / "out" / "tiny-ours.json").read_text())
    assert result["meta"]["model_id"] == "lalic-s"
    assert len(result["results"]["bpp"]) == 2 and all(b > 0 for b in result["results"]["bpp"])


def test_lalic_export_writes_one_folder_per_network(
    weight_file: Path, codecs: CodecSet, image: np.ndarray, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "export"
    assert lalic(["export", "--weights", str(weight_file), "--format", "torchscript", "-o", str(out)]) == 0
    assert sorted(p.name for p in (out / "torchscript").iterdir()) == ["q1", "q3", "q6"]
    for quality in QUALITIES:
        manifest = json.loads((out / "torchscript" / f"q{quality}" / "manifest.json").read_text())
        assert manifest["weights_digest"] == codecs.codec(quality).weights_digest
    caplog.set_level("WARNING", logger="model.backends")
    exported = load_codec(
        str(weight_file), backend="torchscript", export_dir=str(out / "torchscript"), lazy=True
    )
    assert isinstance(exported, CodecSet)
    data = exported.compress(image, 3)
    assert data == codecs.compress(image, 3)
    assert np.array_equal(exported.decompress(data), codecs.decompress(data))
    assert exported.loaded == (3.0,)
    assert "exporting" not in caplog.text  # each network loaded its own folder, none exported again


def test_tiling_and_the_orientation_search_work_on_a_set(
    codecs: CodecSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    from model import tiling

    monkeypatch.setattr(tiling, "MAX_TILE_PIXELS", 64 * 64)  # tiles of 64x64, as test_tiling does
    monkeypatch.setattr(tiling, "TILE", 64)
    monkeypatch.setattr(tiling.compress_tiled, "__defaults__", (64,))
    image = (np.random.default_rng(3).random((96, 160, 3)) * 255).astype(np.uint8)
    tiled = codecs.compress(image, 6)
    assert codecs.read_header(tiled).tiling != (0, 0, 0)
    assert tiled == codecs.codec(6).compress(image, 6)
    assert np.array_equal(codecs.decompress(tiled), codecs.codec(6).decompress(tiled))
    monkeypatch.undo()
    searched = codecs.compress(image, 1, orientations=(0, 1, 2, 3))
    assert searched == codecs.codec(1).compress(image, 1, orientations=(0, 1, 2, 3))
    assert codecs.read_header(searched).orientation == 3  # cheapest turned 180 degrees
    assert np.array_equal(codecs.decompress(searched), codecs.codec(1).decompress(searched))
