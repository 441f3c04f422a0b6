"""Result files, written atomically (temp file in the same folder + ``os.replace``).

One generated item is a folder::

    <item>/image_0.png ...   final images (product pasted back); with an export: image_0.jpg / .webp / .png
                             at the export size (sRGB profile embedded), the product at native resolution
           raw_0.png ...     the generator's images before paste-back (for evaluation; generation size)
           placed.png        the product on its canvas;  mask.png  its mask (255 = product)
           result.json       written last: what was made, with which settings, and the preservation reports

``result.json`` is the item's commit marker: an item is finished exactly when it exists and names files that
all exist. A process killed mid-item leaves at most hidden ``.*.tmp`` files, removed by the next run.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence


from ..fileio import TMP_SUFFIX, write_bytes_atomically
from ..fileio.jsonfile import write_json
from ..fileio.png import save_png

RESULT_FILE = "result.json"


def save_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write an already encoded file (an export's PNG / JPEG / WebP) atomically."""
    return write_bytes_atomically(path, data)


def save_result_image(result: Any, path: str | os.PathLike) -> Path:
    """A :class:`~productbg.pipeline.pipeline.Result`'s delivered image: its export's encoded file when it
    has one (``path``'s suffix replaced by the export's), else its canvas image as PNG."""
    path = Path(path)
    export = getattr(result, "export", None)
    if export is not None:
        same = {".jpeg": "jpeg", ".jpg": "jpeg", ".png": "png", ".webp": "webp"}.get(path.suffix.lower())
        return save_bytes(export.data, path if same == export.format else path.with_suffix(export.extension))
    return save_png(result.image, path.with_suffix(".png"))


def export_meta(result: Any) -> dict[str, Any]:
    """``result.json`` fields of an exported result: ``export`` (size, format, quality, profile, layout,
    upscaler) and ``input`` (what reading the photo did: orientation, ICC conversion)."""
    meta: dict[str, Any] = {"input": getattr(result, "input", {}) or {}}
    if getattr(result, "export", None) is not None:
        meta["export"] = result.export.describe()
    return meta


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
    return _load_result(Path(folder))[0]


def unfinished_reason(folder: str | os.PathLike) -> str:
    """Why ``folder`` is not a finished item (what :func:`read_result` found missing), for messages."""
    return _load_result(Path(folder))[1] or "finished"


def _load_result(folder: Path) -> tuple[dict | None, str]:
    """(the complete item's ``result.json``, "") or (None, why the item is unfinished)."""
    rerun = "rerun the command that wrote it to finish it"
    try:
        data = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"unfinished: no {RESULT_FILE} (the run writing this item stopped before the end); {rerun}"
    except (OSError, ValueError) as e:
        return None, f"{RESULT_FILE} cannot be read ({' '.join(str(e).split())}); {rerun}"
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not data["images"]:
        return None, f"{RESULT_FILE} lists no images; {rerun}"
    names = [*data["images"], *data.get("raw", []), data.get("placed"), data.get("mask")]
    missing = [str(n) for n in names if not (isinstance(n, str) and "/" not in n and (folder / n).is_file())]
    if missing:
        return None, f"{RESULT_FILE} names missing files ({', '.join(missing[:3])}); {rerun}"
    return data, ""


_NUMBERED = re.compile(r"^(image|raw)_(\d+)\.(png|jpg|webp)$")
_ITEM_NAME = r"(result\.json|placed\.png|mask\.png|(image|raw)_\d+\.(png|jpg|webp))"
#: An item's files, and the hidden temp files (``.<name>.<random>.tmp``) a killed writer leaves.
_ITEM_FILE = re.compile(rf"^{_ITEM_NAME}$|^\.{_ITEM_NAME}\..*{re.escape(TMP_SUFFIX)}$")


def item_folders(root: str | os.PathLike) -> list[Path]:
    """Every folder at or below ``root`` holding an item's files (finished or not), sorted."""
    return sorted({p.parent for p in Path(root).rglob("*") if _ITEM_FILE.match(p.name) and p.is_file()})


def _remove_extra_images(folder: Path, count: int, image_ext: str = "png") -> None:
    """Delete ``image_<k>.*`` / ``raw_<k>.png`` with ``k >= count`` a previous, larger run left, and images of
    another format (and an old ``result.json``, so the item is unfinished until the new one is written)."""
    if not folder.is_dir():
        return
    (folder / RESULT_FILE).unlink(missing_ok=True)
    for p in folder.iterdir():
        m = _NUMBERED.match(p.name)
        other_format = m is not None and m.group(1) == "image" and m.group(3) != image_ext
        if m and (int(m.group(2)) >= count or other_format) and p.is_file():
            p.unlink(missing_ok=True)


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
    export = getattr(first, "export", None)
    _remove_extra_images(folder, len(results), export.extension[1:] if export is not None else "png")
    save_png(first.placed, folder / "placed.png")
    save_png(first.mask, folder / "mask.png")
    images, raws = [], []
    for k, r in enumerate(results):
        images.append(save_result_image(r, folder / f"image_{k}.png").name)
        raws.append(save_png(r.raw, folder / f"raw_{k}.png").name)
    data = dict(meta, images=images, raw=raws, placed="placed.png", mask="mask.png",
                seeds=[r.seed for r in results], prompt=first.prompt, reports=[r.report for r in results],
                **export_meta(first))
    if export is not None:
        data["canvas_reports"] = [r.canvas_report for r in results]
    write_json(data, folder / RESULT_FILE)
    return data
