"""``productbg weights ...`` (filled in by the weights work)."""
from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="inspect and convert productbg weight files")
    p.set_defaults(func=lambda args: p.print_help() or 2)
