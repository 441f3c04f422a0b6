"""Identifier attention: the mask-guided cross-attention layer of the Category-Wise Generator.

The category identifier is a handful of token columns of the text context. At product positions its
pre-softmax logits get an additive bias ``log(1 − strength · (1 − m))``, where m is the background weight of the
position (see ``masks``): the identifier's unnormalised attention weight is multiplied by ``1 − strength·(1 − m)``.
So strength 0 is plain attention, strength 1 removes the identifier from product cells entirely (m = 0 → −inf)
and scales it by m on partial edge cells. Only positive (cond) rows are biased; negative rows are untouched.
Other key columns (BOS, EOS, free words) are never biased, so no row is ever fully masked.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CLIP_CONTEXT = 77


@dataclass(frozen=True)
class IdentifierSpec:
    """Where the identifier sits in the positive prompt.

    Attributes:
        token_indices: positions of the identifier's tokens in the positive prompt's own context
            (0 = BOS of the first 77-token chunk; chunk c starts at 77·c).
        context_length: length of that context (77 × chunks). When ComfyUI batches positive and negative
            prompts of different lengths it repeats each to a common length, so index j also appears at
            j + context_length·r; columns are computed with this period.
    """

    token_indices: tuple[int, ...]
    context_length: int = CLIP_CONTEXT

    def __post_init__(self) -> None:
        if self.context_length <= 0:
            raise ValueError(f"context_length must be positive, got {self.context_length}")
        bad = [i for i in self.token_indices if not 0 <= i < self.context_length]
        if bad:
            raise ValueError(f"identifier token indices {bad} lie outside the prompt's {self.context_length} tokens")


def identifier_columns(spec: IdentifierSpec, key_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Key columns of the identifier in a context of ``key_len`` tokens (sorted, unique, int64)."""
    idx = torch.tensor(sorted(set(spec.token_indices)), dtype=torch.long, device=device)
    if idx.numel() == 0:
        return idx
    repeats = -(-key_len // spec.context_length)
    cols = (idx[None, :] + spec.context_length * torch.arange(repeats, device=device)[:, None]).flatten()
    return cols[cols < key_len]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads·d] → [B, heads, N, d]."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, d] → [B, N, heads·d]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention on [B, N, heads·d] tensors."""
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads),
                                         attn_mask=attn_mask)
    return merge_heads(out)


def identifier_bias(background: torch.Tensor, columns: torch.Tensor, positive_rows: torch.Tensor, key_len: int,
                    strength: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention bias [rows, 1, N, key_len]: nonzero only on identifier columns of positive rows.

    Args:
        background: [rows, N] background weight of every query position for every attention row.
        columns: identifier key columns (``identifier_columns``).
        positive_rows: [rows] bool, True for rows of positive (cond) chunks.
        key_len: number of key tokens.
        strength: 0 (no effect) … 1 (identifier removed from product cells).
    """
    rows, n = background.shape
    col_bias = torch.log1p(-strength * (1.0 - background.float()))
    col_bias = col_bias.masked_fill(~positive_rows.to(col_bias.device)[:, None], 0.0)
    bias = torch.zeros(rows, n, key_len, dtype=dtype, device=background.device)
    bias[:, :, columns] = col_bias[:, :, None].to(dtype)
    return bias[:, None]


def _masking_applies(columns: torch.Tensor, key_len: int, positive_rows: torch.Tensor, strength: float) -> bool:
    # With every key column an identifier column there is nothing else to attend to: leave such rows alone.
    return strength > 0 and 0 < columns.numel() < key_len and bool(positive_rows.any())


def identifier_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, columns: torch.Tensor,
                         positive_rows: torch.Tensor, background: torch.Tensor, strength: float) -> torch.Tensor:
    """Cross-attention with the identifier confined to the background.

    Args:
        q: [rows, N, heads·d] projected queries. k, v: [rows, key_len, heads·d] projected keys / values.
        heads: number of attention heads.
        columns: identifier key columns (``identifier_columns``).
        positive_rows: [rows] bool, True for positive (cond) rows.
        background: [rows, N] background weights (``masks.background_weights`` spread over the rows).
        strength: in [0, 1].

    Returns:
        [rows, N, heads·d] attention output (before the output projection).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    key_len = k.shape[1]
    if not _masking_applies(columns, key_len, positive_rows, strength):
        return plain_attention(q, k, v, heads)
    bias = identifier_bias(background, columns, positive_rows, key_len, strength, q.dtype)
    return plain_attention(q, k, v, heads, attn_mask=bias)


def identifier_mass_map(q: torch.Tensor, k: torch.Tensor, heads: int, columns: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention mass on the identifier columns per query position, averaged over heads: [rows, N].

    Computes the softmax explicitly (differentiable); use it for the training loss and for probes.
    """
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    logits = (qh @ kh.transpose(-1, -2)) * (qh.shape[-1] ** -0.5)
    if bias is not None:
        logits = logits + bias
    probs = logits.float().softmax(dim=-1)
    return probs[..., columns].sum(-1).mean(1)


def identifier_attention_mass(q: torch.Tensor, k: torch.Tensor, heads: int, columns: torch.Tensor,
                              positive_rows: torch.Tensor, coverage: torch.Tensor,
                              bias: torch.Tensor | None = None) -> torch.Tensor:
    """The identifier's attention mass inside the product, for the attention-mass loss of one layer.

    Args:
        coverage: [rows, N] product coverage of each query position (weights the average).
        bias: the identifier bias in force, if any (``mask_mode="both"``).

    Returns:
        scalar: Σ coverage·mass / Σ coverage over positive rows (0 when there is no product or no identifier).
    """
    if columns.numel() == 0 or not bool(positive_rows.any()):
        return q.new_zeros(())
    weight = coverage[positive_rows]
    inside = (weight > 0).any(0)  # only positions some product covers contribute: skip the rest
    if not bool(inside.any()):
        return q.new_zeros(())
    rows_bias = None if bias is None else bias[positive_rows][:, :, inside]
    mass = identifier_mass_map(q[positive_rows][:, inside], k[positive_rows], heads, columns, rows_bias)
    weight = weight[:, inside].to(mass.dtype)
    return (mass * weight).sum() / weight.sum().clamp_min(1e-6)
