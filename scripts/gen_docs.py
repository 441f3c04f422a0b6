"""The generated parts of the Markdown docs: the export preset lists, written from the one table
(``productbg.imaging.export.EXPORT_PRESETS``), so that the docs cannot drift from it.

    python scripts/gen_docs.py            # rewrite the generated parts (atomically)
    python scripts/gen_docs.py --check    # exit 1 naming each file that differs; write nothing

A generated part sits between marker comments, which Markdown does not show:
``<!-- gen:presets-names -->…<!-- /gen -->`` (the names) or ``<!-- gen:presets-sizes -->…<!-- /gen -->``
(names with sizes), never at the start of a line (CommonMark would make the line a raw HTML block).
``tests/test_gen_docs.py`` fails when a doc differs from the table.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Mapping, Sequence

from productbg.fileio import write_text_atomically
from productbg.imaging.export import EXPORT_PRESETS

REPO = Path(__file__).resolve().parent.parent
#: Each doc that lists the presets -> how many generated lists it holds.
DOCS = {"README.md": 1, "NODES.md": 2, "docs/cli.md": 1}
BLOCK = re.compile(r"(<!-- gen:presets-(names|sizes) -->)(.*?)(<!-- /gen -->)", re.S)
FIX = "run python scripts/gen_docs.py"


def size_text(width: int, height: int) -> str:
    """``2000²`` for a square, ``1080×1350`` otherwise."""
    return f"{width}²" if width == height else f"{width}×{height}"


def render(kind: str, presets: Mapping[str, tuple[int, int]] = EXPORT_PRESETS) -> str:
    """A generated list: ``names`` (```shopify`, `taobao`…``) or ``sizes`` (```shopify` 2048², …``)."""
    if kind == "names":
        return ", ".join(f"`{name}`" for name in presets)
    return ", ".join(f"`{name}` {size_text(w, h)}" for name, (w, h) in presets.items())


def regenerate(text: str, presets: Mapping[str, tuple[int, int]] = EXPORT_PRESETS) -> str:
    """``text`` with every generated list rewritten from ``presets``."""
    return BLOCK.sub(lambda m: m.group(1) + render(m.group(2), presets) + m.group(4), text)


def problems_in(name: str, text: str, expected_blocks: int,
                presets: Mapping[str, tuple[int, int]] = EXPORT_PRESETS) -> list[str]:
    """What is wrong with one doc's preset lists: a list that differs from ``presets``, a missing list, or a
    hand-written one (a line naming every preset outside the markers). [] when it matches."""
    found = []
    blocks = len(BLOCK.findall(text))
    if blocks != expected_blocks:
        found.append(f"{name}: {blocks} generated preset list(s), expected {expected_blocks} (markers lost?)")
    if re.search(r"^\s*<!-- gen:", text, re.M):
        found.append(f"{name}: a preset list's marker starts a line (Markdown would show it as raw HTML); put it "
                     "after some text on the line")
    if regenerate(text, presets) != text:
        found.append(f"{name}: a preset list differs from imaging.export.EXPORT_PRESETS; {FIX}")
    for number, line in enumerate(BLOCK.sub("", text).splitlines(), 1):
        if all(f"`{p}`" in line for p in presets):
            found.append(f"{name}:{number}: the presets listed by hand; put the list between "
                         "<!-- gen:presets-names --> (or -sizes) and <!-- /gen -->, then " + FIX)
    return found


def problems(repo: Path = REPO, presets: Mapping[str, tuple[int, int]] = EXPORT_PRESETS) -> list[str]:
    """Every doc's problems (see :func:`problems_in`); [] when the docs match the table."""
    return [p for name, count in DOCS.items()
            for p in problems_in(name, (repo / name).read_text(encoding="utf-8"), count, presets)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="name the docs that differ; write nothing")
    args = parser.parse_args(argv)
    if args.check:
        found = problems()
        for line in found:
            print(line, file=sys.stderr)
        return 1 if found else 0
    for name in DOCS:
        path = REPO / name
        text = path.read_text(encoding="utf-8")
        if regenerate(text) != text:
            write_text_atomically(path, regenerate(text))
            print(f"wrote {name}")
    found = problems()
    for line in found:
        print(line, file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
