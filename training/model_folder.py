"""Writing diffusers model folders atomically (full-UNet training and the demo model's stages).

A folder is written next to its destination under a temporary name and renamed into place; an existing
destination is moved aside first and removed only after the new folder is in place, so a reader sees either
the old folder or the complete new one, never a half-written mix.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ..fileio import default_file_mode


def replace_dir(tmp: Path, dest: Path) -> Path:
    """Move the finished folder ``tmp`` to ``dest`` (replacing it); returns ``dest``."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{tmp.name}")
        dest.rename(old)
    tmp.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


@contextlib.contextmanager
def staged_dir(dest: Path) -> Iterator[Path]:
    """A temporary folder beside ``dest`` to fill; it replaces ``dest`` when the block ends, and is removed
    instead if the block raises."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    os.chmod(tmp, default_file_mode(directory=True))  # mkdtemp makes it 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, dest)


def save_pretrained_atomic(model: Any, dest: Path, **kwargs: Any) -> Path:
    """``model.save_pretrained`` (safetensors) into ``dest`` atomically; returns ``dest``."""
    with staged_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **kwargs)
    return Path(dest)
