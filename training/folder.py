"""``productbg dataset build SRC OUT``: turn a user's folder of product photos into the BG60k layout.

Sources are either category sub-folders (``SRC/<category>/**/*.jpg``) or a CSV file with ``path`` and
``category`` columns (paths relative to the CSV's folder). A product mask comes from the image's alpha channel
first; without usable alpha, from the pack's segmentation (``productbg.imaging.segment``) when it is installed.
Anything else is skipped with the reason recorded.

The build is resumable: every finished source is appended to ``OUT/build_state.jsonl`` (after its image and
mask were written atomically), and a rerun reuses finished entries whose source did not change. Info files
and ``build_report.json`` are rewritten atomically at the end.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..fileio import write_bytes_atomically, write_text_atomically
from ..imaging.reading import read_image_file
from . import layout
from .bgsynth import png_bytes

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
STATE_FILE = "build_state.jsonl"
REPORT_FILE = "build_report.json"

#: ``(RGB image) -> float mask [H, W] in [0, 1] (1 = product)``
Segmenter = Callable[[Image.Image], np.ndarray]


@dataclass
class BuildReport:
    """What a build did.

    Attributes:
        written: entries written by this run.
        reused: entries finished by an earlier run and kept.
        skipped: ``(source, reason)`` for every source not in the dataset.
        categories: images per category in the result.
        mask_sources: how many masks came from ``"alpha"`` / ``"segmentation"``.
    """

    written: int = 0
    reused: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    categories: dict[str, int] = field(default_factory=dict)
    mask_sources: dict[str, int] = field(default_factory=dict)

    def render(self) -> str:
        """A few human lines."""
        lines = [f"{self.written} written, {self.reused} reused, {len(self.skipped)} skipped; "
                 f"{len(self.categories)} categories; masks from {self.mask_sources or 'nothing'}"]
        reasons: dict[str, int] = {}
        for _, why in self.skipped:
            reasons[why] = reasons.get(why, 0) + 1
        lines += [f"  skipped {n}: {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines)

    def to_json(self) -> dict:
        """JSON-able dict."""
        return {"written": self.written, "reused": self.reused, "skipped": [list(s) for s in self.skipped],
                "categories": self.categories, "mask_sources": self.mask_sources}


# ---------------------------------------------------------------------------------------------- sources
def list_sources(src: Path) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    """(image path, category) pairs in a stable order, and sources skipped before reading them."""
    src = Path(src)
    if src.is_file() and src.suffix.lower() == ".csv":
        return _csv_sources(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a folder or a .csv file")
    found, skipped = [], []
    for entry in sorted(src.iterdir()):
        if entry.is_dir():
            found += [(p, entry.name) for p in sorted(entry.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            skipped.append((str(entry), "not inside a category sub-folder"))
    return found, skipped


def _csv_sources(path: Path) -> tuple[list[tuple[Path, str]], list[tuple[str, str]]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "category"]:
        rows = rows[1:]
    found, skipped = [], []
    for i, row in enumerate(rows, 1):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            skipped.append((f"{path.name} row {i}", "needs a path and a category"))
            continue
        p = Path(row[0].strip())
        found.append((p if p.is_absolute() else path.parent / p, row[1].strip()))
    return found, skipped


# ---------------------------------------------------------------------------------------------- masks
def default_segmenter() -> Segmenter | None:
    """The pack's weight-free segmentation (``productbg.imaging.segment.segment_product``), if installed."""
    try:  # guarded: imaging.segment needs OpenCV; without it folders are built from alpha only
        from ..imaging.segment import segment_product
    except ImportError:
        return None

    def segment(im: Image.Image) -> np.ndarray:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        return np.asarray(segment_product(rgb, "auto", clean_edges=False).mask, dtype=np.float32)

    return segment


def alpha_mask(im: Image.Image) -> np.ndarray | None:
    """Product mask from the alpha channel (opaque = product), or None when there is no usable alpha."""
    if im.mode not in ("RGBA", "LA", "PA") and not (im.mode == "P" and "transparency" in im.info):
        return None
    alpha = np.asarray(im.convert("RGBA"))[..., 3]
    if alpha.min() >= 250:  # fully opaque: the alpha says nothing
        return None
    return (alpha >= 128).astype(np.float32)


def read_upright_srgb(path: Path) -> Image.Image:
    """An 8-bit RGB / RGBA image read the way every input path reads (EXIF orientation applied, ICC profile
    converted to sRGB, 16-bit and CMYK handled: ``productbg.imaging.reading``)."""
    loaded = read_image_file(path)
    data = loaded.rgb if loaded.alpha is None else np.dstack([loaded.rgb, loaded.alpha])
    return Image.fromarray((np.clip(data, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def _on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _prepare(path: Path, segmenter: Segmenter | None, max_side: int | None) -> tuple[Image.Image, np.ndarray, str] | str:
    """(RGB image, mask, mask source) or the reason the source is skipped."""
    try:
        im = read_upright_srgb(path)
        mask = alpha_mask(im)
        rgb = _on_white(im) if mask is not None else im.convert("RGB")
    except Exception as e:
        return f"unreadable image ({type(e).__name__})"
    origin = "alpha"
    if mask is None:
        if segmenter is None:
            return "no alpha channel and no segmentation available (productbg.imaging.segment)"
        try:
            mask, origin = (np.asarray(segmenter(rgb), dtype=np.float32) >= 0.5).astype(np.float32), "segmentation"
        except ValueError as e:  # too small, a single colour …: this source only
            return f"cannot segment it: {' '.join(str(e).split())}"
    if mask.shape != (rgb.size[1], rgb.size[0]):
        return f"mask size {mask.shape[::-1]} differs from image size {rgb.size}"
    if not mask.any():
        return "empty mask (no product found)"
    if mask.all():
        return "mask covers the whole image (no background)"
    return _limit(rgb, mask, max_side) + (origin,)


def _limit(rgb: Image.Image, mask: np.ndarray, max_side: int | None) -> tuple[Image.Image, np.ndarray]:
    if not max_side or max(rgb.size) <= max_side:
        return rgb, mask
    scale = max_side / max(rgb.size)
    size = (max(1, round(rgb.size[0] * scale)), max(1, round(rgb.size[1] * scale)))
    m = Image.fromarray((mask * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    return rgb.resize(size, Image.LANCZOS), (np.asarray(m) >= 128).astype(np.float32)


# ---------------------------------------------------------------------------------------------- state
def _fingerprint(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _load_state(out: Path) -> dict[str, dict]:
    """Finished entries of earlier runs, by source key (a truncated last line is ignored)."""
    state: dict[str, dict] = {}
    path = out / STATE_FILE
    if not path.is_file():
        return state
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        state[entry["key"]] = entry
    return state


def _append_state(out: Path, entry: dict) -> None:
    with (out / STATE_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _split_of(key: str, held_out: float) -> str:
    h = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "bg1k" if h < held_out else "bg60k"


def _reusable(out: Path, entry: dict | None, fingerprint: str) -> bool:
    if entry is None or entry.get("fingerprint") != fingerprint:
        return False
    if "file" not in entry:
        return True  # a recorded skip of an unchanged source
    return (layout.image_path(out, entry["split"], entry["file"]).is_file()
            and layout.mask_path(out, entry["split"], entry["file"]).is_file())


# ---------------------------------------------------------------------------------------------- build
def build_from_folder(src: str | Path, out: str | Path, *, held_out: float = 0.0, max_side: int | None = None,
                      segmenter: Segmenter | None | str = "auto",
                      progress: Callable[[int, int], None] | None = None) -> BuildReport:
    """Build (or finish building) a BG60k-layout dataset from a user's folder or CSV.

    Args:
        src: folder with one sub-folder per category, or a CSV file (``path,category``).
        out: destination folder (created).
        held_out: fraction of sources put in the held-out ``bg1k`` split (chosen by a hash of the source).
        max_side: downscale images whose longer side exceeds this.
        segmenter: mask function for images without alpha; ``"auto"`` uses ``productbg.imaging.segment`` when
            installed, ``None`` uses alpha only.
        progress: called as ``progress(done, total)``.

    Returns:
        The :class:`BuildReport` (also written to ``OUT/build_report.json``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seg = default_segmenter() if segmenter == "auto" else segmenter
    sources, report_skips = list_sources(Path(src))
    report = BuildReport(skipped=list(report_skips))
    state, src_root = _load_state(out), Path(src) if Path(src).is_dir() else Path(src).parent
    next_n = _next_numbers(state)
    done: list[dict] = []
    for i, (path, category) in enumerate(sources):
        entry = _build_one(out, path, category, src_root, state, next_n, seg, held_out, max_side, report)
        if entry is not None and "file" in entry:
            done.append(entry)
        if progress:
            progress(i + 1, len(sources))
    _finish(out, done, report)
    return report


def _next_numbers(state: dict[str, dict]) -> dict[str, int]:
    nums = {s: 0 for s in layout.SPLITS}
    for e in state.values():
        if "file" in e:
            nums[e["split"]] = max(nums[e["split"]], int(e["file"].split(".")[0]) + 1)
    return nums


def _build_one(out: Path, path: Path, category: str, src_root: Path, state: dict[str, dict],
               next_n: dict[str, int], seg: Segmenter | None, held_out: float, max_side: int | None,
               report: BuildReport) -> dict | None:
    key = _key(path, category, src_root)
    if not path.is_file():
        report.skipped.append((str(path), "file not found"))
        return None
    fingerprint = _fingerprint(path)
    if _reusable(out, state.get(key), fingerprint):
        entry = state[key]
        if "file" in entry:
            report.reused += 1
        else:
            report.skipped.append((str(path), entry["skipped"]))
        return entry
    prepared = _prepare(path, seg, max_side)
    entry = {"key": key, "fingerprint": fingerprint, "category": category}
    if isinstance(prepared, str):
        report.skipped.append((str(path), prepared))
        _append_state(out, {**entry, "skipped": prepared})
        return None
    rgb, mask, origin = prepared
    split = _split_of(key, held_out)
    entry.update(split=split, file=f"{next_n[split]}.png", mask_source=origin)
    next_n[split] += 1
    write_bytes_atomically(layout.mask_path(out, split, entry["file"]), png_bytes((mask * 255).astype(np.uint8)))
    write_bytes_atomically(layout.image_path(out, split, entry["file"]), png_bytes(np.asarray(rgb)))
    _append_state(out, entry)
    report.written += 1
    return entry


def _key(path: Path, category: str, src_root: Path) -> str:
    try:
        rel = path.resolve().relative_to(src_root.resolve()).as_posix()
    except ValueError:
        rel = str(path.resolve())
    return f"{category}\t{rel}"


def _finish(out: Path, done: list[dict], report: BuildReport) -> None:
    for split in layout.SPLITS:
        rows = sorted(((e["file"], e["category"]) for e in done if e["split"] == split),
                      key=lambda r: int(r[0].split(".")[0]))
        write_text_atomically(layout.info_path(out, split), layout.info_text(rows))
    for e in done:
        report.categories[e["category"]] = report.categories.get(e["category"], 0) + 1
        report.mask_sources[e["mask_source"]] = report.mask_sources.get(e["mask_source"], 0) + 1
    write_text_atomically(out / REPORT_FILE, json.dumps(report.to_json(), ensure_ascii=False, indent=1))

