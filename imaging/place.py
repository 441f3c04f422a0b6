"""Place a segmented product on a canvas, the way the paper's inference recipe expects.

Defaults follow PAPER.md: the product's bounding box spans ≈0.70–0.78 of the canvas (fill ratio 0.74), centred;
the inpainting mask is the *inverted* product mask dilated by ≈20 px at 512² (the generator repaints the
background plus a band over the product's edge; the original pixels are pasted back afterwards).

The product is resized with premultiplied alpha (colour·α and α are resampled, then divided), so background
colours never bleed into the product's edge, and composited over the fill colour as ``α·F + (1 − α)·fill``.
Where α is exactly 1 the canvas holds the resampled product colours unchanged.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import cv2
import numpy as np

from ._arrays import Array, check_image, check_mask, like, to_numpy
from .layout import Layout, render_layout
from .segment import grow_mask

ANCHORS = ("center", "bottom", "top", "left", "right", "bottom-left", "bottom-right", "top-left", "top-right")
DEFAULT_FILL_RATIO = 0.74
DEFAULT_MARGIN = 0.05
INPAINT_GROW_AT_512 = 20
SIZE_MULTIPLE = 8
"""Canvas sides from presets are multiples of 8 (the VAE's downsampling), so nothing is cropped later."""


@dataclass
class Placement:
    """Result of :func:`place_product`.

    Attributes:
        image: ``[H, W, 3]`` canvas with the product over the fill colour.
        mask: ``[H, W]`` product mask on the canvas (soft edge kept), 1 = product.
        inpaint_mask: ``[H, W]`` binary mask of what the generator repaints, 1 = repaint.
        box: ``(x, y, width, height)`` of the placed product's bounding box (mask ≥ 0.5), in pixels.
        scale: The resize factor applied to the product.
        layout: The :class:`~productbg.imaging.layout.Layout` (scale, offset) of the product on this canvas,
            to re-render the source product at any other size of the same picture (the export).
    """

    image: Array
    mask: Array
    inpaint_mask: Array
    box: tuple[int, int, int, int]
    scale: float
    layout: Layout | None = None


def parse_hex_color(text: str) -> tuple[float, float, float]:
    """``"#RRGGBB"`` / ``"RRGGBB"`` / ``"#RGB"`` → an sRGB tuple in 0..1."""
    s = text.strip().lstrip("#")
    if re.fullmatch(r"[0-9a-fA-F]{3}", s):
        s = "".join(c * 2 for c in s)
    if not re.fullmatch(r"[0-9a-fA-F]{6}", s):
        raise ValueError(f"{text!r} is not a colour; write it as #RRGGBB, e.g. #FFFFFF for white")
    return tuple(int(s[i:i + 2], 16) / 255.0 for i in (0, 2, 4))


def inpaint_grow_pixels(width: int, height: int, grow_at_512: float = INPAINT_GROW_AT_512) -> int:
    """The inpaint-mask dilation for a canvas: ``grow_at_512`` pixels at 512 px, scaled with the longer side."""
    return max(0, round(grow_at_512 * max(width, height) / 512.0))


def inpaint_mask(product_mask: Array, grow: float) -> Array:
    """The region to regenerate: the inverted product mask (``mask < 0.5``) dilated by ``grow`` pixels."""
    background = (to_numpy(product_mask) < 0.5).astype(np.float32)
    return like(grow_mask(background, grow), product_mask)


def mask_bbox(mask: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` (end exclusive) of the pixels with ``mask >= threshold``; ValueError when none."""
    ys, xs = np.nonzero(mask >= threshold)
    if ys.size == 0:
        raise ValueError("the product mask is empty: nothing to place (1 = product)")
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def _anchor_offset(anchor: str, canvas: int, size: float, margin: float, start: str, end: str) -> float:
    """Position along one axis of a box of ``size`` anchored at ``start``/``end``/centre of ``canvas``."""
    if start in anchor:
        return margin
    if end in anchor:
        return canvas - margin - size
    return (canvas - size) / 2.0


def place_product(image: Array, mask: Array, canvas: tuple[int, int] = (512, 512),
                  fill_ratio: float = DEFAULT_FILL_RATIO, anchor: str = "center", margin: float = DEFAULT_MARGIN,
                  fill_color: tuple[float, float, float] = (1.0, 1.0, 1.0),
                  inpaint_grow: float | None = None) -> Placement:
    """Scale and position a product on a new canvas.

    Args:
        image: ``[H, W, 3|4]`` product image, 0..1 (a fourth channel is ignored: ``mask`` is the alpha).
        mask: ``[H, W]`` product mask, 1 = product (soft edges are kept).
        canvas: ``(width, height)`` of the canvas.
        fill_ratio: The product's bounding box is scaled to fit in ``fill_ratio`` × the canvas (aspect kept);
            on a square canvas its longer side spans ``fill_ratio`` of the canvas.
        anchor: One of ``ANCHORS``: where the bounding box sits.
        margin: Minimum gap between the bounding box and the canvas edges, as a fraction of the canvas's
            shorter side; also limits the scale.
        fill_color: sRGB 0..1 colour of the empty canvas.
        inpaint_grow: Dilation of the inpaint mask in pixels; default ``inpaint_grow_pixels`` (20 at 512).

    Returns:
        The :class:`Placement` (arrays of the same kind as ``image``).

    Raises:
        ValueError: Empty mask, bad canvas, fill ratio, anchor or margin.
    """
    img = check_image(to_numpy(image))[..., :3]
    m = np.clip(check_mask(to_numpy(mask), img.shape[:2]), 0.0, 1.0)
    layout = plan_layout(m, canvas, fill_ratio, anchor, margin)
    return place_at(image, mask, layout, fill_color, inpaint_grow)


def plan_layout(mask: Array, canvas: tuple[int, int] = (512, 512), fill_ratio: float = DEFAULT_FILL_RATIO,
                anchor: str = "center", margin: float = DEFAULT_MARGIN) -> Layout:
    """Where :func:`place_product` puts a product with this mask: the :class:`Layout`, nothing rendered.

    In its own frame (``canvas``) the layout is pixel-aligned: whole-pixel size and corner. Args as in
    :func:`place_product`; raises ValueError for an empty mask or a bad canvas, fill ratio, anchor or margin.
    """
    m = np.clip(check_mask(to_numpy(mask)), 0.0, 1.0)
    width, height = (int(v) for v in canvas)
    if width < 8 or height < 8:
        raise ValueError(f"canvas {width}x{height} is too small (at least 8x8)")
    if not 0.0 < fill_ratio <= 1.0:
        raise ValueError(f"fill_ratio must be in (0, 1], got {fill_ratio}")
    if anchor not in ANCHORS:
        raise ValueError(f"unknown anchor {anchor!r}; choose one of {', '.join(ANCHORS)}")
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin}")
    y0, y1, x0, x1 = mask_bbox(m, 0.5)                       # the product's extent (sizes the product)
    cy0, cy1, cx0, cx1 = mask_bbox(m, 1.0 / 255.0)            # what is copied (its soft edge included)
    gap = margin * min(width, height)
    box_w, box_h = x1 - x0, y1 - y0
    scale = min(fill_ratio * width / box_w, fill_ratio * height / box_h,
                max(width - 2 * gap, 1.0) / box_w, max(height - 2 * gap, 1.0) / box_h)
    crop_w, crop_h = cx1 - cx0, cy1 - cy0
    new_w, new_h = max(1, round(crop_w * scale)), max(1, round(crop_h * scale))
    sx, sy = new_w / crop_w, new_h / crop_h
    left = _anchor_offset(anchor, width, box_w * sx, gap, "left", "right") - (x0 - cx0) * sx
    top = _anchor_offset(anchor, height, box_h * sy, gap, "top", "bottom") - (y0 - cy0) * sy
    # whole-pixel size and corner in this frame: rendered here by a resize and a paste (a copy at scale 1)
    return Layout((width, height), (m.shape[1], m.shape[0]), (cx0, cy0, cx1, cy1), (sx, sy),
                  (round(left) - sx * cx0, round(top) - sy * cy0))


def place_at(image: Array, mask: Array, layout: Layout, fill_color: tuple[float, float, float] = (1.0, 1.0, 1.0),
             inpaint_grow: float | None = None) -> Placement:
    """Render a product at a :class:`Layout` (any frame: :meth:`Layout.at` re-expresses one) over the fill
    colour, with its inpaint mask; see :func:`place_product` for the arguments and the result."""
    img = check_image(to_numpy(image))[..., :3]
    m = np.clip(check_mask(to_numpy(mask), img.shape[:2]), 0.0, 1.0)
    width, height = layout.frame
    colour, canvas_alpha = render_layout(img, m, layout)
    a = canvas_alpha[..., None]
    placed = a * colour + (1.0 - a) * np.float32(fill_color)
    grow = inpaint_grow_pixels(width, height) if inpaint_grow is None else inpaint_grow
    if (canvas_alpha >= 0.5).any():                          # where the product really landed
        by0, by1, bx0, bx1 = mask_bbox(canvas_alpha, 0.5)
        box = (bx0, by0, bx1 - bx0, by1 - by0)
    else:                                                    # shrunk below a pixel
        bx, by, _, _ = layout.box()
        box = (round(bx), round(by), 0, 0)
    scale = float(np.sqrt(layout.scale[0] * layout.scale[1]))
    return Placement(like(placed.astype(np.float32), image), like(canvas_alpha, image),
                     like(inpaint_mask(canvas_alpha, grow), image), box, scale, layout)
