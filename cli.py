"""Command line: ``productbg <command> ...`` (also ``python -m productbg ...``).

Each command lives next to the code it drives and registers itself here through a small
``add_parser(subparsers)`` function, so this file stays a table of contents.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from . import __version__


class CliError(Exception):
    """A user-facing error: printed as one line (no traceback), exit status 2."""


def _command_modules() -> list[Callable[[argparse._SubParsersAction], None]]:
    from .weights import cli as weights_cli
    from . import demo
    from .training import cli as training_cli
    from . import cli_batch, cli_eval, cli_generate
    return [weights_cli.add_parser, demo.add_parser, training_cli.add_parser,
            cli_generate.add_parser, cli_batch.add_parser, cli_eval.add_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="productbg",
        description="E-commerce product backgrounds: category identifiers + reference style on Stable Diffusion.",
    )
    parser.add_argument("--version", action="version", version=f"productbg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _command_modules():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"productbg {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
