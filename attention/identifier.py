"""Identifier attention: the mask-guided cross-attention layer of the Category-Wise Generator.

Two confinements, both weighted per query position by ``a = strength · (1 − m)``, where m is the position's
background weight (see ``masks``: 0 on product cells, 1 on pure background, in between on edge cells):

* ``context`` (default): the query attends to the full prompt with weight ``1 − a`` and to the *identifier-free
  prompt* (the same prompt encoded without the identifier) with weight ``a`` — :func:`context_blend`. CLIP's
  text encoder is causal, so every token after the identifier (rest of the template, EOS, padding) carries it;
  only a separately encoded prompt is free of it. At strength 1 a product cell's output is exactly independent
  of the identifier, and so is its gradient.
* ``columns`` (the first reading, kept as an ablation): the identifier's own key columns get the additive bias
  ``log(1 − a)`` (:func:`identifier_bias`). It leaks through the later tokens of the causal encoder.

Rows that do not carry the identifier (negative prompts, other prompts) are untouched in both.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

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
    #: [Bp, context_length, width]: the prompt encoded *without* the identifier (what product cells attend to
    #: under ``context`` confinement), padded to the prompt's length by repeating its 77-token chunks.
    plain_context: torch.Tensor | None = field(default=None, compare=False, repr=False)
    #: [1, context_length, width]: the prompt as encoded (with the identifier); ComfyUI's adapter recognises
    #: the attention rows of this prompt by it. None: every positive row carries the identifier.
    prompt_context: torch.Tensor | None = field(default=None, compare=False, repr=False)
    #: A name for this encoded prompt, also stored in its CONDITIONING (``comfy_patch.PROMPT_TAG_KEY``) so that the
    #: ComfyUI adapter can tell a node that rebuilt the prompt's tensor (ConditioningAverage...) from one that
    #: left it alone. None: no such check.
    tag: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.context_length <= 0:
            raise ValueError(f"context_length must be positive, got {self.context_length}")
        bad = [i for i in self.token_indices if not 0 <= i < self.context_length]
        if bad:
            raise ValueError(f"identifier token indices {bad} lie outside the prompt's {self.context_length} tokens")
        for name in ("plain_context", "prompt_context"):
            t = getattr(self, name)
            if t is not None and (t.ndim != 3 or t.shape[1] != self.context_length):
                raise ValueError(f"{name} must be [B, {self.context_length}, width], got {tuple(t.shape)}")


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


#: ``(q, k, v, heads, attn_mask) -> out`` on [B, N, heads·d] tensors, ``attn_mask`` an additive bias or None:
#: :func:`plain_attention`, or the host's own kernel (ComfyUI's optimized attention: sage, flash, xformers...).
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, Optional[torch.Tensor]], torch.Tensor]


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


def _masking_applies(columns: torch.Tensor, key_len: int, strength: float) -> bool:
    # With every key column an identifier column there is nothing else to attend to: leave such rows alone.
    return strength > 0 and 0 < columns.numel() < key_len


def pad_to_length(context: torch.Tensor, length: int, chunk: int = CLIP_CONTEXT) -> torch.Tensor:
    """Repeat a [B, T, C] context's ``chunk``-token chunks cyclically up to ``length`` tokens (T ≤ length).

    Attention over a context repeated whole is attention over the context itself; a partial repeat (3 chunks
    from 2) weighs the repeated chunk a little more — the same thing ComfyUI does to batch prompts of
    different lengths.
    """
    t = context.shape[1]
    if t == length:
        return context
    if t > length or t % chunk or length % chunk:
        raise ValueError(f"cannot pad a {t}-token context to {length} tokens in {chunk}-token chunks")
    order = [(i % (t // chunk)) for i in range(length // chunk)]
    return torch.cat([context[:, c * chunk:(c + 1) * chunk] for c in order], dim=1)


def context_blend(full: torch.Tensor, plain: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(1 − w)·full + w·plain`` with exact endpoints: w = 0 gives ``full``, w = 1 gives ``plain`` bit for bit
    (and a zero gradient to ``full``). ``weight`` broadcasts against [rows, N, C], e.g. [rows, N, 1]."""
    return torch.lerp(full, plain.to(full.dtype), weight.to(full.dtype))


def context_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_plain: torch.Tensor,
                      v_plain: torch.Tensor, heads: int, weight: torch.Tensor,
                      bias: torch.Tensor | None = None, attention: AttentionFn = plain_attention) -> torch.Tensor:
    """Cross-attention under ``context`` confinement.

    Args:
        q: [rows, N, heads·d]; k, v: the full prompt's keys / values [rows, L, heads·d].
        k_plain, v_plain: the identifier-free prompt's keys / values [rows, L', heads·d].
        weight: [rows, N, 1] share of the identifier-free prompt per query (``strength · (1 − m)`` on rows that
            carry the identifier, 0 elsewhere).
        bias: an optional additive bias for the full prompt's attention (``columns`` identifiers).
        attention: the attention kernel for both halves (the blend is exact at weight 0 and 1 with any kernel).
    """
    full = attention(q, k, v, heads, bias)
    return context_blend(full, attention(q, k_plain, v_plain, heads, None), weight)


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
    if not _masking_applies(columns, key_len, strength):
        return plain_attention(q, k, v, heads)
    bias = identifier_bias(background, columns, positive_rows, key_len, strength, q.dtype)
    return plain_attention(q, k, v, heads, attn_mask=bias)


def identifier_mass_map(q: torch.Tensor, k: torch.Tensor, heads: int, columns: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention mass on the identifier columns per query position, averaged over heads: [rows, N].

    Computes the softmax explicitly (differentiable); use it for the training loss and for probes. The logits are
    computed in float32 whatever q and k are (and with autocast off): fp16 logits of large activations overflow.
    """
    device = q.device.type
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
        qh, kh = split_heads(q.float(), heads), split_heads(k.float(), heads)
        logits = (qh @ kh.transpose(-1, -2)) * (qh.shape[-1] ** -0.5)
        if bias is not None:
            logits = logits + bias.float()
        probs = logits.softmax(dim=-1)
    return probs[..., columns].sum(-1).mean(1)


def identifier_attention_mass(q: torch.Tensor, k: torch.Tensor, heads: int, columns: torch.Tensor,
                              positive_rows: torch.Tensor, coverage: torch.Tensor,
                              bias: torch.Tensor | None = None, share: torch.Tensor | None = None) -> torch.Tensor:
    """The identifier's attention mass inside the product, for the attention-mass loss of one layer.

    Args:
        coverage: [rows, N] product coverage of each query position (weights the average).
        bias: the identifier bias in force, if any (``mask_mode="both"``, ``columns`` confinement).
        share: [rows, N] the full prompt's share of each position under ``context`` confinement (1 − blend),
            if in force: the mass is scaled by it, as the layer weighs it.

    Returns:
        scalar: Σ coverage·mass / Σ coverage over positive rows (0 when there is no product or no identifier).
    """
    if columns.numel() == 0:
        return q.new_zeros(())
    # Every position of every row, weighted (no host sync, no data-dependent indexing): rows that do not carry
    # the identifier and positions no product covers get weight 0.
    weight = coverage * positive_rows.to(coverage.device, coverage.dtype)[:, None]
    mass = identifier_mass_map(q, k, heads, columns, bias)
    if share is not None:
        mass = mass * share.to(mass.dtype)
    weight = weight.to(mass.dtype)
    return (mass * weight).sum() / weight.sum().clamp_min(1e-6)
