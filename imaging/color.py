"""Colour space conversions (sRGB ↔ CIELAB, D65) in numpy, shared by segmentation and the metrics."""
from __future__ import annotations

import numpy as np

from ._arrays import Array, like, to_numpy

# sRGB (D65) → CIE XYZ, IEC 61966-2-1.
_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])
_EPSILON = (6.0 / 29.0) ** 3


def srgb_to_linear(rgb: np.ndarray) -> np.ndarray:
    """Undo the sRGB transfer curve (values 0..1 in, linear light 0..1 out)."""
    rgb = np.clip(rgb, 0.0, 1.0)
    return np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)


def srgb_to_lab(rgb: Array) -> Array:
    """Convert sRGB colours (``[..., 3]``, 0..1) to CIELAB (L 0..100) under the D65 white point.

    Args:
        rgb: sRGB values in 0..1, any leading shape; a torch tensor or a numpy array.

    Returns:
        Lab values of the same leading shape and kind as ``rgb`` (float64 for numpy float64 input, else float32).
    """
    dtype = np.float64 if isinstance(rgb, np.ndarray) and rgb.dtype == np.float64 else np.float32
    x = to_numpy(rgb, np.float64)
    if x.shape[-1] != 3:
        raise ValueError(f"srgb_to_lab expects [..., 3] colours, got shape {x.shape}")
    xyz = srgb_to_linear(x) @ _SRGB_TO_XYZ.T / _D65_WHITE
    f = np.where(xyz > _EPSILON, np.cbrt(xyz), xyz / (3 * (6.0 / 29.0) ** 2) + 4.0 / 29.0)
    lab = np.stack([116.0 * f[..., 1] - 16.0,
                    500.0 * (f[..., 0] - f[..., 1]),
                    200.0 * (f[..., 1] - f[..., 2])], axis=-1)
    return like(lab.astype(dtype), rgb)
