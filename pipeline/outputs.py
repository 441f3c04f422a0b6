"""Result files, written atomically (temp file in the same folder + ``os.replace``).

One generated item is a folder::

    <item>/image_0.png ...   final images (product pasted back)
           raw_0.png ...     the generator's images before paste-back (for evaluation)
           placed.png        the product on its canvas;  mask.png  its mask (255 = product)
           result.json       written last: what was made, with which settings, and the preservation reports

``result.json`` is the item's commit marker: an item is finished exactly when it exists and names files that
all exist. A process killed mid-item leaves at most hidden ``.*.tmp`` files, removed by the next run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..fileio import TMP_SUFFIX, temp_beside

RESULT_FILE = "result.json"
PNG_LEVEL = 1  # fast zlib level: files ≈10% larger, encoding several times faster than the default 6


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float 0..1 image or mask → uint8 (rounded)."""
    return (np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _commit(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an ``[H, W, 3]`` image or ``[H, W]`` mask (float 0..1 or uint8) as PNG, atomically."""
    path = Path(path)
    data = image if np.asarray(image).dtype == np.uint8 else to_uint8(image)
    tmp = temp_beside(path)
    try:
        Image.fromarray(np.ascontiguousarray(data)).save(tmp, format="PNG", compress_level=PNG_LEVEL)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _commit(tmp, path)
    return path


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write JSON (UTF-8, indented) atomically."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False, default=_jsonable) + "\n", encoding="utf-8")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _commit(tmp, path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete the hidden temp files a killed writer left in ``folder``; how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def read_result(folder: str | os.PathLike) -> dict | None:
    """The item's ``result.json`` when the item is complete (every file it names exists), else None."""
    folder = Path(folder)
    try:
        data = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not data["images"]:
        return None
    names = [*data["images"], *data.get("raw", []), data.get("placed"), data.get("mask")]
    if not all(isinstance(n, str) and "/" not in n and (folder / n).is_file() for n in names):
        return None
    return data


def write_item(folder: str | os.PathLike, results: Sequence[Any], meta: dict[str, Any]) -> dict:
    """Write one item's images, then its ``result.json`` (the commit marker).

    Args:
        folder: the item's folder (created).
        results: :class:`~productbg.pipeline.pipeline.Result` objects of one product (same canvas).
        meta: extra fields for ``result.json`` (row, product, category, settings ...).

    Returns:
        The ``result.json`` content.
    """
    folder = Path(folder)
    first = results[0]
    save_png(first.placed, folder / "placed.png")
    save_png(first.mask, folder / "mask.png")
    images, raws = [], []
    for k, r in enumerate(results):
        images.append(save_png(r.image, folder / f"image_{k}.png").name)
        raws.append(save_png(r.raw, folder / f"raw_{k}.png").name)
    data = dict(meta, images=images, raw=raws, placed="placed.png", mask="mask.png",
                seeds=[r.seed for r in results], prompt=first.prompt, reports=[r.report for r in results])
    write_json(data, folder / RESULT_FILE)
    return data
