"""Preview thumbnails of a bank's categories: small PNGs in a folder beside the bank file.

``bank.safetensors`` has its previews in ``bank.previews/``, one PNG per category, named by a hash of the
category's name (names may hold any script, slashes or 256 characters; file names may not)::

    models/productbg/banks/bg60k.safetensors
    models/productbg/banks/bg60k.previews/3f2a…c1.png      # preview_file_name("运动鞋")

The bank file's format is untouched: a bank without the folder simply has no previews, and every productbg reads
it. ``productbg bank preview`` writes one (from any image: it is shrunk to fit 128 px and saved as PNG),
``rename`` / ``remove`` / ``merge`` carry them along, and the ComfyUI category list shows them. Writes are
atomic; a preview is read only when it is a regular PNG file inside the folder (no symlink), at most
:data:`MAX_PREVIEW_BYTES`.
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image

from ..fileio import write_atomically
from .bank_names import normalize
from .errors import WeightsError

PREVIEW_SIDE = 128
MAX_PREVIEW_BYTES = 2_000_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUFFIX = ".previews"


def previews_dir(bank_path: str | os.PathLike) -> Path:
    """The folder that holds a bank's previews: ``x.safetensors`` -> ``x.previews``."""
    p = Path(bank_path)
    return p.with_name(p.stem + SUFFIX)


def preview_file_name(name: str) -> str:
    """The file name of a category's preview (a hash of its stored, NFC-normalised name)."""
    return hashlib.sha256(normalize(name).encode("utf-8")).hexdigest()[:40] + ".png"


def preview_names(bank_path: str | os.PathLike) -> set[str]:
    """File names present in the bank's preview folder (one directory read; empty when there is none)."""
    folder = previews_dir(bank_path)
    try:
        with os.scandir(folder) as it:
            return {e.name for e in it if e.name.endswith(".png") and e.is_file(follow_symlinks=False)}
    except (FileNotFoundError, NotADirectoryError):
        return set()
    except OSError:
        return set()


def has_previews(bank_path: str | os.PathLike, names: list[str]) -> list[bool]:
    """For each category name, whether the bank has a preview for it."""
    present = preview_names(bank_path)
    return [preview_file_name(n) in present for n in names] if present else [False] * len(names)


def read_preview(bank_path: str | os.PathLike, name: str) -> bytes | None:
    """A category's preview PNG bytes, or None when it has none (or the file is not a plain PNG of ours)."""
    path = previews_dir(bank_path) / preview_file_name(name)
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_PREVIEW_BYTES or st.st_size < len(PNG_SIGNATURE):
        return None
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_PREVIEW_BYTES + 1)
    except OSError:
        return None
    return data if data.startswith(PNG_SIGNATURE) and len(data) <= MAX_PREVIEW_BYTES else None


def _write_bytes(dest: Path, data: bytes) -> None:
    write_atomically(dest, lambda tmp: tmp.write_bytes(data), fsync=True)


def encode_preview(image, side: int = PREVIEW_SIDE) -> bytes:
    """PNG bytes of ``image`` (a PIL image, or an ``[H, W, 3]`` uint8 / 0..1 float array or tensor) shrunk to fit
    ``side`` px."""
    if not isinstance(image, Image.Image):
        array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise WeightsError(f"a preview must be an [height, width, 3] image, got shape {list(array.shape)}")
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float64), 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(array[..., :3])
    image = image.convert("RGB")
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_preview(bank_path: str | os.PathLike, name: str, image) -> Path:
    """Write (atomically) a category's preview from an image (or PNG bytes); returns the file written."""
    data = image if isinstance(image, bytes) else encode_preview(image)
    if not data.startswith(PNG_SIGNATURE) or len(data) > MAX_PREVIEW_BYTES:
        raise WeightsError(f"preview of '{name}' must be a PNG of at most {MAX_PREVIEW_BYTES} bytes")
    dest = previews_dir(bank_path) / preview_file_name(name)
    _write_bytes(dest, data)
    return dest


def remove_preview(bank_path: str | os.PathLike, name: str) -> bool:
    """Delete a category's preview; whether there was one. An emptied folder is removed."""
    folder = previews_dir(bank_path)
    try:
        (folder / preview_file_name(name)).unlink()
    except FileNotFoundError:
        return False
    try:
        folder.rmdir()  # only when empty
    except OSError:
        pass
    return True


def copy_previews(pairs: list[tuple[Path, str, str]], dest_bank: str | os.PathLike) -> int:
    """Copy previews to ``dest_bank``'s folder: each ``(source bank, source name, new name)``; returns how many
    were copied (categories without a preview are skipped). The bytes are read before anything is written, so
    a source that is also the destination is safe."""
    found = [(new, read_preview(src, old)) for src, old, new in pairs]
    found = [(new, data) for new, data in found if data is not None]
    for new, data in found:
        write_preview(dest_bank, new, data)
    return len(found)
