"""Paste the original product back over a generated image, keeping its pixels bit-identical.

Three zones of the product mask:

- **core** (mask ≥ ``CORE_THRESHOLD``): the placed product's pixels are copied unchanged, bit for bit;
- **edge band** (0 < mask < core): blended as ``mask·F + (1 − mask)·generated``, where F is the product's own
  colour recovered from the placed image with the compositing equation (the canvas fill colour is removed, so
  no halo of it survives);
- **outside**: with ``feather`` > 0 an outward ramp of ``feather`` pixels blends the product's edge colours
  into the generated image, softening the seam without touching the core.

Nothing is ever feathered inwards: the core stays exactly the input product.
"""
from __future__ import annotations

import cv2
import numpy as np

from ._arrays import Array, check_image, check_mask, like, to_numpy
from .segment import decontaminate_foreground, estimate_local_color

CORE_THRESHOLD = 0.999
"""Mask values at or above this are the product's core (8-bit masks: exactly 255)."""
DEFAULT_FEATHER = 2.0


def product_core(mask: Array) -> Array:
    """Boolean ``[H, W]``: the pixels copied unchanged (mask ≥ ``CORE_THRESHOLD``)."""
    return like(to_numpy(mask) >= CORE_THRESHOLD, mask)


def outward_feather(core: np.ndarray, pixels: float) -> np.ndarray:
    """A ramp that is 1 on ``core`` and falls linearly to 0 at ``pixels + 1`` pixels outside it."""
    core = np.asarray(core, bool)
    if pixels <= 0 or not core.any():
        return core.astype(np.float32)
    distance = cv2.distanceTransform((~core).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.clip(1.0 - distance / (pixels + 1.0), 0.0, 1.0).astype(np.float32)


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize an ``[H, W, C]`` image to ``hw`` (area when shrinking, bilinear when enlarging)."""
    if image.shape[:2] == tuple(hw):
        return image
    shrinking = hw[0] < image.shape[0] or hw[1] < image.shape[1]
    out = cv2.resize(np.ascontiguousarray(image), (hw[1], hw[0]),
                     interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return out.reshape(hw[0], hw[1], image.shape[2])


def composite_product(generated: Array, placed: Array, product_mask: Array,
                      feather: float = DEFAULT_FEATHER, foreground: Array | None = None) -> Array:
    """Paste the placed product over the generated image.

    Args:
        generated: ``[H', W', 3]`` generated image (resized to the placed image's size when it differs, e.g.
            after a VAE cropped it to a multiple of 8).
        placed: ``[H, W, 3|4]`` the canvas with the product (Place Product's image).
        product_mask: ``[H, W]`` product mask on that canvas, 1 = product.
        feather: Outward softening in pixels (0 = none).
        foreground: Optional ``[H, W, 3]`` pure product colour F where ``product_mask > 0``, when the caller
            knows it (the export renders it): then F is not recovered from ``placed`` (same result where
            ``placed`` was made as ``mask·F + (1 − mask)·fill``, much cheaper on large canvases).

    Returns:
        ``[H, W, 3]`` image (float32). Where ``product_mask ≥ CORE_THRESHOLD`` it equals ``placed`` bit for bit.
    """
    product = check_image(to_numpy(placed), "placed")[..., :3]
    mask = np.clip(check_mask(to_numpy(product_mask), product.shape[:2], "product_mask"), 0.0, 1.0)
    background = resize_image(check_image(to_numpy(generated), "generated")[..., :3], product.shape[:2])
    core = mask >= CORE_THRESHOLD
    alpha = np.maximum(mask, outward_feather(core, feather))
    if foreground is None:
        foreground = product_colors(product, mask, sigma=max(1.0, feather))
    else:
        known = check_image(to_numpy(foreground), "foreground")[..., :3]
        extended = estimate_local_color(known, (mask >= 0.5).astype(np.float32), max(1.0, feather))
        foreground = np.where((mask >= 0.1)[..., None], known, extended).astype(np.float32)
    blended = alpha[..., None] * foreground + (1.0 - alpha[..., None]) * background
    out = np.where(core[..., None], product, blended.astype(np.float32))
    return like(out, placed)


def product_colors(placed: np.ndarray, mask: np.ndarray, sigma: float = 1.0, min_alpha: float = 0.1) -> np.ndarray:
    """The product's pure colour F everywhere: recovered in the edge band, extended outwards beyond it.

    In the band, ``placed = mask·F + (1 − mask)·B`` with B the local colour of the canvas around the product
    (its fill colour), solved for F. Outside, F is the local average of the product's colours.
    """
    known = mask >= 0.5
    fill = estimate_local_color(placed, (mask <= 1e-3).astype(np.float32), max(2.0, 2 * sigma))
    solved = decontaminate_foreground(placed, mask, fill, min_alpha)
    extended = estimate_local_color(solved, known.astype(np.float32), sigma)
    return np.where((mask >= min_alpha)[..., None], solved, extended).astype(np.float32)
