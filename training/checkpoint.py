"""Atomic training checkpoints: ``OUT/checkpoints/step-000010/``.

A checkpoint is written into ``step-000010.tmp/`` and renamed when complete. Its last file is
``manifest.json`` (every file's size and SHA-256), so a folder is trusted only when its manifest is present and
matches: a ``.tmp`` folder, or a folder whose manifest is missing or wrong (a crash, a copy cut short), is
reported and skipped, and ``--resume latest`` falls back to the newest good checkpoint.

Files::

    trainable.safetensors   the trained tensors (LoRA, identifier vectors, style projection ...)
    state.json / .safetensors   step, data position, loss-log offset, optimizer, LR scheduler, grad scaler
    rng-<rank>.json / .safetensors   Python, numpy and torch RNG states of each process
    manifest.json
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fileio import default_file_mode

PREFIX = "step-"
TMP_SUFFIX = ".tmp"
MANIFEST = "manifest.json"
_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(root: Path, step: int) -> Path:
    """``root/step-{step:06d}``."""
    return Path(root) / f"{PREFIX}{step:06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def begin(root: Path, step: int) -> Path:
    """A fresh, empty ``step-XXXXXX.tmp`` folder to write a checkpoint into."""
    tmp = checkpoint_dir(root, step).with_name(f"{PREFIX}{step:06d}{TMP_SUFFIX}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, meta: dict[str, Any]) -> Path:
    """Write the manifest (last), fsync, and rename ``.tmp`` into place. Returns the final folder."""
    files = {}
    mode = default_file_mode()
    for p in sorted(tmp.iterdir()):
        os.chmod(p, mode)  # safetensors writes 0600; every other file of a run gets the usual umask mode
        with p.open("rb") as f:
            os.fsync(f.fileno())
        files[p.name] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    (tmp / MANIFEST).write_text(json.dumps({"files": files, **meta}, indent=1))
    with (tmp / MANIFEST).open("rb") as f:
        os.fsync(f.fileno())
    final = tmp.with_name(tmp.name[: -len(TMP_SUFFIX)])
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted, or None when it is complete."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no valid manifest.json (written partially)"
    for name, info in files.items():
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != info["size"]:
            return f"{name} has {p.stat().st_size} bytes, the manifest says {info['size']}"
        if _sha256(p) != info["sha256"]:
            return f"{name} does not match its checksum"
    return None


@dataclass(frozen=True)
class Found:
    """A usable checkpoint and the folders skipped to find it."""

    path: Path | None
    step: int
    skipped: tuple[tuple[Path, str], ...]


def find_latest(root: Path) -> Found:
    """The newest complete checkpoint under ``root`` (half-written ones are skipped and reported)."""
    root = Path(root)
    skipped: list[tuple[Path, str]] = []
    if not root.is_dir():
        return Found(None, 0, ())
    candidates = []
    for p in root.iterdir():
        if p.name.endswith(TMP_SUFFIX):
            skipped.append((p, "half-written (.tmp)"))
        elif (m := _DIR.match(p.name)) and p.is_dir():
            candidates.append((int(m.group(1)), p))
    for step, p in sorted(candidates, reverse=True):
        why = problem(p)
        if why is None:
            return Found(p, step, tuple(skipped))
        skipped.append((p, why))
    return Found(None, 0, tuple(skipped))


def resolve(root: Path, resume: str) -> Found:
    """``resume`` = ``"latest"`` or a checkpoint folder; warns about every skipped folder."""
    if resume == "latest":
        found = find_latest(root)
    else:
        p = Path(resume)
        why = problem(p)
        if why is not None:
            raise FileNotFoundError(f"{p}: not a usable checkpoint ({why})")
        m = _DIR.match(p.name)
        found = Found(p, int(m.group(1)) if m else json.loads((p / MANIFEST).read_text())["step"], ())
    for p, why in found.skipped:
        warnings.warn(f"skipping checkpoint {p.name}: {why}", stacklevel=2)
    return found


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and stale ``.tmp`` folders."""
    if keep <= 0:
        return
    done = sorted((int(m.group(1)), p) for p in Path(root).iterdir() if (m := _DIR.match(p.name)))
    for _, p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(root).glob(f"*{TMP_SUFFIX}"):
        shutil.rmtree(p, ignore_errors=True)
