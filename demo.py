"""``productbg demo`` (filled in with the foundation demo)."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="render a demo image on the tiny built-in pipeline")
    p.set_defaults(func=lambda args: p.print_help() or 2)
