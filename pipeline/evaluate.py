"""Evaluate generated product images: preservation, style, category consistency, FID.

Per image (what its files allow):

* ``psnr_before_db`` / ``psnr_after_db``: masked PSNR inside the product of the generator's image (before
  paste-back) and of the final image, against the placed product;
* ``delta_e_before`` / ``delta_e_after``: mean CIEDE2000 colour drift inside the product;
* ``expansion``: object expansion E / product area, with the output's product mask found by GrabCut seeded
  from the input mask (so growth is detected within a band of 3 % of the canvas around the product);
* ``style_similarity``: cosine similarity of the backgrounds (products removed) of the image and its reference.

Over the set: ``category_consistency`` (leave-one-out nearest-category-centroid accuracy of background
embeddings, with mean cosine within / between categories) and FID through a maintained library, only when
the library and its Inception weights are already on disk (never downloaded); otherwise it is skipped with the
reason. Embeddings come from a CLIP vision model when given, else a colour histogram (no weights).

Every per-image metric is measured at the **generation size**, the size of the item's ``mask.png`` /
``placed.png`` / ``raw_<k>.png``: an export (``--export``: the same picture delivered larger, its aspect up to
the canvas' rounding to 8-px cells) is area-resized to that canvas first. Those reference files exist only at
that size, so this is the one size at which before/after and every item compare alike; the delivered file's
own preservation is measured when it is written (``result.json``'s ``reports``).

What cannot be evaluated is listed under ``failed`` with its reason, and the rest is still evaluated: an
unreadable file, an image of another aspect than its mask, a bad manifest row, an unfinished item folder (no
complete ``result.json``), and the rows a batch's ``summary.json`` lists as failed (never generated).
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .. import imaging
from ..fileio import not_a_file
from ..imaging.composite import resize_image
from ..imaging.fill import fill_product_hwc
from .errors import PipelineError
from .fid import compute_fid
from .image_files import load_mask, load_rgb
from .outputs import RESULT_FILE, item_folders, read_result, unfinished_reason

#: The canvas is rounded to 8-px cells (the VAE's factor): an export may differ from its aspect by one cell.
CELL = 8
SUMMARY_FILE = "summary.json"
METRICS = ("psnr_before_db", "psnr_after_db", "delta_e_before", "delta_e_after", "expansion", "style_similarity")


@dataclass(frozen=True)
class EvalItem:
    """One image to evaluate; files that are None limit which metrics apply."""

    name: str
    image: Path
    mask: Path | None = None
    placed: Path | None = None
    raw: Path | None = None
    category: str | None = None
    reference: Path | None = None
    error: str | None = None  # why it cannot be evaluated (listed under "failed")


# ---------------------------------------------------------------------------------------------- inputs
def collect_items(source: str | os.PathLike) -> list[EvalItem]:
    """Items of a results folder (every complete ``result.json`` below it) or of a results manifest.

    A manifest (``.csv`` with a header / ``.jsonl``) has ``image`` (required), ``mask``, ``placed``, ``raw``,
    ``category`` and ``reference``; relative paths are relative to the manifest.

    Items that cannot be evaluated carry ``error`` (see the module docstring); they never stop the others.

    Raises:
        PipelineError: no such source, a manifest that cannot be read or has no rows, or a folder without any
            finished item.
    """
    p = Path(source)
    if p.is_dir():
        return _results_folder_items(p)
    if p.is_file():
        return _manifest_items(p)
    raise PipelineError(f"{p}: no such results folder or manifest")


def _results_folder_items(root: Path) -> list[EvalItem]:
    items = [i for marker in sorted(root.rglob(RESULT_FILE)) for i in _folder_items(marker.parent, root)]
    done = {i.image.parent for i in items}
    unfinished = [EvalItem(_rel(folder, root), folder, error=unfinished_reason(folder))
                  for folder in item_folders(root) if folder not in done]
    failures = unfinished + _batch_failures(root, {i.name for i in unfinished})
    if not items:
        extra = f"; {len(failures)} unfinished or failed: {failures[0].name}: {failures[0].error}" if failures else ""
        raise PipelineError(f"{root}: no finished results (folders with {RESULT_FILE}) found{extra}")
    return items + failures


def _rel(path: Path, root: Path, name: str = "") -> str:
    """``path`` below ``root`` (plus ``name``) as a '/'-separated label; the root itself is left out."""
    rel = path.relative_to(root).as_posix()
    return "/".join(part for part in (rel if rel != "." else "", name) if part) or "."


def _folder_items(folder: Path, root: Path) -> list[EvalItem]:
    data = read_result(folder)
    if data is None:
        return []
    ref = data.get("reference")
    return [EvalItem(_rel(folder, root, image), folder / image, folder / data["mask"], folder / data["placed"],
                     folder / data["raw"][k] if k < len(data.get("raw", [])) else None, data.get("category"),
                     Path(ref) if ref else None)
            for k, image in enumerate(data["images"])]


def _batch_failures(root: Path, listed: set[str]) -> list[EvalItem]:
    """The rows each batch ``summary.json`` below ``root`` lists as failed (never generated), except those
    already listed as unfinished folders."""
    out = []
    for path in sorted(root.rglob(SUMMARY_FILE)):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        failed = data.get("failed") if isinstance(data, dict) and "done" in data else None
        for row in failed if isinstance(failed, list) else []:
            if not isinstance(row, dict):
                continue
            name = _rel(path.parent, root, str(row.get("name") or f"manifest line {row.get('line')}"))
            if name not in listed:
                out.append(EvalItem(name, path, error=f"not generated: the batch failed its manifest line "
                                                      f"{row.get('line')} ({row.get('reason')})"))
    return out


def _manifest_items(path: Path) -> list[EvalItem]:
    root = path.resolve().parent
    items = [_manifest_item(row, root, path.name, line) for line, row in _read_rows(path)]
    if not items:
        raise PipelineError(f"{path.name}: no rows")
    return items


def _manifest_item(row: dict[str, Any] | str, root: Path, fname: str, line: int) -> EvalItem:
    """The row's item, or an item carrying the reason it cannot be evaluated."""
    image, where = row.get("image") if isinstance(row, dict) else None, f"{fname} line {line}"
    label = image.strip() if isinstance(image, str) and image.strip() else where
    try:
        if isinstance(row, str):
            raise PipelineError(row)
        if not isinstance(image, str) or not image.strip():
            raise PipelineError("no 'image' (a path)")
        files = {k: _existing(root, row.get(k), k) for k in ("image", "mask", "placed", "raw", "reference")}
        category = row.get("category")
        return EvalItem(label, files["image"], files["mask"], files["placed"], files["raw"],
                        (category.strip() or None) if isinstance(category, str) else None, files["reference"])
    except PipelineError as e:
        return EvalItem(label, _path_or_root(image, root), error=str(e) if label == where else f"{where}: {e}")


def _path_or_root(value: Any, root: Path) -> Path:
    """The path a manifest value names (relative to ``root``), or ``root`` when it names none."""
    if not isinstance(value, str) or not value.strip():
        return root
    p = Path(value.strip()).expanduser()
    return p if p.is_absolute() else root / p


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any] | str]]:
    """``(line, row)`` pairs; a JSONL line that is not a JSON object comes as the text of its problem."""
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            lines = path.read_text(encoding="utf-8-sig").splitlines()
            return [(i, _json_row(t)) for i, t in enumerate(lines, 1) if t.strip()]
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [(c or "").strip() for c in reader.fieldnames or []]
            if "image" not in header:
                raise PipelineError(f"{path.name}: no 'image' column; the first line must name the columns (image, "
                                    f"mask, placed, raw, category, reference), got {header or 'nothing'}")
            return [(reader.line_num, {(k or "").strip(): v for k, v in r.items()}) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PipelineError(f"{path.name}: cannot read ({e})") from None


def _json_row(text: str) -> dict[str, Any] | str:
    try:
        row = json.loads(text)
    except ValueError as e:
        return f"not valid JSON ({getattr(e, 'msg', e)})"
    return row if isinstance(row, dict) else "each line must be a JSON object"


def _existing(root: Path, value: Any, key: str) -> Path | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise PipelineError(f"'{key}' must be a path, got {type(value).__name__}")
    p = _path_or_root(value, root)
    problem = not_a_file(p)
    if problem:
        raise PipelineError(f"{key} {p}: {problem}")
    return p


# ---------------------------------------------------------------------------------------------- embeddings
class ColourHistogram:
    """Weights-free image embedding: a 4×4×4 RGB histogram of the background, square-rooted, L2-normalised."""

    name = "colour-histogram"
    bins = 4

    def embed(self, image: np.ndarray, product_mask: np.ndarray | None = None) -> np.ndarray:
        """Embedding of the image's background (pixels with product mask < 0.5)."""
        weights = np.ones(image.shape[:2], np.float64) if product_mask is None else (product_mask < 0.5).astype(np.float64)
        q = np.clip((image[..., :3] * self.bins).astype(int), 0, self.bins - 1)
        index = (q[..., 0] * self.bins + q[..., 1]) * self.bins + q[..., 2]
        hist = np.bincount(index.ravel(), weights=weights.ravel(), minlength=self.bins ** 3)
        hist = np.sqrt(hist / max(hist.sum(), 1e-12))
        return hist / max(np.linalg.norm(hist), 1e-12)


class ClipEmbedder:
    """Background embedding with a CLIP vision model: the product is filled with the background's mean colour."""

    def __init__(self, clip_vision: Any, name: str = "clip-vision") -> None:
        self.clip, self.name = clip_vision, name

    def embed(self, image: np.ndarray, product_mask: np.ndarray | None = None) -> np.ndarray:
        """L2-normalised image embeds of the image's background."""
        x = torch.as_tensor(image[..., :3], dtype=torch.float32)[None]
        if product_mask is not None:
            x = fill_product_hwc(x, torch.as_tensor(product_mask >= 0.5, dtype=torch.float32)[None])
        p = next(self.clip.model.parameters())
        return self.clip.embed(x.to(p.device))[0].cpu().double().numpy()


# ---------------------------------------------------------------------------------------------- per image
def evaluate_item(item: EvalItem, embedder: Any, reference_cache: dict[Path, np.ndarray]) -> dict[str, Any]:
    """Metrics of one image (None where its files do not allow one) plus its background embedding, measured at
    the generation size (see the module docstring)."""
    image, mask, placed, raw = _load_at_canvas(item)
    out: dict[str, Any] = {"name": item.name, "category": item.category, **{m: None for m in METRICS},
                           "size": [int(image.shape[1]), int(image.shape[0])]}
    if mask is not None and (mask >= 0.5).any() and placed is not None:
        out["psnr_after_db"] = imaging.masked_psnr(placed, image, mask)
        out["delta_e_after"] = imaging.color_drift(placed, image, mask)["mean"]
        if raw is not None:
            out["psnr_before_db"] = imaging.masked_psnr(placed, raw, mask)
            out["delta_e_before"] = imaging.color_drift(placed, raw, mask)["mean"]
    if mask is not None and (mask >= 0.5).any():
        out["expansion"] = imaging.object_expansion(mask, imaging.grabcut(image, mask))["ratio"]
    embedding = embedder.embed(image, mask)
    if item.reference is not None:
        if item.reference not in reference_cache:
            reference_cache[item.reference] = _reference_embedding(item.reference, embedder)
        out["style_similarity"] = float(np.dot(embedding, reference_cache[item.reference]))
    return {"metrics": out, "embedding": embedding}


def _load_at_canvas(item: EvalItem) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(image, mask, placed, raw) at the generation canvas' size: that of the first of mask / placed / raw given
    (they must all have it); the image is brought to it (:func:`at_canvas`)."""
    files = [(load(p), p) if p else (None, None)
             for p, load in ((item.mask, load_mask), (item.placed, load_rgb), (item.raw, load_rgb))]
    image = load_rgb(item.image)
    canvas = next(((a, p) for a, p in files if a is not None), None)
    if canvas is None:
        return image, None, None, None
    for array, path in files:
        if array is not None and array.shape[:2] != canvas[0].shape[:2]:
            raise PipelineError(f"{path.name} is {_wxh(array)} but {canvas[1].name} is {_wxh(canvas[0])}: the files "
                                "of one result must share the generation size")
    return (at_canvas(image, canvas[0].shape[:2], item.image, canvas[1].name), *(a for a, _ in files))


def at_canvas(image: np.ndarray, hw: tuple[int, int], path: Path, canvas_name: str = "its mask") -> np.ndarray:
    """``image`` at the generation canvas' ``(height, width)``: unchanged at that size; area-resized when it is
    the same picture at another size (an export: the canvas' aspect, up to the canvas' rounding to :data:`CELL`
    pixels); PipelineError naming the files otherwise."""
    height, width = image.shape[:2]
    if (height, width) == tuple(hw):
        return image
    k = max(hw) / max(height, width)
    if abs(width * k - hw[1]) > CELL or abs(height * k - hw[0]) > CELL:
        raise PipelineError(f"{path.name} is {_wxh(image)} but {canvas_name} is {hw[1]}×{hw[0]}: not the same "
                            "picture at another size (an export keeps its canvas' aspect)")
    return resize_image(image, (int(hw[0]), int(hw[1])))


def _wxh(array: np.ndarray) -> str:
    return f"{array.shape[1]}×{array.shape[0]}"


def _reference_embedding(path: Path, embedder: Any) -> np.ndarray:
    rgb, alpha = imaging.load_image(path)
    rgba = np.concatenate([rgb, alpha[..., None]], -1) if alpha is not None else rgb
    try:
        seg = imaging.segment_product(rgba)
        mask = np.asarray(seg.mask) if (np.asarray(seg.mask) >= 0.5).mean() < 0.95 else None
    except ValueError:
        mask = None
    return embedder.embed(rgb, mask)


# ---------------------------------------------------------------------------------------------- over the set
def category_consistency(embeddings: Sequence[np.ndarray], categories: Sequence[str | None]) -> dict[str, Any]:
    """Leave-one-out nearest-centroid accuracy of background embeddings over categories.

    An image counts when its category has at least one other image; at least two such categories are needed.
    """
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        if c:
            groups.setdefault(c, []).append(i)
    groups = {c: idx for c, idx in groups.items() if len(idx) >= 2}
    if len(groups) < 2:
        return {"status": "skipped", "reason": "needs at least 2 categories with 2 or more images each"}
    e = np.stack([embeddings[i] for idx in groups.values() for i in idx])
    labels = [c for c, idx in groups.items() for _ in idx]
    sums = {c: e[[j for j, l in enumerate(labels) if l == c]].sum(0) for c in groups}
    counts = {c: len(idx) for c, idx in groups.items()}
    correct, within, between = 0, [], []
    for j, (vec, own) in enumerate(zip(e, labels)):
        scores = {}
        for c in groups:
            centroid = (sums[c] - vec) / (counts[c] - 1) if c == own else sums[c] / counts[c]
            scores[c] = float(np.dot(vec, centroid) / max(np.linalg.norm(centroid), 1e-12))
        correct += max(scores, key=scores.get) == own
        within.append(scores[own])
        between.extend(s for c, s in scores.items() if c != own)
    return {"status": "ok", "accuracy": correct / len(labels), "images": len(labels), "categories": len(groups),
            "mean_cosine_within": float(np.mean(within)), "mean_cosine_between": float(np.mean(between))}


def _summary(values: Iterable[float | None]) -> dict[str, Any]:
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"n": 0}
    finite = [x for x in v if math.isfinite(x)]
    mean = float(np.mean(v)) if len(finite) == len(v) else math.inf
    return {"n": len(v), "mean": mean, "min": float(min(v)), "max": float(max(v))}


def evaluate(items: Sequence[EvalItem], embedder: Any | None = None, fid_real: str | os.PathLike | None = None,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Evaluate every item and summarise.

    Args:
        items: from :func:`collect_items`.
        embedder: :class:`ClipEmbedder` or :class:`ColourHistogram` (default).
        fid_real: folder of real images for FID (skipped when None or the library/weights are missing).
        progress: called with the number of items done.

    Returns:
        ``{"images", "embedder", "summary": {metric: {n, mean, min, max}}, "category_consistency", "fid",
        "items": [per-image metrics]}``.
    """
    embedder = embedder or ColourHistogram()
    per_item, embeddings, cache, good, failed = [], [], {}, [], []
    for i, item in enumerate(items):
        try:
            if item.error is not None:
                raise PipelineError(item.error)
            result = evaluate_item(item, embedder, cache)
        except (PipelineError, imaging.ProductFolderError, OSError) as e:  # one bad file fails its row only
            failed.append({"name": item.name, "image": str(item.image), "reason": " ".join(str(e).split())})
        else:
            per_item.append(result["metrics"])
            embeddings.append(result["embedding"])
            good.append(item)
        if progress:
            progress(i + 1)
    return {"images": len(good), "embedder": embedder.name,
            "summary": {m: _summary(r[m] for r in per_item) for m in METRICS},
            "category_consistency": category_consistency(embeddings, [i.category for i in good]),
            "fid": compute_fid([i.image for i in good], fid_real),
            "failed": failed, "items": per_item}


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of the summary."""
    lines = [f"{'metric':<20}{'n':>6}{'mean':>12}{'min':>12}{'max':>12}"]
    for metric, s in report["summary"].items():
        cells = [_fmt(s.get(k)) for k in ("mean", "min", "max")] if s["n"] else ["-"] * 3
        lines.append(f"{metric:<20}{s['n']:>6}" + "".join(f"{c:>12}" for c in cells))
    cc = report["category_consistency"]
    lines.append("category_consistency " + (f"accuracy {cc['accuracy']:.3f} over {cc['images']} images, "
                 f"{cc['categories']} categories (cosine within {cc['mean_cosine_within']:.3f} / between "
                 f"{cc['mean_cosine_between']:.3f})" if cc["status"] == "ok" else f"skipped: {cc['reason']}"))
    fid = report["fid"]
    lines.append("fid                  " + (f"{fid['value']:.3f} ({fid['library']}, {fid['images']} vs "
                 f"{fid['real_images']} images)" if fid["status"] == "ok" else f"skipped: {fid['reason']}"))
    lines.append(f"embedder             {report['embedder']}")
    for f in report.get("failed", []):
        lines.append(f"failed               {f['name']}: {f['reason']}")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) else f"{x:.4g}"


def jsonable(report: Any) -> Any:
    """The report with infinities as the string "inf" (strict JSON)."""
    if isinstance(report, dict):
        return {k: jsonable(v) for k, v in report.items()}
    if isinstance(report, list):
        return [jsonable(v) for v in report]
    if isinstance(report, float) and math.isinf(report):
        return "inf" if report > 0 else "-inf"
    return report
