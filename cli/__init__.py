"""Command line: ``productbg <command> ...`` (also ``python -m productbg ...``).

Each command is one module of this package (``generate``, ``batch``, ``eval``, ``demo``, ``weights``,
``bank``, ``training``) and registers itself here through a small ``add_parser(subparsers)`` function, so this file stays
a table of contents. The commands import the error type from the leaf module :mod:`.errors`, never this file.

Every command runs under one guard (:func:`main`): an expected failure — a bad option, file, path or
permission, a missing optional dependency, running out of memory — is one line on stderr and exit status 2;
anything else is a bug: its traceback is shown with a line asking to report it (exit status 3). Warnings
(Python's, and those of PIL, numpy, torch …) are one line too: ``productbg <command>: warning: <message>``.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Sequence

from PIL import Image

from .. import __version__
from ..imaging.folder import ProductFolderError
from ..pipeline.errors import PipelineError
from ..training.datasets import DatasetError
from ..weights.errors import WeightsError
from . import bank, batch, demo, eval, generate, training, weights
from .errors import CliError

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the package root: every file of productbg
BUG_EXIT = 3
#: Optional imports → the extra that brings them.
EXTRAS = {"diffusers": "diffusers", "transformers": "diffusers", "peft": "train", "accelerate": "train",
          "scipy": "eval", "tqdm": "train"}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``productbg generate: error: argument --cfg: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _command_modules() -> list[Callable[[argparse._SubParsersAction], None]]:
    return [weights.add_parser, bank.add_parser, demo.add_parser, training.add_parser,
            generate.add_parser, batch.add_parser, eval.add_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="productbg",
        description="E-commerce product backgrounds: category identifiers + reference style on Stable Diffusion.",
    )
    parser.add_argument("--version", action="version", version=f"productbg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for add in _command_modules():
        add(sub)
    return parser


def one_line(text: object) -> str:
    """A message on one line (newlines and runs of spaces collapsed)."""
    return " ".join(str(text).split())


def _ours(e: BaseException) -> bool:
    """Whether the exception was raised by this package's own code (a deliberate message), not a library's."""
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE_DIR)


def _oom(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def _expected_types() -> tuple[type, ...]:
    """This package's error families (each message says what to fix)."""
    return CliError, ProductFolderError, PipelineError, DatasetError, WeightsError, Image.DecompressionBombError


def expected_message(e: BaseException) -> str | None:
    """The one-line message of an expected failure, or None for a bug."""
    if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in EXTRAS:
        module = (e.name or "").split(".")[0]
        return f"{module} is not installed; install it with: pip install 'productbg[{EXTRAS[module]}]'"
    if _oom(e):
        return ("out of memory: lower --size, --n, --batch-size or --resolution, or use a machine with more "
                f"memory ({one_line(e)[:200]})")
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        if e.errno == errno.ENOSPC:
            return f"no space left on the device{where}"
        return f"{e.strerror or one_line(e)}{where}" if e.strerror else one_line(e)
    if isinstance(e, _expected_types()) or (isinstance(e, ValueError) and _ours(e)):
        return one_line(e) or type(e).__name__
    return None


@contextlib.contextmanager
def warnings_in_one_line(name: str) -> Iterator[None]:
    """Show every warning as ``<name>: warning: <message>`` on stderr (no file, line or source) while inside."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{name}: warning: {one_line(message)}", file=sys.stderr)

    saved = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = saved


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a usage error (2, already printed on one line)
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    name = f"productbg {args.command}"
    try:
        with warnings_in_one_line(name):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the one guard: see the module docstring
        message = expected_message(e)
        if message is None:
            traceback.print_exc()
            print(f"{name}: internal error ({type(e).__name__}): this is a bug in productbg {__version__}; "
                  "please report it with the traceback above and the command you ran", file=sys.stderr)
            return BUG_EXIT
        print(f"{name}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
