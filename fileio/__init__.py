"""Temporary files for atomic writes: written beside the destination, then ``os.replace``-d over it."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"


def temp_beside(path: Path) -> Path:
    """An empty temporary file in ``path``'s folder (created if missing), on the same filesystem so that
    ``os.replace`` is atomic, with the permissions a plain ``open()`` would give (``mkstemp`` makes it 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    os.chmod(tmp, default_file_mode())
    return Path(tmp)


def default_file_mode(directory: bool = False) -> int:
    """The permissions a new file (``open()``) or folder (``mkdir()``) gets: 0o666 / 0o777 less the umask."""
    current = os.umask(0)
    os.umask(current)
    return (0o777 if directory else 0o666) & ~current
