"""diffusers adapter for Flux.1: an attention processor for ``FluxTransformer2DModel`` that confines an identifier
to the background in every double- and single-stream block (the math: ``joint``).

Install with :func:`install_flux_processors`; then per model call::

    call = JointCall(identifier, grid=flux_token_grid(height, width))
    transformer(hidden_states=packed_latents,
                encoder_hidden_states=call.extend_text(t5_prompt),     # [full ; identifier-free], 2 x 512 tokens
                txt_ids=JointCall.extend_ids(txt_ids),                  # the free stream at the text's positions
                pooled_projections=pooled_clip_of_the_identifier_free_prompt,
                img_ids=img_ids, timestep=t, joint_attention_kwargs={"productbg": call})

The pooled CLIP vector modulates every token (AdaLN) of both streams and of the image, the product's included:
it must be the identifier-free prompt's, or the identifier reaches product cells through the modulation. Only the
image tokens reach the output (``norm_out`` / ``proj_out``), so the extra stream costs compute, not a change in
what the model returns.

Without ``productbg`` in the kwargs the processor is diffusers' ``FluxAttnProcessor`` (SDPA), so a transformer can
keep it installed. No diffusers import: the processor only uses the ``FluxAttention`` module it is handed, whose
layout (``to_q``/``to_k``/``to_v``, ``add_*_proj``, ``norm_q``/``norm_k``/``norm_added_*``, ``to_out`` /
``to_add_out``, optional fused ``to_qkv`` / ``to_added_qkv``) is that of diffusers 0.3x–0.42.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .joint import JointCall

CALL_KEY = "productbg"


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Flux's rotary embedding on [B, S, heads, d] (pairs (x₀, x₁) rotate, computed in float32), as diffusers'
    ``apply_rotary_emb(use_real=True, use_real_unbind_dim=-1, sequence_dim=1)``; cos / sin [S, d]."""
    cos, sin = cos[None, :, None, :].to(x.device), sin[None, :, None, :].to(x.device)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _projections(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """q, k, v of the image (or joint) tokens and of the text tokens (None in single blocks), [B, S, heads, d]."""
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if encoder_hidden_states is None or attn.added_kv_proj_dim is None:
        return q, k, v, None
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
        eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
    else:
        eq = attn.add_q_proj(encoder_hidden_states)
        ek = attn.add_k_proj(encoder_hidden_states)
        ev = attn.add_v_proj(encoder_hidden_states)
    eq, ek, ev = (t.unflatten(-1, (-1, attn.head_dim)) for t in (eq, ek, ev))
    return q, k, v, (attn.norm_added_q(eq), attn.norm_added_k(ek), ev)


class FluxJointProcessor:
    """``FluxAttnProcessor`` plus identifier confinement on the joint attention (see the module docstring)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                 productbg: JointCall | None = None):
        q, k, v, text = _projections(attn, hidden_states, encoder_hidden_states)
        text_len = 0
        if text is not None:  # double block: [text ; image]
            text_len = text[0].shape[1]
            q, k, v = (torch.cat([t, i], dim=1) for t, i in zip(text, (q, k, v)))
        if image_rotary_emb is not None:
            q, k = apply_rope(q, *image_rotary_emb), apply_rope(k, *image_rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, S, d]

        if productbg is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        else:
            if attention_mask is not None:
                raise ValueError("productbg's Flux confinement does not take an attention mask")
            if text is not None:
                productbg.check_sequence(text_len, q.shape[2] - text_len)
            else:  # single block: the text length comes from the image grid
                productbg.check_sequence(q.shape[2] - productbg.image_len, productbg.image_len)
            out = productbg.attention(q, k, v)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)

        if text is None:
            return out
        text_out, image_out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


def install_flux_processors(transformer: torch.nn.Module) -> dict[str, int]:
    """Give every attention of a diffusers ``FluxTransformer2DModel`` a :class:`FluxJointProcessor`.

    Returns:
        ``{"double": n, "single": m}``, the blocks now confined when a call carries ``productbg``.
    """
    if not hasattr(transformer, "transformer_blocks") or not hasattr(transformer, "single_transformer_blocks"):
        raise TypeError(f"{type(transformer).__name__} is not a Flux transformer (no double / single blocks)")
    processor = FluxJointProcessor()
    for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
        block.attn.set_processor(processor)
    return {"double": len(transformer.transformer_blocks), "single": len(transformer.single_transformer_blocks)}
