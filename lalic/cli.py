"""``lalic``: compress and decompress images, inspect bitstreams, train, evaluate, export, serve.

Examples::

    lalic compress photo.png photo.lalic --quality 3
    lalic compress photo.png photo.lalic --quality 3 --refine-steps 25
    lalic compress photo.png photo.lalic --quality 3 --orientations 0 1 2 3
    lalic decompress photo.lalic photo.png
    lalic info photo.lalic
    lalic serve --port 8000
    lalic eval --limit 4 --qualities 1 3 6
    lalic train --steps 20000
    lalic import q1.pth q2.pth q3.pth q4.pth q5.pth q6.pth --qualities 1 2 3 4 5 6 --out lalic.pt

Each package owns its subcommands (``model.cli.add_commands``, ``service.cli.add_commands``);
this module only dispatches, so neither package imports the other's command line.
"""

from __future__ import annotations

import argparse
import sys

from model.malloc import tune_malloc


def build_parser() -> argparse.ArgumentParser:
    """The ``lalic`` parser with every package's subcommands."""
    from model.cli import add_commands as add_model_commands
    from service.cli import add_commands as add_service_commands

    parser = argparse.ArgumentParser(
        prog="lalic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_model_commands(sub)
    add_service_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; user errors (bad files, bitstreams, values) exit 2 with one line."""
    tune_malloc()  # before torch allocates: large tensors stay mapped (model.malloc)
    args = build_parser().parse_args(argv)
    from model.bitstream import BitstreamError
    from model.image import ImageError

    try:
        return int(args.func(args) or 0)
    except (BitstreamError, ImageError, ValueError, FileNotFoundError) as exc:
        print(f"lalic {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
