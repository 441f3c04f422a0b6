"""Synthetic packshots with known ground truth, for tests, demos and benchmarks (numpy, deterministic)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SyntheticPackshot:
    """A rendered packshot and its ground truth.

    Attributes:
        image: ``[H, W, 3]`` float32 sRGB image.
        alpha: ``[H, W]`` true product coverage (anti-aliased edge).
        shadow: ``[H, W]`` shadow density in 0..1 (fraction of the darkest shadow), 0 where there is none.
        product_rgb: The product's flat colour.
        background_rgb: The backdrop colour.
    """

    image: np.ndarray
    alpha: np.ndarray
    shadow: np.ndarray
    product_rgb: tuple[float, float, float]
    background_rgb: tuple[float, float, float]


def box_coverage(height: int, width: int, box: tuple[float, float, float, float], supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage ``[H, W]`` of the axis-aligned box ``(y0, y1, x0, x1)`` (pixel units, fractional)."""
    y0, y1, x0, x1 = box
    ys = (np.arange(height * supersample) + 0.5) / supersample
    xs = (np.arange(width * supersample) + 0.5) / supersample
    inside = ((ys[:, None] >= y0) & (ys[:, None] < y1) & (xs[None] >= x0) & (xs[None] < x1)).astype(np.float32)
    return inside.reshape(height, supersample, width, supersample).mean(axis=(1, 3))


def packshot(size: int = 128, product_rgb: tuple[float, float, float] = (0.9, 0.15, 0.1),
             background_rgb: tuple[float, float, float] = (1.0, 1.0, 1.0), shadow_depth: float = 0.45,
             box: tuple[float, float, float, float] = (30.0, 90.0, 40.0, 88.0), noise: float = 0.0,
             seed: int = 0) -> SyntheticPackshot:
    """A flat-coloured box product on a uniform backdrop with a soft elliptical shadow under it.

    Args:
        size: Image side in pixels.
        product_rgb: The product's colour.
        background_rgb: The backdrop's colour.
        shadow_depth: Fraction of the backdrop's linear light removed at the shadow's centre (0 = no shadow).
        box: Product box ``(y0, y1, x0, x1)`` in units of a 128-pixel image (scaled to ``size``).
        noise: Standard deviation of Gaussian pixel noise added to the result.
        seed: Noise seed.

    Returns:
        The :class:`SyntheticPackshot`.
    """
    y0, y1, x0, x1 = (v * size / 128.0 for v in box)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    shadow = np.exp(-(((yy - y1) / (0.12 * size)) ** 2 + ((xx - (x0 + x1) / 2) / (0.3 * size)) ** 2))
    backdrop_linear = np.float32(background_rgb) ** 2.2 * (1.0 - shadow_depth * shadow)[..., None]
    backdrop = backdrop_linear ** (1.0 / 2.2)
    alpha = box_coverage(size, size, (y0, y1, x0, x1))
    image = alpha[..., None] * np.float32(product_rgb) + (1.0 - alpha[..., None]) * backdrop
    if noise:
        image = image + np.random.default_rng(seed).normal(0.0, noise, image.shape)
    shadow = np.where(alpha > 0, 0.0, shadow) if shadow_depth else np.zeros_like(shadow)
    return SyntheticPackshot(np.clip(image, 0, 1).astype(np.float32), alpha.astype(np.float32),
                             shadow.astype(np.float32), tuple(product_rgb), tuple(background_rgb))
