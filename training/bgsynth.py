"""BG-synth: a procedural dataset in the BG60k layout, for tests, the demo model and toy-scale evaluation.

Every category has its own background *style family* (gradient, stripes, checks, dots, bokeh, marble, wood,
tiles, spotlight, ...) and palette; every image places one product — a simple shape of random colour and size
with an exact mask — on a background drawn from its category's family with small per-image variations
(phase, scale, palette jitter). Everything is numpy and deterministic from ``seed``: image ``N`` of a split
depends only on ``(seed, split, N)``, so any subset can be regenerated identically.
"""
from __future__ import annotations

import colorsys
import io
import json
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..fileio import write_bytes_atomically, write_text_atomically
from . import layout

DEFAULT_NAMES = (
    "shoes", "handbags", "mugs", "lamps", "watches", "perfume", "headphones", "plants",
    "sunglasses", "bottles", "toys", "cosmetics", "backpacks", "speakers", "candles", "kettles",
)

Array = np.ndarray
Grid = tuple[Array, Array]  # (y, x) in [0, 1), shape [H, W]


# ---------------------------------------------------------------------------------------------- helpers
def _grid(size: int) -> Grid:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c, indexing="ij")


def _noise(rng: np.random.Generator, size: int, cells: int) -> Array:
    """Smooth value noise in [0, 1]: a random ``cells``² grid upsampled bicubically."""
    small = Image.fromarray(rng.random((cells, cells), dtype=np.float32), mode="F")
    return np.clip(np.asarray(small.resize((size, size), Image.BICUBIC)), 0.0, 1.0)


def _mix(a: Array, b: Array, t: Array) -> Array:
    """Blend colours a, b ([3]) with weights t ([H, W]) → [H, W, 3]."""
    return a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]


def _hsv(h: float, s: float, v: float) -> Array:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), np.float32)


@dataclass(frozen=True)
class Palette:
    """A category's colours: two main colours and an accent."""

    a: Array
    b: Array
    accent: Array


def category_palette(index: int, seed: int) -> Palette:
    """Hues spread by the golden ratio so neighbouring categories differ."""
    rng = np.random.default_rng([seed, 7919, index])
    hue = (index * 0.618034 + rng.random() * 0.1) % 1.0
    return Palette(_hsv(hue, 0.35 + 0.3 * rng.random(), 0.85), _hsv(hue + 0.08, 0.6, 0.45 + 0.2 * rng.random()),
                   _hsv(hue + 0.5, 0.7, 0.9))


def _jitter(p: Palette, rng: np.random.Generator) -> Palette:
    d = lambda c: np.clip(c + rng.normal(0, 0.03, 3).astype(np.float32), 0, 1)  # noqa: E731
    return Palette(d(p.a), d(p.b), d(p.accent))


# ---------------------------------------------------------------------------------------------- backgrounds
def _gradient(g: Grid, p: Palette, r: np.random.Generator, s: int) -> Array:
    return _mix(p.a, p.b, np.clip(g[0] * (0.8 + 0.4 * r.random()), 0, 1))


def _stripes(g: Grid, p: Palette, r: np.random.Generator, s: int) -> Array:
    t = (g[1] + g[0] * 0.5) * (5 + 3 * r.random()) + r.random()
    return _mix(p.a, p.b, (np.sin(2 * np.pi * t) > 0).astype(np.float32))


def _checks(g: Grid, p: Palette, r: np.random.Generator, s: int) -> Array:
    n = 4 + int(r.integers(0, 4))
    return _mix(p.a, p.b, ((np.floor(g[0] * n) + np.floor(g[1] * n)) % 2).astype(np.float32))


def _dots(g: Grid, p: Palette, r: np.random.Generator, s: int) -> Array:
    n = 5 + int(r.integers(0, 3))
    fy, fx = (g[0] * n + r.random()) % 1 - 0.5, (g[1] * n + r.random()) % 1 - 0.5
    return _mix(p.a, p.accent, (fy ** 2 + fx ** 2 < 0.09).astype(np.float32))


def _bokeh(g: Grid, p: Palette, r: np.random.Generator, s: int) -> Array:
    img = _mix(p.b * 0.5, p.b, g[0])
    for _ in range(10):
        cy, cx, rad = r.random(), r.random(), 0.05 + 0.12 * r.random()
        d = np.sqrt((g[0] - cy) ** 2 + (g[1] - cx) ** 2) / rad
        img = img + (np.clip(1.2 - d, 0, 1) * 0.35)[..., None] * p.accent[None, None]
    return img


def _marble(g: Grid, p: Palette, r: np.random.Generator, s: int) -> Array:
    turb = _noise(r, s, 5) * 3 + _noise(r, s, 11)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * (g[1] * 2 + g[0]) + 3 * turb)
    return _mix(p.a * 0.3 + 0.7, p.b, t ** 4)


def _wood(g: Grid, p: Palette, r: np.random.Generator, s: int) -> Array:
    d = np.sqrt((g[0] - r.random() * 0.2 + 1.5) ** 2 * 0.05 + (g[1] - 0.5) ** 2)
    t = (d * (18 + 6 * r.random()) + 2 * _noise(r, s, 4)) % 1
    return _mix(p.a * 0.6 + 0.2, p.b * 0.7, t)


def _tiles(g: Grid, p: Palette, r: np.random.Generator, s: int) -> Array:
    n = 3 + int(r.integers(0, 3))
    fy, fx = g[0] * n % 1, g[1] * n % 1
    shade = _noise(r, s, n) * 0.25
    img = _mix(p.a, p.b, shade)
    grout = (np.minimum(np.minimum(fy, 1 - fy), np.minimum(fx, 1 - fx)) < 0.04).astype(np.float32)
    return img * (1 - grout[..., None]) + 0.9 * grout[..., None]


def _spotlight(g: Grid, p: Palette, r: np.random.Generator, s: int) -> Array:
    cy, cx = 0.3 + 0.2 * r.random(), 0.35 + 0.3 * r.random()
    d = np.sqrt((g[0] - cy) ** 2 + (g[1] - cx) ** 2)
    return _mix(p.a, p.b * 0.25, np.clip(d * 1.6, 0, 1))


def _waves(g: Grid, p: Palette, r: np.random.Generator, s: int) -> Array:
    t = np.sin(2 * np.pi * (g[0] * 4 + 0.15 * np.sin(2 * np.pi * g[1] * (1 + r.random())) + r.random()))
    return _mix(p.a, p.b, 0.5 + 0.5 * t)


def _sunburst(g: Grid, p: Palette, r: np.random.Generator, s: int) -> Array:
    ang = np.arctan2(g[0] - 1.1, g[1] - 0.5)
    return _mix(p.a, p.accent * 0.8, ((ang * (8 + 4 * r.random()) / np.pi) % 2 > 1).astype(np.float32))


def _clouds(g: Grid, p: Palette, r: np.random.Generator, s: int) -> Array:
    return _mix(p.a, p.b, _noise(r, s, 3) * 0.7 + _noise(r, s, 7) * 0.3)


def _gridlines(g: Grid, p: Palette, r: np.random.Generator, s: int) -> Array:
    n = 6 + int(r.integers(0, 4))
    fy, fx = g[0] * n % 1, g[1] * n % 1
    line = ((fy < 0.06) | (fx < 0.06)).astype(np.float32)
    return _mix(p.a * 0.2 + 0.8, p.b, line)


def _rings(g: Grid, p: Palette, r: np.random.Generator, s: int) -> Array:
    d = np.sqrt((g[0] - 0.5) ** 2 + (g[1] - 0.5) ** 2)
    return _mix(p.a, p.b, (np.sin(2 * np.pi * d * (6 + 3 * r.random())) > 0).astype(np.float32))


def _tabletop(g: Grid, p: Palette, r: np.random.Generator, s: int) -> Array:
    horizon = 0.55 + 0.15 * r.random()
    wall = _mix(p.a, p.a * 0.8, g[0] / horizon)
    floor = _mix(p.b, p.b * 0.6, np.clip((g[0] - horizon) / (1 - horizon), 0, 1))
    return np.where((g[0] < horizon)[..., None], wall, floor)


def _chevrons(g: Grid, p: Palette, r: np.random.Generator, s: int) -> Array:
    t = (g[0] * 5 + np.abs((g[1] * 5) % 2 - 1) + r.random()) % 1
    return _mix(p.a, p.b, (t > 0.5).astype(np.float32))


BackgroundFn = Callable[[Grid, Palette, np.random.Generator, int], Array]

#: The style families, in category order (category i uses family i mod len(FAMILIES)).
FAMILIES: dict[str, BackgroundFn] = {
    "gradient": _gradient, "stripes": _stripes, "checks": _checks, "dots": _dots, "bokeh": _bokeh,
    "marble": _marble, "wood": _wood, "tiles": _tiles, "spotlight": _spotlight, "waves": _waves,
    "sunburst": _sunburst, "clouds": _clouds, "gridlines": _gridlines, "rings": _rings, "tabletop": _tabletop,
    "chevrons": _chevrons,
}
FAMILY_NAMES = tuple(FAMILIES)


def background(family: str, palette: Palette, rng: np.random.Generator, size: int) -> Array:
    """A [size, size, 3] float background of one style family."""
    return np.clip(FAMILIES[family](_grid(size), _jitter(palette, rng), rng, size), 0, 1).astype(np.float32)


# ---------------------------------------------------------------------------------------------- products
SHAPES = ("ellipse", "box", "triangle", "bottle", "diamond", "capsule")


def _shape_mask(shape: str, y: Array, x: Array) -> Array:
    """Boolean mask of a unit shape in local coordinates y, x ∈ [-1, 1]."""
    if shape == "ellipse":
        return x ** 2 + y ** 2 <= 1
    if shape == "box":
        return (np.abs(x) <= 1) & (np.abs(y) <= 1)
    if shape == "triangle":
        return (y <= 1) & (np.abs(x) <= (y + 1) / 2)
    if shape == "bottle":
        body = (np.abs(x) <= 1) & (y >= -0.3) & (y <= 1)
        return body | ((np.abs(x) <= 0.35) & (y >= -1) & (y < -0.3))
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 1
    return (np.abs(x) <= 1) & (np.abs(y) <= 1) & ~((np.abs(y) > 0.5) & (x ** 2 + ((np.abs(y) - 0.5) * 2) ** 2 > 1))


def product(rng: np.random.Generator, size: int) -> tuple[Array, Array]:
    """A random shaded product: colour [size, size, 3] and exact boolean mask [size, size]."""
    y, x = _grid(size)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    h, w = rng.uniform(0.3, 0.75), rng.uniform(0.25, 0.6)
    cy, cx = 0.5 + rng.uniform(-0.08, 0.08), 0.5 + rng.uniform(-0.08, 0.08)
    ly, lx = (y - cy) / (h / 2), (x - cx) / (w / 2)
    mask = _shape_mask(shape, ly, lx)
    if not mask.any():  # a tiny canvas can miss every pixel centre: fall back to one central block
        mask = (np.abs(ly) <= 1.01) & (np.abs(lx) <= 1.01) | ((np.abs(y - 0.5) < 0.26) & (np.abs(x - 0.5) < 0.26))
    colour = _hsv(rng.random(), rng.uniform(0.3, 1.0), rng.uniform(0.4, 1.0))
    shade = 0.75 + 0.25 * np.clip(1 - 0.5 * (lx + 0.5) ** 2, 0, 1)
    return np.clip(colour[None, None] * shade[..., None], 0, 1).astype(np.float32), mask


# ---------------------------------------------------------------------------------------------- dataset
@dataclass(frozen=True)
class SynthSpec:
    """What to generate.

    Attributes:
        categories: number of categories (default 16, one style family each).
        per_category: training images per category (bg60k split).
        held_out: held-out images per category (bg1k split).
        pairs: reference pairs per held-out image (bgpair_info.txt).
        size: image side in pixels.
        seed: the seed everything derives from.
        names: category names (default: English product names, then ``category_NNN``).
    """

    categories: int = 16
    per_category: int = 8
    held_out: int = 2
    pairs: int = 1
    size: int = 128
    seed: int = 0
    names: tuple[str, ...] | None = None

    def category_names(self) -> list[str]:
        """Names of the categories, in index order."""
        if self.names is not None:
            if len(self.names) != self.categories or len(set(self.names)) != len(self.names):
                raise ValueError(f"need {self.categories} distinct category names, got {list(self.names)}")
            return list(self.names)
        return [DEFAULT_NAMES[i] if i < len(DEFAULT_NAMES) else f"category_{i:03d}" for i in range(self.categories)]


def render(spec: SynthSpec, split: str, number: int, category: int) -> tuple[Array, Array]:
    """Image N of a split: uint8 RGB [S, S, 3] and uint8 mask [S, S] (255 = product)."""
    rng = np.random.default_rng([spec.seed, layout.SPLITS.index(split), number])
    family = FAMILY_NAMES[category % len(FAMILY_NAMES)]
    bg = background(family, category_palette(category, spec.seed), rng, spec.size)
    colour, mask = product(rng, spec.size)
    img = np.where(mask[..., None], colour, bg)
    return (img * 255 + 0.5).astype(np.uint8), mask.astype(np.uint8) * 255


def png_bytes(array: Array) -> bytes:
    """PNG-encode a uint8 [H, W] or [H, W, 3] array."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _assignments(spec: SynthSpec, split: str) -> list[int]:
    """Category of each file number (categories interleaved so any prefix is balanced)."""
    per = spec.per_category if split == "bg60k" else spec.held_out
    return [n % spec.categories for n in range(per * spec.categories)]


SPEC_FILE = ".bgsynth-spec.json"


def generate(out: str | Path, spec: SynthSpec = SynthSpec(), overwrite: bool = False) -> dict[str, int]:
    """Write a BG-synth dataset in the BG60k layout.

    Existing image/mask files are kept when the folder was written with the same spec, unless ``overwrite``
    (generation is deterministic, so an interrupted run is finished by running it again); images of another
    spec are re-rendered and layout-named files beyond this spec's counts are removed. Info files are written
    last, atomically.

    Args:
        out: destination folder.
        spec: what to generate.
        overwrite: re-render files that already exist.

    Returns:
        Counts: ``{"bg60k": ..., "bg1k": ..., "pairs": ..., "written": ...}``.
    """
    root = Path(out)
    names = spec.category_names()
    overwrite = overwrite or not _same_spec(root, spec)
    if overwrite:
        (root / SPEC_FILE).unlink(missing_ok=True)
    counts = {"written": 0}
    rows: dict[str, list[tuple[str, str]]] = {}
    for split in layout.SPLITS:
        rows[split] = []
        for number, cat in enumerate(_assignments(spec, split)):
            name = f"{number}.png"
            rows[split].append((name, names[cat]))
            counts["written"] += _write_one(root, spec, split, number, cat, overwrite)
        counts[split] = len(rows[split])
    for split in layout.SPLITS:
        write_text_atomically(layout.info_path(root, split), layout.info_text(rows[split]))
    pairs = _pairs(spec, rows, names)
    write_text_atomically(root / layout.PAIRS_FILE, layout.info_text(pairs))
    counts["pairs"] = len(pairs)
    _remove_unlisted(root, rows)
    write_text_atomically(root / SPEC_FILE, _spec_json(spec))
    return counts


def _spec_json(spec: SynthSpec) -> str:
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()}, sort_keys=True)


def _same_spec(root: Path, spec: SynthSpec) -> bool:
    """Whether ``root`` was written by this spec (then existing files are reused: an interrupted run resumes)."""
    try:
        return (root / SPEC_FILE).read_text(encoding="utf-8") == _spec_json(spec)
    except OSError:
        return False


def _remove_unlisted(root: Path, rows: dict[str, list[tuple[str, str]]]) -> None:
    """Delete layout-named images and masks (``N.png``) a larger or different earlier run left behind."""
    for split, listed in rows.items():
        keep = {name for name, _ in listed}
        for folder in [*root.glob(f"{split}_imgs_[0-9]"), *root.glob(f"{split}_masks_[0-9]")]:
            for p in folder.iterdir():
                if layout.file_number(p.name) is not None and p.name not in keep and p.is_file():
                    p.unlink()


def _write_one(root: Path, spec: SynthSpec, split: str, number: int, cat: int, overwrite: bool) -> int:
    name = f"{number}.png"
    img_p, mask_p = layout.image_path(root, split, name), layout.mask_path(root, split, name)
    if not overwrite and img_p.is_file() and mask_p.is_file():
        return 0
    img, mask = render(spec, split, number, cat)
    write_bytes_atomically(mask_p, png_bytes(mask))
    write_bytes_atomically(img_p, png_bytes(img))
    return 1


def _pairs(spec: SynthSpec, rows: dict[str, list[tuple[str, str]]], names: Sequence[str]) -> list[tuple[str, str, str]]:
    """Each held-out image paired with ``spec.pairs`` training images of its category."""
    by_cat: dict[str, list[str]] = {}
    for file, cat in rows["bg60k"]:
        by_cat.setdefault(cat, []).append(file)
    rng = np.random.default_rng([spec.seed, 104729])
    out = []
    for file, cat in rows["bg1k"]:
        pool = by_cat.get(cat, [])
        for _ in range(min(spec.pairs, len(pool))):
            out.append((file, pool[int(rng.integers(len(pool)))], cat))
    return out
