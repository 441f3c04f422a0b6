"""diffusers adapter for Flux.1: an attention processor for ``FluxTransformer2DModel`` that confines an identifier
and / or Flux Redux reference-style tokens to the background in every double- and single-stream block (the math:
``joint``).

Install with :func:`install_flux_processors`; then per model call::

    call = JointCall(identifier, grid=flux_token_grid(height, width))               # an identifier
    call = JointCall(identifier, grid, style=ReduxStyle(tokens=729))                # + a Redux reference
    call = JointCall(None, grid, style=ReduxStyle(729, product=ProductMask(mask)),  # a Redux reference alone
                     text_tokens=prompt_embeds.shape[1])
    transformer(hidden_states=packed_latents,
                **confined_inputs(call, prompt_embeds, txt_ids),  # text, its ids, joint_attention_kwargs
                pooled_projections=pooled_clip_of_the_identifier_free_prompt,
                img_ids=img_ids, timestep=t)

``prompt_embeds`` is the text the model would get unpatched: T5's prompt ([B, L, 4096]), or with a Redux
reference ``FluxPriorReduxPipeline``'s ``prompt_embeds``, ``[T5 prompt ; Redux tokens]`` ([B, L + 729, 4096]: the
Redux tokens last). :func:`confined_inputs` appends the free stream (``JointCall.extend_text``: the identifier-free
prompt, without the Redux tokens while the style is confined) and its position ids (``JointCall.extend_ids``: the
free stream at its own text's positions; Flux's text ids are zeros, so zeros of its length). Through diffusers'
``FluxPipeline`` the same goes as ``prompt_embeds=call.extend_text(prompt_embeds)`` and
``joint_attention_kwargs={"productbg": call}`` (the pipeline's text ids are zeros of the extended length) for a call
without a sigma range; a sigma range needs the call per step (``call.for_call(sigma=...)``).

The pooled CLIP vector modulates every token (AdaLN) of both streams and of the image, the product's included:
with an identifier it must be the identifier-free prompt's, or the identifier reaches product cells through the
modulation (Redux leaves the pooled vector alone). Only the image tokens reach the output (``norm_out`` /
``proj_out``), so the extra stream costs compute, not a change in what the model returns.

Without ``productbg`` in the kwargs the processor is diffusers' ``FluxAttnProcessor`` (SDPA), so a transformer can
keep it installed. No diffusers import: the processor only uses the ``FluxAttention`` module it is handed, whose
layout (``to_q``/``to_k``/``to_v``, ``add_*_proj``, ``norm_q``/``norm_k``/``norm_added_*``, ``to_out`` /
``to_add_out``, optional fused ``to_qkv`` / ``to_added_qkv``) is that of diffusers 0.3x–0.42.
"""
from __future__ import annotations

from typing import Any

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
    """``FluxAttnProcessor`` plus identifier / Redux confinement on the joint attention (see the module
    docstring). The text of a double block, or the text part of a single block's sequence, is
    ``[full (Lf) ; free (Lg)]``; ``JointCall.check_sequence`` refuses any other length."""

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


def confined_inputs(call: JointCall, encoder_hidden_states: torch.Tensor,
                    txt_ids: torch.Tensor) -> dict[str, Any]:
    """The transformer's text arguments for one confined call.

    Args:
        call: this model call's :class:`JointCall` (its sigma set if a component has a sigma range).
        encoder_hidden_states: [B, Lf, 4096], the text the unpatched model would get: T5's prompt, or
            ``[T5 prompt ; Redux tokens]`` (``FluxPriorReduxPipeline``'s ``prompt_embeds``).
        txt_ids: the text's position ids, [Lf, 3] (or diffusers' older [B, Lf, 3]).

    Returns:
        ``encoder_hidden_states`` [B, Lf + Lg, 4096] and ``txt_ids`` with the free stream appended, and
        ``joint_attention_kwargs`` carrying the call: keyword arguments of ``FluxTransformer2DModel.forward``.
    """
    return {"encoder_hidden_states": call.extend_text(encoder_hidden_states),
            "txt_ids": call.extend_text_ids(txt_ids), "joint_attention_kwargs": {CALL_KEY: call}}
