"""Where the product sits: one :class:`Layout` (scale, offset) shared by every resolution of one image.

A layout maps the product's *source* pixels (the native photo) to a canvas by an axis-aligned affine map in
continuous pixel coordinates, where pixel ``i`` covers ``[i, i + 1)``::

    X = offset_x + scale_x · x        Y = offset_y + scale_y · y

It is made once (by :func:`productbg.imaging.place_product`, in the canvas it is placed on: its *frame*) and
re-expressed for any other canvas of the same picture with :meth:`Layout.at` — the small generation canvas
and the large export canvas are two sizes of one picture, so the product lands on the same spot of both, to a
fraction of a pixel, with no rounding of either size in between (no half-pixel drift).

:func:`render_layout` draws the product at a layout. Where the layout is pixel-aligned (whole-pixel size and
offset, as :func:`place_product` makes in its own frame) it resizes and pastes; at a scale of exactly 1 that is
a plain copy, so the canvas holds the source pixels bit for bit. Elsewhere it resamples once, directly from the
source (area filter for the shrinking part, then a sub-pixel bilinear warp), never from another rendering.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

ALIGNED_EPS = 1e-6
#: ``Layout.at`` refuses canvases whose aspect differs from the frame's by more than this (relative).
MAX_ASPECT_MISMATCH = 0.02


@dataclass(frozen=True)
class Layout:
    """The product's placement on a canvas: an axis-aligned affine map from source to canvas pixels.

    Attributes:
        frame: ``(width, height)`` of the canvas the numbers are in.
        source: ``(width, height)`` of the source product image.
        crop: ``(x0, y0, x1, y1)`` source region that is carried (the product with its soft edge), end exclusive.
        scale: ``(sx, sy)`` canvas pixels per source pixel.
        offset: ``(ox, oy)``: where the source's top-left corner lands on the canvas (may be off-canvas).
    """

    frame: tuple[int, int]
    source: tuple[int, int]
    crop: tuple[int, int, int, int]
    scale: tuple[float, float]
    offset: tuple[float, float]

    def at(self, size: tuple[int, int], keep_aspect: bool = False) -> "Layout":
        """The same placement on a canvas of ``size`` showing the same picture (the frame scaled per axis).

        Args:
            size: ``(width, height)`` of the other canvas.
            keep_aspect: Scale the product uniformly (the geometric mean of the two axis scales) about its
                centre, so it is never stretched, even when ``size``'s aspect differs slightly from the frame's
                or the frame's own whole-pixel rounding made it a little anisotropic (export canvases); without
                it the product follows the canvas exactly (generation canvases, sides rounded to multiples of 8).

        Raises:
            ValueError: ``size`` is not a canvas, or (``keep_aspect``) its aspect differs from the frame's by
                more than 2 % (the product would no longer fit the background it was generated with).
        """
        w, h = (int(v) for v in size)
        if w < 1 or h < 1:
            raise ValueError(f"canvas {w}x{h} is empty")
        kx, ky = w / self.frame[0], h / self.frame[1]
        if keep_aspect and abs(kx / ky - 1.0) > MAX_ASPECT_MISMATCH:
            raise ValueError(f"a {w}x{h} canvas does not have the aspect of the {self.frame[0]}x{self.frame[1]} "
                             f"canvas the product was placed on; place it on a canvas of the export's aspect")
        if not keep_aspect or (kx == ky and self.scale[0] == self.scale[1]):
            return Layout((w, h), self.source, self.crop, (self.scale[0] * kx, self.scale[1] * ky),
                          (self.offset[0] * kx, self.offset[1] * ky))
        x0, y0, x1, y1 = self.crop
        cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0             # the crop's centre, in source pixels
        centre = ((self.offset[0] + self.scale[0] * cx) * kx, (self.offset[1] + self.scale[1] * cy) * ky)
        sx = sy = math.sqrt(self.scale[0] * kx * self.scale[1] * ky)
        return Layout((w, h), self.source, self.crop, (sx, sy), (centre[0] - sx * cx, centre[1] - sy * cy))

    def box(self) -> tuple[float, float, float, float]:
        """``(x, y, width, height)`` of the crop on the canvas, in (fractional) canvas pixels."""
        x0, y0, x1, y1 = self.crop
        return (self.offset[0] + self.scale[0] * x0, self.offset[1] + self.scale[1] * y0,
                self.scale[0] * (x1 - x0), self.scale[1] * (y1 - y0))

    def pixel_aligned(self) -> bool:
        """Whether the crop covers whole canvas pixels (whole-pixel size and corner): rendered without a warp."""
        x, y, w, h = self.box()
        return all(abs(v - round(v)) < ALIGNED_EPS for v in (x, y, w, h)) and round(w) >= 1 and round(h) >= 1

    def to_json(self) -> dict[str, Any]:
        """The layout as JSON-ready numbers (recorded in ``result.json``)."""
        return {"frame": list(self.frame), "source": list(self.source), "crop": list(self.crop),
                "scale": [round(v, 8) for v in self.scale], "offset": [round(v, 6) for v in self.offset]}


def render_layout(colour: np.ndarray, alpha: np.ndarray, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """The product drawn on an empty canvas of ``layout.frame``: colour ``[H, W, 3]`` and alpha ``[H, W]``.

    Colour and alpha are resampled premultiplied (background colours never bleed into the edge); α within 1e-4
    of 1 snaps to 1. Outside the product, colour is 0 and α is 0.

    Args:
        colour: ``[h, w, 3]`` float32 source image (``layout.source`` in size).
        alpha: ``[h, w]`` float32 source mask, 0..1.
        layout: where it goes.
    """
    width, height = layout.frame
    if tuple(colour.shape[:2]) != (layout.source[1], layout.source[0]):
        raise ValueError(f"the product image is {colour.shape[1]}x{colour.shape[0]} px but the placement was "
                         f"made for a {layout.source[0]}x{layout.source[1]} px one")
    x0, y0, x1, y1 = layout.crop
    rgba = np.concatenate([colour[y0:y1, x0:x1] * alpha[y0:y1, x0:x1, None], alpha[y0:y1, x0:x1, None]], -1)
    rgba = np.ascontiguousarray(rgba, np.float32)
    bx, by, bw, bh = layout.box()
    out = np.zeros((height, width, 4), np.float32)
    if layout.pixel_aligned():
        size = (round(bw), round(bh))
        if size != (x1 - x0, y1 - y0):
            shrinking = size[0] < x1 - x0 or size[1] < y1 - y0
            rgba = cv2.resize(rgba, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
            rgba = rgba.reshape(size[1], size[0], 4)
        _paste(out, rgba, round(bx), round(by))
    else:
        _warp(out, rgba, (bx, by, bw, bh))
    a = np.clip(out[..., 3], 0.0, 1.0)
    a = np.where(a >= 1.0 - 1e-4, np.float32(1.0), np.where(a <= 1e-4, np.float32(0.0), a))
    rgb = np.clip(out[..., :3] / np.maximum(out[..., 3:], 1e-6), 0.0, 1.0)
    return np.where(a[..., None] > 0, rgb, 0.0).astype(np.float32), a.astype(np.float32)


def _warp(out: np.ndarray, rgba: np.ndarray, box: tuple[float, float, float, float]) -> None:
    """Resample ``rgba`` onto ``out`` so that it covers ``box`` (fractional pixels): area-shrink to about the
    final size first (no aliasing), then one bilinear affine warp for the rest of the scale and the sub-pixel
    offset. The warp reads only the window of ``out`` the box touches."""
    bx, by, bw, bh = box
    h, w = rgba.shape[:2]
    target = (max(1, round(bw)), max(1, round(bh)))
    if target[0] < w or target[1] < h:
        rgba = cv2.resize(rgba, (min(w, target[0]), min(h, target[1])), interpolation=cv2.INTER_AREA)
        rgba = rgba.reshape(min(h, target[1]), min(w, target[0]), 4)
        h, w = rgba.shape[:2]
    sx, sy = bw / w, bh / h
    wx0, wy0 = max(0, math.floor(bx) - 1), max(0, math.floor(by) - 1)
    wx1, wy1 = min(out.shape[1], math.ceil(bx + bw) + 1), min(out.shape[0], math.ceil(by + bh) + 1)
    if wx1 <= wx0 or wy1 <= wy0:
        return
    # pixel centres: (j + 0.5) = bx + sx (i + 0.5)  →  j = sx i + (bx + sx/2 − 1/2), in window coordinates
    matrix = np.float64([[sx, 0.0, bx + sx / 2 - 0.5 - wx0], [0.0, sy, by + sy / 2 - 0.5 - wy0]])
    padded = cv2.copyMakeBorder(rgba, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=(0.0, 0.0, 0.0, 0.0))
    matrix[:, 2] -= matrix[:, :2] @ np.float64([1.0, 1.0])   # the 1-px zero border keeps edges soft
    window = cv2.warpAffine(padded, matrix, (wx1 - wx0, wy1 - wy0), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(0.0, 0.0, 0.0, 0.0))
    out[wy0:wy1, wx0:wx1] = window.reshape(wy1 - wy0, wx1 - wx0, 4)


def _paste(target: np.ndarray, source: np.ndarray, left: int, top: int) -> None:
    """Copy ``source`` into ``target`` with its top-left corner at (left, top), clipped to ``target``."""
    h, w = source.shape[:2]
    ty0, tx0 = max(top, 0), max(left, 0)
    ty1, tx1 = min(top + h, target.shape[0]), min(left + w, target.shape[1])
    if ty1 > ty0 and tx1 > tx0:
        target[ty0:ty1, tx0:tx1] = source[ty0 - top:ty1 - top, tx0 - left:tx1 - left]
