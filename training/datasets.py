"""BG60k-layout datasets: a validating reader and the torch Dataset the trainers use.

:func:`open_bg60k` reads ``<split>_info.txt`` and checks every entry on open — malformed lines, duplicate
names, missing or unreadable images and masks, image/mask size mismatches, empty categories, count
mismatches — and reports all problems in one :class:`DatasetError` (or, with ``skip_bad=True``, one warning,
dropping the bad entries). The folder builder lives in :mod:`.folder`.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from . import layout


class DatasetError(Exception):
    """A dataset that cannot be used as is; the message summarises every problem found."""

    def __init__(self, message: str, problems: Sequence["Problem"] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


@dataclass(frozen=True)
class Problem:
    """One problem with one entry (or with the dataset as a whole when ``file`` is empty)."""

    kind: str
    file: str
    detail: str = ""


@dataclass(frozen=True)
class Record:
    """One usable entry: file name, category name and the two paths."""

    file: str
    category: str
    image: Path
    mask: Path


@dataclass
class BG60kIndex:
    """The checked entries of one split.

    Attributes:
        root: dataset folder.
        split: ``"bg60k"`` or ``"bg1k"``.
        records: usable entries in file order.
        categories: category names, sorted (a record's category index is its position here).
        problems: what was dropped (only with ``skip_bad=True``).
        unlisted: image files on disk that the info file does not list (not an error).
    """

    root: Path
    split: str
    records: list[Record]
    categories: list[str]
    problems: list[Problem] = field(default_factory=list)
    unlisted: int = 0

    def category_index(self, name: str) -> int:
        """Index of a category name in :attr:`categories`."""
        return self.categories.index(name)

    def counts(self) -> dict[str, int]:
        """Images per category."""
        return dict(Counter(r.category for r in self.records))


# ---------------------------------------------------------------------------------------------- reading
def _parse_info(path: Path) -> tuple[list[tuple[str, str]], list[Problem]]:
    """(file, category) rows of an info file and the problems of its lines."""
    rows, problems, seen = [], [], set()
    text = path.read_text(encoding="utf-8-sig")
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            problems.append(Problem("malformed line", f"line {lineno}", f"{len(parts)} tab-separated fields"))
            continue
        name, category = parts[0].strip(), parts[1].strip()
        if layout.file_number(name) is None:
            problems.append(Problem("bad file name", name or f"line {lineno}", "expected N.png"))
        elif not category:
            problems.append(Problem("empty category", name))
        elif name in seen:
            problems.append(Problem("duplicate entry", name))
        else:
            seen.add(name)
            rows.append((name, category))
    return rows, problems


def _image_size(path: Path, decode: bool) -> tuple[tuple[int, int] | None, str]:
    """(size, "") or (None, why it cannot be read)."""
    if not path.is_file():
        return None, "missing"
    try:
        with Image.open(path) as im:
            if decode:
                im.load()
            return im.size, ""
    except Exception as e:  # PIL raises many types for broken files
        return None, f"unreadable ({type(e).__name__}: {e})"


def _check_record(root: Path, split: str, name: str, category: str, decode: bool) -> Record | Problem:
    img_p, mask_p = layout.image_path(root, split, name), layout.mask_path(root, split, name)
    img_size, why = _image_size(img_p, decode)
    if img_size is None:
        return Problem(f"{why.split(' ')[0]} image", name, why)
    mask_size, why = _image_size(mask_p, decode)
    if mask_size is None:
        return Problem(f"{why.split(' ')[0]} mask", name, why)
    if img_size != mask_size:
        return Problem("size mismatch", name, f"image {img_size[0]}x{img_size[1]}, mask {mask_size[0]}x{mask_size[1]}")
    return Record(name, category, img_p, mask_p)


def _count_unlisted(root: Path, split: str, listed: set[str]) -> int:
    return sum(1 for i in range(10) for p in (root / f"{split}_imgs_{i}").glob("*.png") if p.name not in listed)


def summarize(problems: Sequence[Problem], examples: int = 3) -> str:
    """``"2 missing image (e.g. 5.png, 9.png); 1 size mismatch (7.png: image 64x64, mask 32x32)"``."""
    by_kind: dict[str, list[Problem]] = {}
    for p in problems:
        by_kind.setdefault(p.kind, []).append(p)
    parts = []
    for kind, items in by_kind.items():
        shown = ", ".join(f"{p.file}: {p.detail}" if p.detail and p.kind != "missing image" and
                          p.kind != "missing mask" else p.file for p in items[:examples])
        more = f", +{len(items) - examples} more" if len(items) > examples else ""
        parts.append(f"{len(items)} {kind} (e.g. {shown}{more})")
    return "; ".join(parts)


def open_bg60k(root: str | Path, split: str = "bg60k", *, skip_bad: bool = False, decode: bool | None = None,
               expect_count: int | None = None, categories: Iterable[str] | None = None) -> BG60kIndex:
    """Open and validate one split of a BG60k-layout folder.

    Args:
        root: dataset folder (holding ``bg60k_info.txt`` ...).
        split: ``"bg60k"`` (training) or ``"bg1k"`` (held out).
        skip_bad: drop bad entries with one warning instead of raising.
        decode: fully decode every image and mask (slow; finds truncated files). Default: with ``skip_bad``
            (so the entries training skips include undecodable ones), else headers only.
        expect_count: the number of entries the caller expects (a count mismatch is a problem).
        categories: the categories the caller expects (e.g. a bank being continued); others are problems.

    Returns:
        The :class:`BG60kIndex`.

    Raises:
        DatasetError: the folder or info file is missing, nothing usable is left, or (without ``skip_bad``)
            any entry has a problem. The message lists every kind of problem with examples.
    """
    root, info = Path(root), layout.info_path(Path(root), split)
    if split not in layout.SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {layout.SPLITS}")
    if not info.is_file():
        raise DatasetError(f"{root}: no {info.name} — not a BG60k-layout folder "
                           f"(build one with 'productbg dataset build SRC OUT')")
    rows, problems = _parse_info(info)
    records = _check_rows(root, split, rows, skip_bad if decode is None else decode, problems, categories)
    if expect_count is not None and len(rows) != expect_count:
        problems.append(Problem("count mismatch", "", f"{info.name} lists {len(rows)} entries, expected {expect_count}"))
    _report(root, split, len(rows), records, problems, skip_bad)
    names = sorted({r.category for r in records})
    return BG60kIndex(root, split, records, names, problems, _count_unlisted(root, split, {n for n, _ in rows}))


def _check_rows(root: Path, split: str, rows: list[tuple[str, str]], decode: bool, problems: list[Problem],
                categories: Iterable[str] | None) -> list[Record]:
    allowed = set(categories) if categories is not None else None
    records = []
    for name, category in rows:
        if allowed is not None and category not in allowed:
            problems.append(Problem("unknown category", name, category))
            continue
        checked = _check_record(root, split, name, category, decode)
        (records if isinstance(checked, Record) else problems).append(checked)
    return records


def _report(root: Path, split: str, listed: int, records: list[Record], problems: list[Problem],
            skip_bad: bool) -> None:
    where = f"{root} ({split})"
    if not records:
        detail = f": {summarize(problems)}" if problems else ""
        raise DatasetError(f"{where}: no usable entries out of {listed}{detail}", problems)
    if not problems:
        return
    message = f"{where}: {len(problems)} problem(s) in {listed} entries: {summarize(problems)}"
    if not skip_bad:
        raise DatasetError(f"{message}; pass skip_bad=True (--skip-bad) to train on the {len(records)} good "
                           "entries", problems)
    warnings.warn(f"{message}; skipped, training on {len(records)} entries", stacklevel=3)


# ---------------------------------------------------------------------------------------------- torch side
def load_pair(record: Record, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Image uint8 [R, R, 3] and mask float [R, R] in {0, 1}: centre-cropped to square, resized."""
    try:
        with Image.open(record.image) as im:
            img = _square(im.convert("RGB"), resolution, Image.BICUBIC)
        with Image.open(record.mask) as m:
            mask = _square(m.convert("L"), resolution, Image.BILINEAR)
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt although its header was fine
        raise DatasetError(f"cannot decode {record.image.name} or its mask in {record.image.parent.parent} "
                           f"({type(e).__name__}: {' '.join(str(e).split())}); find every such file with "
                           "`productbg dataset check DIR --decode`, or pass --skip-bad to train without them") \
            from None
    return np.asarray(img), (np.asarray(mask, dtype=np.float32) >= 127.5).astype(np.float32)


def _square(im: Image.Image, size: int, resample: int) -> Image.Image:
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return im.crop((left, top, left + side, top + side)).resize((size, size), resample)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] → float [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1.0


class ImageMaskDataset(torch.utils.data.Dataset):
    """(image, mask, category) samples of a :class:`BG60kIndex` at one training resolution.

    Items may be indexed by ``int`` or by ``(index, sample_seed)`` (what :class:`~.engine.StepSampler` yields);
    the seed drives the optional horizontal flip so augmentation does not depend on worker RNG.

    Args:
        index: the checked split.
        resolution: side of the square training images (a multiple of 8).
        flip: random horizontal flips.
        categories: category order for the returned indices (default ``index.categories``).
    """

    def __init__(self, index: BG60kIndex, resolution: int, flip: bool = False,
                 categories: Sequence[str] | None = None) -> None:
        if resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
        self.index, self.resolution, self.flip = index, resolution, flip
        self.categories = list(categories if categories is not None else index.categories)
        lookup = {c: i for i, c in enumerate(self.categories)}
        missing = sorted({r.category for r in index.records} - set(lookup))
        if missing:
            raise DatasetError(f"categories {missing[:5]} are not in the given category list")
        self._cat = [lookup[r.category] for r in index.records]

    def __len__(self) -> int:
        return len(self.index.records)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        i, seed = item if isinstance(item, tuple) else (item, 0)
        img, mask = load_pair(self.index.records[i], self.resolution)
        if self.flip and np.random.default_rng(seed).random() < 0.5:
            img, mask = img[:, ::-1], mask[:, ::-1]
        return {"image": to_tensor(img), "mask": torch.from_numpy(np.array(mask))[None],
                "category": self._cat[i], "seed": seed}


from .folder import BuildReport, build_from_folder  # noqa: E402  (re-exported: the folder builder)
