"""The ``lalic`` command line on the shipped weights: compress, info, decompress, errors, help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from model.codec import Codec
from model.image import load_image
from model.paths import KODAK_DIR


def lalic(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lalic", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_compress_info_decompress_round_trip(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:80, 0:120]
    image = np.stack([(xx * 2) % 256, (yy * 3) % 256, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "in.png")
    done = lalic("compress", str(tmp_path / "in.png"), str(tmp_path / "x.lalic"), "--quality", "2.5")
    assert done.returncode == 0, done.stderr
    data = (tmp_path / "x.lalic").read_bytes()
    codec = Codec.from_pretrained()
    assert data == codec.compress(load_image(tmp_path / "in.png"), 2.5)

    info = lalic("info", str(tmp_path / "x.lalic"))
    header = json.loads(info.stdout)
    assert (header["model_id"], header["height"], header["width"]) == ("lalic-s", 80, 120)
    assert header["quality"] == 2.5 and header["weights_digest"] == codec.weights_digest

    done = lalic("decompress", str(tmp_path / "x.lalic"), str(tmp_path / "out.png"))
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), codec.decompress(data))


def test_compress_and_decompress_in_bfloat16(tmp_path: Path) -> None:
    # a crop where g_a in bfloat16 moves at least one rounded latent (on 128x192 none moves)
    image = np.ascontiguousarray(np.asarray(Image.open(KODAK_DIR / "kodim23.png").convert("RGB"))[:192, :256])
    Image.fromarray(image).save(tmp_path / "in.png")
    done = lalic("compress", str(tmp_path / "in.png"), str(tmp_path / "x.lalic"), "--precision", "bfloat16")
    assert done.returncode == 0, done.stderr
    data = (tmp_path / "x.lalic").read_bytes()
    exact = Codec.from_pretrained()
    assert data != exact.compress(image, 3.0)  # g_a ran in bfloat16: other latents, a valid stream
    assert data == Codec.from_pretrained(analysis_precision="bfloat16").compress(image, 3.0)
    done = lalic(
        "decompress", str(tmp_path / "x.lalic"), str(tmp_path / "out.png"), "--precision", "bfloat16"
    )
    assert done.returncode == 0, done.stderr
    decoded = np.asarray(Image.open(tmp_path / "out.png"))
    assert np.array_equal(decoded, Codec.from_pretrained(synthesis_precision="bfloat16").decompress(data))
    assert not np.array_equal(decoded, exact.decompress(data))
    assert "--precision {float32,bfloat16}" in lalic("decompress", "--help").stdout


def test_bad_input_gives_a_message_and_status_2(tmp_path: Path) -> None:
    (tmp_path / "junk.lalic").write_bytes(b"not a bitstream")
    done = lalic("decompress", str(tmp_path / "junk.lalic"), str(tmp_path / "o.png"))
    assert done.returncode == 2 and "magic" in done.stderr.lower()
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    done = lalic("compress", str(tmp_path / "junk.png"), str(tmp_path / "o.lalic"))
    assert done.returncode == 2 and "cannot decode image" in done.stderr


def test_help_lists_every_command() -> None:
    done = lalic("--help")
    assert done.returncode == 0
    for command in ("compress", "decompress", "info", "train", "eval", "serve", "export", "import"):
        assert command in done.stdout


def test_compress_with_an_orientation_search(tmp_path: Path) -> None:
    image = load_image(KODAK_DIR / "kodim23.png")[:64, :96]
    Image.fromarray(image).save(tmp_path / "in.png")
    args = [
        "compress",
        str(tmp_path / "in.png"),
        str(tmp_path / "x.lalic"),
        "--orientations",
        "0",
        "1",
        "2",
        "3",
    ]
    done = lalic(*args)
    assert done.returncode == 0, done.stderr
    data = (tmp_path / "x.lalic").read_bytes()
    codec = Codec.from_pretrained()
    assert data == codec.compress(image, 3, orientations=(0, 1, 2, 3))
    orientation = json.loads(lalic("info", str(tmp_path / "x.lalic")).stdout)["orientation"]
    assert data == codec.compress(image, 3, orientations=(orientation,))
    done = lalic("decompress", str(tmp_path / "x.lalic"), str(tmp_path / "out.png"))
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), codec.decompress(data))
    done = lalic(*args[:3], "--orientations", "4")
    assert done.returncode == 2 and "invalid choice" in done.stderr
