"""Product masks → per-layer token grids.

A cross-attention layer of the UNet sees the image as a grid of h×w query tokens. The product mask (1 = product,
any resolution) is reduced to that grid by **area averaging** (each cell gets the fraction of its area covered by
the product), then thresholded:

* a cell whose product coverage is ≥ ``threshold`` (default 0.5) is a *product cell*: background weight 0;
* any other cell has background weight ``1 − coverage`` (``soft=True``, the default) or 1 (``soft=False``).

At low resolutions (SD1.5's 8×8 layers at 512², 2×2 at 128²) a cell spans many pixels; area + threshold keeps the
product excluded wherever it covers most of a cell instead of letting nearest-neighbour sampling pick a pixel.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_THRESHOLD = 0.5


def infer_grid(seq_len: int, latent_hw: tuple[int, int] | None = None,
               exact_hw: tuple[int, int] | None = None) -> tuple[int, int]:
    """Find the (h, w) token grid of an attention layer.

    Args:
        seq_len: number of query tokens of the layer (h·w).
        latent_hw: (H, W) of the latent the UNet runs on. Each UNet downsampling halves a side rounding up
            (stride-2 conv with padding 1), so the candidates are H, ⌈H/2⌉, ⌈H/4⌉, ...
        exact_hw: the layer's grid when the caller knows it (ComfyUI's ``activations_shape``); used when it
            matches ``seq_len``.

    Returns:
        (h, w) with h·w == seq_len.

    Raises:
        ValueError: when no grid matches; the message says what was tried.
    """
    if exact_hw is not None and exact_hw[0] * exact_hw[1] == seq_len:
        return int(exact_hw[0]), int(exact_hw[1])
    if latent_hw is not None:
        h, w = int(latent_hw[0]), int(latent_hw[1])
        tried = []
        while True:
            if h * w == seq_len:
                return h, w
            tried.append((h, w))
            if h * w < seq_len or (h == 1 and w == 1):
                break
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        raise ValueError(f"no attention grid with {seq_len} tokens for a latent of {latent_hw[0]}x{latent_hw[1]} "
                         f"(tried {tried}); pass the layer's exact grid")
    side = math.isqrt(seq_len)
    if side * side == seq_len:
        return side, side
    raise ValueError(f"cannot infer the attention grid of {seq_len} tokens without the latent shape")


def _as_batch(mask: torch.Tensor) -> torch.Tensor:
    """[H,W] | [B,H,W] | [B,1,H,W] → float [B,1,H,W]."""
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim == 4:
        if mask.shape[1] != 1:
            raise ValueError(f"a product mask must have one channel, got shape {tuple(mask.shape)}")
        mask = mask[:, 0]
    if mask.ndim != 3:
        raise ValueError(f"a product mask must be [H,W], [B,H,W] or [B,1,H,W], got shape {tuple(mask.shape)}")
    return mask.float().clamp(0, 1)[:, None]


def product_coverage(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each grid cell covered by the product.

    Args:
        mask: product mask, 1 = product, of any resolution; [H,W], [B,H,W] or [B,1,H,W].
        grid: (h, w) of the attention layer.

    Returns:
        float tensor [B, h·w] in [0, 1], row-major like the layer's tokens.
    """
    pooled = F.adaptive_avg_pool2d(_as_batch(mask), grid)
    return pooled.flatten(1)


def background_weights(coverage: torch.Tensor, threshold: float = DEFAULT_THRESHOLD,
                       soft: bool = True) -> torch.Tensor:
    """Background weight per cell from product coverage (see the module docstring for the rule).

    Args:
        coverage: [..., N] product coverage in [0, 1].
        threshold: coverage at or above which a cell counts as product (weight exactly 0).
        soft: weight partial cells by ``1 − coverage`` instead of 1.

    Returns:
        tensor like ``coverage`` in [0, 1]; exactly 0 at product cells.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    weights = (1.0 - coverage) if soft else torch.ones_like(coverage)
    return weights.masked_fill(coverage >= threshold, 0.0)


def rows_for_batch(per_item: torch.Tensor, rows: int, chunks: int) -> torch.Tensor:
    """Spread per-product data [Bm, ...] over an attention batch of ``rows`` = chunks × B rows.

    Attention batches are laid out chunk by chunk (e.g. B uncond rows, then B cond rows); item b of every
    chunk uses product ``b % Bm``, so one mask serves the whole batch (like ComfyUI's repeat-to-batch-size).
    """
    if rows % chunks:
        raise ValueError(f"attention batch of {rows} rows does not split into {chunks} chunks")
    items = rows // chunks
    index = torch.arange(rows, device=per_item.device) % items % per_item.shape[0]
    return per_item[index]
