"""Settings from LALIC_* variables and CLI flags."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.cli import add_serve_arguments, run_serve, settings_from_args
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
LIMITS = (
    "admission_factor",
    "max_header_bytes",
    "max_header_count",
    "header_timeout_s",
    "body_timeout_s",
    "keep_alive_timeout_s",
    "max_connections",
)


def parse(argv: list[str]) -> argparse.Namespace:
    return add_serve_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_defaults_follow_the_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LALIC_"):
            monkeypatch.delenv(name)
    settings = Settings()
    assert settings.qualities == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    assert (settings.max_batch_size, settings.max_batch_delay_ms, settings.queue_size) == (8, 5.0, 64)
    assert settings.max_body_bytes == 50_000_000 and settings.request_timeout_s == 30.0
    assert settings.model == "lalic-s" and settings.weights is None and not settings.random_weights
    assert settings.device == "auto" and settings.backend == "torchscript"


def test_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LALIC_QUALITIES", "3, 1,3")
    monkeypatch.setenv("LALIC_RANDOM_WEIGHTS", "true")
    monkeypatch.setenv("LALIC_MAX_BATCH_DELAY_MS", "12.5")
    monkeypatch.setenv("LALIC_LOG_LEVEL", "DEBUG")
    settings = Settings()
    assert settings.qualities == (1.0, 3.0)
    assert settings.random_weights and settings.max_batch_delay_s == pytest.approx(0.0125)
    assert settings.log_level == "debug"
    monkeypatch.setenv("LALIC_QUALITIES", "[2, 4]")
    assert Settings().qualities == (2.0, 4.0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"qualities": "2.5"},
        {"qualities": "0,1"},
        {"qualities": ""},
        {"device": "tpu"},
        {"backend": "tensorrt"},
        {"max_batch_size": 0},
        {"weights": "w.pt", "random_weights": True},
    ],
)
def test_invalid_settings_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(**overrides)


def test_quality_served_needs_both_neighbouring_anchors() -> None:
    settings = Settings(qualities="1,2,3,6")
    assert settings.quality_served(1.0) and settings.quality_served(2.5) and settings.quality_served(6.0)
    assert not settings.quality_served(3.5) and not settings.quality_served(6.5)
    assert not settings.quality_served(0.99)


def test_every_setting_has_a_flag_and_flags_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LALIC_PORT", "9001")
    monkeypatch.setenv("LALIC_QUEUE_SIZE", "7")
    args = parse(["--port", "9002", "--qualities", "1,2", "--random-weights", "--device", "cpu"])
    settings = settings_from_args(args)
    assert settings.port == 9002 and settings.queue_size == 7  # flag beats env; env beats default
    assert settings.qualities == (1.0, 2.0) and settings.random_weights and settings.device == "cpu"
    help_text = add_serve_arguments(argparse.ArgumentParser()).format_help()
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in help_text


def test_entropy_thread_default_matches_the_codec() -> None:
    """Settings stays importable without torch, so it repeats the codec's default: keep them equal."""
    from model.codec import ENTROPY_THREADS

    assert Settings.model_fields["entropy_threads"].default == ENTROPY_THREADS


def test_short_api_keys_refuse_to_start_with_the_rule_stated(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LALIC_API_KEYS", "k1,k2")
    assert run_serve(parse([])) == 2  # refused before anything starts
    assert capsys.readouterr().err == (
        "invalid settings:\n"
        "  api_keys (LALIC_API_KEYS, --api-keys): key 1 of 2: a key has 2 characters; each API key must "
        "have 16..256 visible ASCII characters (no spaces, no commas)\n"
    )


def test_the_limits_against_hostile_clients_are_settings_with_defaults() -> None:
    fields = Settings.model_fields
    defaults = {name: fields[name].default for name in LIMITS}
    assert defaults == {
        "admission_factor": 1.0,
        "max_header_bytes": 16384,
        "max_header_count": 100,
        "header_timeout_s": 10.0,
        "body_timeout_s": 30.0,
        "keep_alive_timeout_s": 5.0,
        "max_connections": 512,
    }
    readme = (REPO / "README.md").read_text()
    for name, default in defaults.items():
        assert f"| {name} | `LALIC_{name.upper()}` | {default:g} |" in readme
    settings = settings_from_args(parse(["--max-header-bytes", "8192", "--header-timeout-s", "2.5"]))
    assert settings.max_header_bytes == 8192 and settings.header_timeout_s == 2.5
    with pytest.raises(ValidationError):
        Settings(max_header_bytes=100)


def test_every_setting_has_a_description_and_a_row_in_the_readme_table() -> None:
    readme = (REPO / "README.md").read_text()
    for name, field in Settings.model_fields.items():
        assert field.description, name
        assert f"| {name} | `LALIC_{name.upper()}` |" in readme, name
    with pytest.raises(
        ValidationError, match="synthesis_precision bfloat16 needs backend torch or torchscript"
    ):
        Settings(backend="onnxruntime", synthesis_precision="bfloat16")
    with pytest.raises(
        ValidationError, match="analysis_precision bfloat16 needs backend torch or torchscript"
    ):
        Settings(backend="onnxruntime", analysis_precision="bfloat16")
    assert Settings(backend="torch", analysis_precision="bfloat16").analysis_precision == "bfloat16"
