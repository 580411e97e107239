"""``serve`` command line: every setting as a flag, then uvicorn with graceful shutdown.

Importing this module tunes glibc malloc (:mod:`model.malloc`) before torch allocates.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from model.malloc import tune_malloc
from service.logs import configure_logging
from service.settings import Settings

tune_malloc()

SHUTDOWN_GRACE_S = 10.0
"""Extra seconds beyond ``request_timeout_s`` that uvicorn waits for in-flight requests on SIGTERM."""


def _flag_options(field: FieldInfo) -> dict[str, Any]:
    """argparse options (type, choices, action) for one settings field."""
    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": typing.get_args(annotation)}
    if annotation in (int, float):
        return {"type": annotation, "metavar": annotation.__name__.upper()}
    if typing.get_origin(annotation) is tuple:
        return {"type": str, "metavar": "A,B,..."}
    return {"type": str}


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one ``--flag`` per setting; a flag beats its ``LALIC_*`` variable, which beats the default."""
    group = parser.add_argument_group("service settings (flags override LALIC_* environment variables)")
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, tuple):
            default = ",".join(f"{value:g}" if isinstance(value, float) else str(value) for value in default)
        help_text = f"{field.description} [env LALIC_{name.upper()}; default: {default}]"
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=argparse.SUPPRESS,
            help=help_text,
            **_flag_options(field),
        )
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags given on the command line."""
    overrides = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return Settings(**overrides)


_VALUE_ERROR_PREFIX = "Value error, "


def describe_invalid_settings(error: ValidationError) -> str:
    """One line per invalid setting, naming its variable and flag, without the values given (an API
    key must never be echoed)."""
    lines = []
    for item in error.errors(include_url=False, include_context=False, include_input=False):
        name = str(item["loc"][0]) if item["loc"] else ""
        known = name in Settings.model_fields
        where = f" (LALIC_{name.upper()}, --{name.replace('_', '-')})" if known else ""
        message = item["msg"].removeprefix(_VALUE_ERROR_PREFIX)
        lines.append(f"  {'.'.join(str(part) for part in item['loc']) or 'settings'}{where}: {message}")
    return "\n".join(lines)


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT, then finish accepted requests and exit; returns the exit code."""
    import uvicorn

    from service.app import create_app
    from service.protocol import HttpLimits, protocol_class

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"invalid settings:\n{describe_invalid_settings(exc)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        app = create_app(settings)
    except ValueError as exc:  # an unreadable api_keys_file: refuse to start rather than run open
        print(f"invalid settings: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # configure_logging routed uvicorn's loggers to our handler
        access_log=False,  # the request log (service.logs) replaces uvicorn's access lines
        timeout_graceful_shutdown=int(settings.request_timeout_s + SHUTDOWN_GRACE_S),
        lifespan="on",
        # h11 with our limits and timeouts (service.protocol); httptools bounds neither headers nor reads
        http=protocol_class(HttpLimits.from_settings(settings), app.state.runtime.metrics),
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]  # a float works
        ws="none",
    )
    uvicorn.Server(config).run()
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """The service's subcommand of the ``lalic`` command line: ``serve``."""
    parser = commands.add_parser("serve", help="run the REST service (uvicorn)")
    add_serve_arguments(parser)
    parser.set_defaults(func=run_serve)


def main(argv: list[str] | None = None) -> int:
    """``python -m service``: parse flags and serve."""
    parser = argparse.ArgumentParser(prog="python -m service", description="LALIC compression REST service.")
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))
