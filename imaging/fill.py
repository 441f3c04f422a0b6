"""Remove a product from an image by filling its region from the surrounding background."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fill_product(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fill the product region of ``image`` [C,H,W] or [B,C,H,W] (``mask`` [1|B,1,H,W] or [1,H,W], 1 = product).

    Push-pull fill: background averages over a pyramid of 2× reductions, pulled back up into the hole, so the
    fill continues the surrounding colours smoothly. Used for the Personality-Wise Generator's references, in
    training and at inference alike.
    """
    batched = image.ndim == 4
    img = image if batched else image[None]
    m = mask if mask.ndim == 4 else mask[None]
    bg = (1 - m).clamp(0, 1)
    levels = [(img * bg, bg)]
    while min(levels[-1][1].shape[-2:]) > 1:
        v, w = levels[-1]
        levels.append((F.avg_pool2d(v, 2, ceil_mode=True), F.avg_pool2d(w, 2, ceil_mode=True)))
    fill = levels[-1][0] / levels[-1][1].clamp_min(1e-6)
    for v, w in reversed(levels[:-1]):
        up = F.interpolate(fill, size=v.shape[-2:], mode="bilinear", align_corners=False)
        fill = v + up * (1 - w)  # v = mean(image·bg): the known part, weighted by its coverage w
    out = img * (1 - m) + fill * m
    return out if batched else out[0]


def fill_product_hwc(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`fill_product` for ComfyUI-layout images: IMAGE [B,H,W,C], MASK [B,H,W] (1 = product)."""
    return fill_product(image.permute(0, 3, 1, 2), mask[:, None].to(image)).permute(0, 2, 3, 1)
