"""File helpers: the one atomic writer (a temporary file beside the destination, then ``os.replace``-d over
it: a reader never sees a half-written file, a crash leaves the previous one intact), and what a path that is
not a readable file is instead. JSON and PNG writing on top of it: :mod:`.jsonfile`, :mod:`.png`."""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

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


def not_a_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a regular file — ``no such file``, ``is a folder, not a file``, ``is a FIFO
    (named pipe), not a regular file`` … — or None when it is one (what a "not found" would misname)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "no such file"
    except OSError as e:
        return e.strerror or str(e)
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
    return f"is {kind}, not a regular file"


def write_atomically(path: str | os.PathLike, write: Callable[[Path], Any], fsync: bool = False) -> Path:
    """``write(tmp)`` into a temp file beside ``path``, then rename it over ``path``; no partial file either way.

    Args:
        path: the destination.
        write: fills the temp file (it may recreate it: the permissions are set again afterwards).
        fsync: flush the file to disk before the rename (weights: a power cut keeps the old file or the new).

    Returns:
        The destination path.
    """
    dest = Path(path)
    tmp = temp_beside(dest)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())  # writers that recreate the file (safetensors) make it 0600
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`write_atomically`)."""
    return write_atomically(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (:func:`write_atomically`)."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
