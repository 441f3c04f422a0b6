"""Style attention: the Personality-Wise Generator's decoupled cross-attention (IP-Adapter architecture).

The reference image becomes a few style tokens; each cross-attention layer projects them with its own K/V and
adds ``weight · attention(q, k_style, v_style)`` to the text attention. Confined to the background, the
addition is multiplied by the background weight of each query position (0 on product cells), for every row
(cond and uncond alike, so classifier-free guidance sees the same confinement on both sides).
"""
from __future__ import annotations

import torch

from .identifier import AttentionFn, plain_attention


def style_attention(q: torch.Tensor, k_style: torch.Tensor, v_style: torch.Tensor, heads: int,
                    weight: float = 1.0, background: torch.Tensor | None = None,
                    attention: AttentionFn = plain_attention) -> torch.Tensor:
    """The style term to add to a cross-attention output.

    Args:
        q: [rows, N, heads·d] projected queries.
        k_style, v_style: [rows, tokens, heads·d] style tokens projected by this layer's K/V.
        heads: number of attention heads.
        weight: this layer's style weight (global weight × per-layer weight).
        background: optional [rows, N] background weights; None applies the style everywhere
            (then the result equals diffusers' ``IPAdapterAttnProcessor2_0`` term).
        attention: the attention kernel (the host's, e.g. ComfyUI's optimized attention).

    Returns:
        [rows, N, heads·d].
    """
    if k_style.shape[0] != q.shape[0]:
        raise ValueError(f"style tokens for {k_style.shape[0]} rows, attention has {q.shape[0]} rows")
    out = attention(q, k_style, v_style, heads, None)
    if background is not None:
        out = out * background[:, :, None].to(out.dtype)
    return out * weight
