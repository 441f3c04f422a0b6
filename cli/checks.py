"""Checks every command runs before any work: option values (argparse types), input files, output locations.

Option types raise :class:`argparse.ArgumentTypeError`, so argparse names the flag (``argument --cfg: ...``).
The file checks raise :class:`~productbg.cli.errors.CliError` whose message names the option.
Nothing here creates or changes a file, except a probe file that is removed at once.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ..fileio import not_a_file
from ..imaging.folder import ProductFolderError, check_image_file
from .errors import CliError

#: Seeds are 64-bit signed integers in torch and the manifests; the last image's seed must fit too.
MAX_SEED = 2 ** 63 - 1
NAME_MAX = 255
DEVICE_PATTERN = re.compile(r"^(cpu|mps|meta|(cuda|xpu)(:\d{1,3})?)$")


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
            from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _fmt(x: float) -> str:
    return f"{int(x):,}".replace(",", "_") if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def number(low: float | None = None, high: float | None = None, *, kind: type = float,
           low_open: bool = False, multiple: int | None = None, hint: str = "") -> Callable[[str], float | int]:
    """An argparse ``type``: a finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    def parse(text: str) -> float | int:
        value = _number(text, kind)
        too_low = low is not None and (value <= low if low_open else value < low)
        if too_low or (high is not None and value > high):
            lo = "" if low is None else f"{'above' if low_open else 'at least'} {_fmt(low)}"
            hi = "" if high is None else f"at most {_fmt(high)}"
            raise argparse.ArgumentTypeError(f"must be {' and '.join(p for p in (lo, hi) if p)}{hint}, got {text}")
        if multiple and value % multiple:
            raise argparse.ArgumentTypeError(f"must be a multiple of {multiple}, got {text}")
        return value

    parse.__name__ = "integer" if kind is int else "number"  # argparse's "invalid <name> value" wording
    return parse


def integer(low: int | None = None, high: int | None = None, **kw) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high]``."""
    return number(low, high, kind=int, **kw)  # type: ignore[return-value]


seed = integer(0, MAX_SEED)


def device(text: str) -> str:
    """An argparse ``type``: ``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``xpu[:N]``."""
    if not DEVICE_PATTERN.match(text.strip()):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N or mps")
    return text.strip()


def check_device(name: str, flag: str = "--device") -> str:
    """The device when this machine has it; CliError otherwise."""
    kind, _, index = name.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"{flag} {name}: no CUDA GPU is available to torch on this machine; use {flag} cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise CliError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                           f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CliError(f"{flag} mps: Apple's MPS backend is not available here; use {flag} cpu")
    if kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise CliError(f"{flag} {name}: no XPU is available here; use {flag} cpu")
    if kind == "meta":
        raise CliError(f"{flag} meta holds no data; use {flag} cpu or cuda")
    return name


# ---------------------------------------------------------------------------------------------- inputs
def input_file(path: str | os.PathLike, flag: str) -> Path:
    """An existing regular file; CliError saying what the path is instead."""
    p = Path(path)
    problem = not_a_file(p)
    if problem:
        raise CliError(f"{flag} {p}: {problem}")
    if not os.access(p, os.R_OK):
        raise CliError(f"{flag} {p}: permission denied (cannot read it)")
    return p


def input_dir(path: str | os.PathLike, flag: str) -> Path:
    """An existing folder; CliError saying what the path is instead."""
    p = Path(path)
    if p.is_file():
        raise CliError(f"{flag} {p}: is a file, not a folder")
    if not p.is_dir():
        raise CliError(f"{flag} {p}: no such folder")
    return p


def input_image(path: str | os.PathLike, flag: str) -> Path:
    """A readable image within the pixel limit, decoded once in full (truncated files are found here)."""
    p = input_file(path, flag)
    try:
        check_image_file(p)
    except ProductFolderError as e:
        raise CliError(f"{flag}: {e}") from None
    return p


# ---------------------------------------------------------------------------------------------- outputs
def _short_names(p: Path, flag: str) -> None:
    for part in p.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise CliError(f"{flag}: the name {part[:40]}... is longer than {NAME_MAX} bytes (the file system's "
                           "limit); choose a shorter one")


def _nearest_existing(p: Path, flag: str) -> Path:
    """The deepest existing ancestor of ``p`` (a folder); CliError when one on the way is a file."""
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CliError(f"{flag} {p}: {ancestor} is a file, not a folder")
    for a in [ancestor, *ancestor.parents]:
        if a.exists() and not a.is_dir():
            raise CliError(f"{flag} {p}: {a} is a file, not a folder")
    return ancestor


def _probe(folder: Path, target: Path, flag: str) -> None:
    """CliError unless a file can be created in ``folder`` (the probe is removed at once, and the folder's
    times restored, so a failed command leaves its output location exactly as it was)."""
    times = folder.stat()
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".productbg-probe-")
    except OSError as e:
        raise CliError(f"{flag} {target}: cannot write in {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(name)
    try:
        os.utime(folder, ns=(times.st_atime_ns, times.st_mtime_ns))
    except OSError:
        pass


def output_file(path: str | os.PathLike, flag: str, force: bool = True) -> Path:
    """A file path that can be written (its folder may be missing); CliError naming the option otherwise."""
    p = Path(path)
    _short_names(p, flag)
    if p.is_dir():
        raise CliError(f"{flag} {p}: is an existing folder; give a file name")
    if p.exists() and not force:
        raise CliError(f"{flag} {p}: exists; pass --force to overwrite it")
    if p.exists() and not p.is_file():
        raise CliError(f"{flag} {p}: is not a regular file")
    if str(path).endswith(os.sep) or not p.name:
        raise CliError(f"{flag} {p}: give a file name, not a folder")
    _probe(_nearest_existing(p, flag), p, flag)
    return p


def output_dir(path: str | os.PathLike, flag: str) -> Path:
    """A folder that exists or can be created, and can be written in; CliError naming the option otherwise."""
    p = Path(path)
    _short_names(p, flag)
    if p.exists() and not p.is_dir():
        raise CliError(f"{flag} {p}: is a file, not a folder")
    _probe(p if p.is_dir() else _nearest_existing(p, flag), p, flag)
    return p
