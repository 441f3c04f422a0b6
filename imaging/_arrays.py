"""Conversions between torch tensors and numpy arrays for the imaging functions (internal).

Every public imaging function accepts a torch tensor or a numpy array and returns the same kind it was given:
the math runs in numpy (OpenCV needs it), and the caller never has to care.
"""
from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch

Array = Union[torch.Tensor, np.ndarray]


def to_numpy(x: Array, dtype: Any = np.float32) -> np.ndarray:
    """A numpy copy-or-view of ``x`` in ``dtype`` (torch tensors are detached and moved to the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        x = x.float().numpy() if x.dtype in (torch.float16, torch.bfloat16) else x.numpy()
    return np.asarray(x, dtype=dtype)


def like(result: np.ndarray, reference: Array) -> Array:
    """``result`` as a torch tensor (float32, on ``reference``'s device) when ``reference`` is one, else as is."""
    if isinstance(reference, torch.Tensor):
        return torch.from_numpy(np.ascontiguousarray(result)).to(reference.device)
    return result


def check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Validate an ``[H, W, C]`` image (C = 3 or 4) and return it."""
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"{name} must be [H, W, 3] or [H, W, 4], got shape {tuple(image.shape)}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"{name} is too small ({image.shape[1]}x{image.shape[0]} px)")
    return image


def check_mask(mask: np.ndarray, hw: tuple[int, int] | None = None, name: str = "mask") -> np.ndarray:
    """Validate an ``[H, W]`` mask (optionally of size ``hw``) and return it."""
    if mask.ndim != 2:
        raise ValueError(f"{name} must be [H, W], got shape {tuple(mask.shape)}")
    if hw is not None and tuple(mask.shape) != tuple(hw):
        raise ValueError(f"{name} is {mask.shape[1]}x{mask.shape[0]} px but the image is {hw[1]}x{hw[0]} px")
    return mask
