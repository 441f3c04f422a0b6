"""The BG60k folder layout (PAPER.md), shared by the reader, the folder builder and BG-synth.

::

    bg60k_info.txt           "N.png<TAB>category" per line (training set)
    bg60k_imgs_{i}/N.png     RGB image, i = N mod 10
    bg60k_masks_{i}/N.png    product mask (white = product)
    bg1k_info.txt            the held-out set, same columns
    bg1k_imgs_{i}/N.png, bg1k_masks_{i}/N.png
    bgpair_info.txt          "image<TAB>reference<TAB>category" (image: a bg1k file, reference: a bg60k file)
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable


SPLITS = ("bg60k", "bg1k")
PAIRS_FILE = "bgpair_info.txt"
_NAME = re.compile(r"^(\d+)\.png$")


def info_path(root: Path, split: str) -> Path:
    """``root/<split>_info.txt``."""
    return Path(root) / f"{split}_info.txt"


def file_number(name: str) -> int | None:
    """N of ``N.png``, or None when the name does not follow the layout."""
    m = _NAME.match(name)
    return int(m.group(1)) if m else None


def image_path(root: Path, split: str, name: str) -> Path:
    """Where ``name`` (``N.png``) lives: ``root/<split>_imgs_{N mod 10}/N.png``."""
    return Path(root) / f"{split}_imgs_{_bucket(name)}" / name


def mask_path(root: Path, split: str, name: str) -> Path:
    """Where the mask of ``name`` lives: ``root/<split>_masks_{N mod 10}/N.png``."""
    return Path(root) / f"{split}_masks_{_bucket(name)}" / name


def _bucket(name: str) -> int:
    n = file_number(name)
    if n is None:
        raise ValueError(f"file name {name!r} does not follow the BG60k layout 'N.png'")
    return n % 10


def info_text(rows: Iterable[tuple[str, ...]]) -> str:
    """Tab-separated lines, one row each, newline-terminated."""
    return "".join("\t".join(r) + "\n" for r in rows)
