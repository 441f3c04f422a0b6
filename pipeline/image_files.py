"""Reading evaluation images from disk as float arrays: the one reader that evaluation and FID share."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import imaging


def load_rgb(path: Path) -> np.ndarray:
    """``[H, W, 3]`` float32 0..1."""
    return imaging.load_image(path)[0]


def load_mask(path: Path) -> np.ndarray:
    """``[H, W]`` float32 0..1 from a greyscale (or RGB) mask image."""
    return imaging.load_image(path)[0].mean(axis=-1)
