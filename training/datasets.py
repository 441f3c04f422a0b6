"""BG60k-layout datasets: a validating reader and the torch Dataset the trainers use.

:func:`open_bg60k` reads ``<split>_info.txt`` and checks every entry on open — malformed lines, duplicate
names, missing or unreadable images and masks, image/mask size mismatches, empty categories, count
mismatches — and reports all problems in one :class:`DatasetError` (or, with ``skip_bad=True``, one warning,
dropping the bad entries). The folder builder lives in :mod:`.folder`.
"""
from __future__ import annotations

import math
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
    """A dataset that cannot be used as is; the message summarises every problem found, ``problems`` lists them.

    Its own class (not a PipelineError) because ``productbg dataset check`` catches it alone to report the
    dataset, where a model or weight problem would be a different failure."""

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
    """One usable entry: file name, category name, the two paths and the image's (width, height).

    ``size`` is what the header said when the entry was checked (``None`` for a record made elsewhere), so
    aspect-ratio buckets are assigned without opening 60k files a second time.
    """

    file: str
    category: str
    image: Path
    mask: Path
    size: tuple[int, int] | None = None


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
    return Record(name, category, img_p, mask_p, tuple(img_size))


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


# ---------------------------------------------------------------------------------------------- buckets
BUCKET_STEP = 64  # bucket sides are multiples of this: SD1.5's UNet needs latents divisible by 8 (pixels by 64)
MAX_ASPECT = 4.0  # buckets span 1:4 .. 4:1, SDXL's range


def bucket_sizes(resolution: int) -> list[tuple[int, int]]:
    """Aspect-ratio buckets ``(height, width)`` for training at ``resolution``² pixels, widest first.

    SDXL's bucket list, for any multiple of 64: one side steps through the multiples of 64 and the other is the
    largest multiple of 64 that keeps ``height * width <= resolution²`` (a bucket never costs more memory or
    compute than the square, which is always in the list), in both orientations, aspects from 1:4 to 4:1. At
    1024 this is 512×2048, 512×1984, ..., 960×1088, 1024×1024, 1088×960, ..., 2048×512; at 512 it is 256×1024
    ... 512×512 ... 1024×256.

    Raises:
        ValueError: ``resolution`` is not a positive multiple of 64 (no square bucket could be formed).
    """
    if resolution < BUCKET_STEP or resolution % BUCKET_STEP:
        raise ValueError(f"aspect-ratio buckets need a resolution that is a multiple of {BUCKET_STEP}, "
                         f"got {resolution}")
    area, found = resolution * resolution, set()
    for side in range(BUCKET_STEP, int(MAX_ASPECT * resolution) + 1, BUCKET_STEP):
        other = area // side // BUCKET_STEP * BUCKET_STEP
        if other < BUCKET_STEP:
            break
        for h, w in ((side, other), (other, side)):
            if h <= MAX_ASPECT * w and w <= MAX_ASPECT * h:
                found.add((h, w))
    return sorted(found, key=lambda hw: (hw[0] / hw[1], -hw[0]))


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index in ``buckets`` of the ``(h, w)`` whose aspect is closest to ``height / width`` in log space.

    Log space makes 1:2 and 2:1 equally far from 1:1, so tall and wide images are treated alike; ties go to the
    earlier bucket (deterministic).
    """
    if not buckets:
        raise ValueError("no buckets to choose from")
    target = math.log(height / width)
    return min(range(len(buckets)), key=lambda k: (abs(math.log(buckets[k][0] / buckets[k][1]) - target), k))


@dataclass(frozen=True)
class Crop:
    """Where a training sample comes from in its source image, and what SDXL's added time ids say about it.

    The source region ``box`` is cropped and resized to the target in one resample (cheaper and sharper than
    resizing the whole image first); geometrically that is the diffusers SDXL convention — resize the image so
    it covers the target, then centre-crop — and ``resized`` / ``top_left`` describe it in those terms.

    Attributes:
        original: ``(height, width)`` of the source image (SDXL's ``original_size``).
        box: ``(left, top, right, bottom)`` of the source region (a PIL crop box).
        target: ``(height, width)`` of the sample.
        resized: ``(height, width)`` of the whole source resized to cover the target.
        top_left: ``(top, left)`` of the target inside the resized image (SDXL's ``crops_coords_top_left``).
    """

    original: tuple[int, int]
    box: tuple[int, int, int, int]
    target: tuple[int, int]
    resized: tuple[int, int]
    top_left: tuple[int, int]

    def flipped_top_left(self) -> tuple[int, int]:
        """``top_left`` of the horizontally flipped sample: the crop mirrored inside the resized image,
        ``left' = resized_width - left - target_width`` (the sample shows that region of the flipped image)."""
        return self.top_left[0], self.resized[1] - self.top_left[1] - self.target[1]


def crop_geometry(height: int, width: int, target: tuple[int, int]) -> Crop:
    """The centre crop of a ``height``×``width`` image with the aspect of ``target`` = ``(H, W)``.

    The side that is too long is cut equally on both ends (the extra pixel of an odd cut goes to the right /
    bottom); for a square target this is exactly the square centre crop training has always used.
    """
    th, tw = target
    if width * th >= height * tw:  # wider than the target (or equal): keep the full height, cut the width
        cw = (2 * height * tw + th) // (2 * th)  # round(height * tw / th), in integers
        left = (width - cw) // 2
        rw = max(tw, (2 * width * th + height) // (2 * height))
        box, resized = (left, 0, left + cw, height), (th, rw)
        top_left = (0, min((2 * left * th + height) // (2 * height), rw - tw))
    else:  # taller: keep the full width, cut the height
        ch = (2 * width * th + tw) // (2 * tw)
        top = (height - ch) // 2
        rh = max(th, (2 * height * tw + width) // (2 * width))
        box, resized = (0, top, width, top + ch), (rh, tw)
        top_left = (min((2 * top * tw + width) // (2 * width), rh - th), 0)
    return Crop((height, width), box, (th, tw), resized, top_left)


# ---------------------------------------------------------------------------------------------- torch side
def _decode_error(record: Record, e: Exception) -> DatasetError:
    return DatasetError(f"cannot decode {record.image.name} or its mask in {record.image.parent.parent} "
                        f"({type(e).__name__}: {' '.join(str(e).split())}); find every such file with "
                        "`productbg dataset check DIR --decode`, or pass --skip-bad to train without them")


def load_sample(record: Record, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, Crop]:
    """Image uint8 [H, W, 3], mask float [H, W] in {0, 1} and the :class:`Crop`, for a target ``size`` = (H, W).

    The mask is cut from the same box as the image and resized to the same size, so it stays on its product.
    """
    try:
        with Image.open(record.image) as im:
            crop = crop_geometry(im.height, im.width, size)
            img = im.convert("RGB").crop(crop.box).resize((size[1], size[0]), Image.BICUBIC)
        with Image.open(record.mask) as m:
            if (m.height, m.width) != crop.original:
                raise ValueError(f"mask is {m.width}x{m.height}, image {crop.original[1]}x{crop.original[0]}")
            mask = m.convert("L").crop(crop.box).resize((size[1], size[0]), Image.BILINEAR)
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt although its header was fine
        raise _decode_error(record, e) from None
    return np.asarray(img), (np.asarray(mask, dtype=np.float32) >= 127.5).astype(np.float32), crop


def load_pair(record: Record, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Image uint8 [R, R, 3] and mask float [R, R] in {0, 1}: centre-cropped to square, resized."""
    img, mask, _ = load_sample(record, (resolution, resolution))
    return img, mask


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] → float [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1.0


def _source_size(record: Record) -> tuple[int, int]:
    """(height, width) of a record's image: from the index when it knows it, else a header read (no decode)."""
    if record.size is not None:
        return record.size[1], record.size[0]
    try:
        with Image.open(record.image) as im:
            return im.height, im.width
    except (OSError, ValueError, SyntaxError) as e:
        raise _decode_error(record, e) from None


class ImageMaskDataset(torch.utils.data.Dataset):
    """(image, mask, category) samples of a :class:`BG60kIndex` at one training resolution.

    Items may be indexed by ``int`` or by ``(index, sample_seed)`` (what :class:`~.engine.StepSampler` and
    :class:`~.engine.BucketBatchSampler` yield); the seed drives the optional horizontal flip so augmentation
    does not depend on worker RNG.

    Every item is a dict: ``image`` float [3, H, W] in [-1, 1], ``mask`` float [1, H, W] in {0, 1},
    ``category`` (int), ``seed`` (int), and SDXL's added time ids in the diffusers training convention:
    ``original_size`` int64 [2] = (height, width) of the source image, ``crop_top_left`` int64 [2] = (top, left)
    of the sample in the source resized to cover it (mirrored with the flip: see :meth:`Crop.flipped_top_left`).

    Args:
        index: the checked split.
        resolution: side of the square training images (a multiple of 8), or with ``buckets`` the side of the
            square whose pixel count every bucket keeps (a multiple of 64).
        flip: random horizontal flips.
        categories: category order for the returned indices (default ``index.categories``).
        buckets: aspect-ratio buckets: each image is assigned once, from its header size, to the bucket of
            :func:`bucket_sizes` nearest its aspect (:attr:`buckets`, :attr:`bucket_ids`) and centre-cropped to
            that bucket's (H, W) instead of a square. Batches must then come from one bucket each: the engine
            uses :class:`~.engine.BucketBatchSampler` when :attr:`bucket_ids` is not ``None``.
    """

    def __init__(self, index: BG60kIndex, resolution: int, flip: bool = False,
                 categories: Sequence[str] | None = None, buckets: bool = False) -> None:
        if resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
        self.index, self.resolution, self.flip = index, resolution, flip
        self.categories = list(categories if categories is not None else index.categories)
        lookup = {c: i for i, c in enumerate(self.categories)}
        missing = sorted({r.category for r in index.records} - set(lookup))
        if missing:
            raise DatasetError(f"categories {missing[:5]} are not in the given category list")
        self._cat = [lookup[r.category] for r in index.records]
        #: the (H, W) sizes items may have, or ``None`` without buckets
        self.buckets: list[tuple[int, int]] | None = bucket_sizes(resolution) if buckets else None
        #: each record's index in :attr:`buckets`, or ``None`` without buckets
        self.bucket_ids: list[int] | None = None
        if self.buckets is not None:
            self.bucket_ids = [nearest_bucket(*_source_size(r), self.buckets) for r in index.records]

    def __len__(self) -> int:
        return len(self.index.records)

    def item_size(self, i: int) -> tuple[int, int]:
        """(H, W) of item ``i``: its bucket's, or resolution × resolution without buckets."""
        if self.bucket_ids is None:
            return self.resolution, self.resolution
        return self.buckets[self.bucket_ids[i]]

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        i, seed = item if isinstance(item, tuple) else (item, 0)
        img, mask, crop = load_sample(self.index.records[i], self.item_size(i))
        top_left = crop.top_left
        if self.flip and np.random.default_rng(seed).random() < 0.5:
            img, mask, top_left = img[:, ::-1], mask[:, ::-1], crop.flipped_top_left()
        return {"image": to_tensor(img), "mask": torch.from_numpy(np.array(mask))[None],
                "category": self._cat[i], "seed": seed,
                "original_size": torch.tensor(crop.original, dtype=torch.int64),
                "crop_top_left": torch.tensor(top_left, dtype=torch.int64)}


from .folder import BuildReport, build_from_folder  # noqa: E402  (re-exported: the folder builder)
