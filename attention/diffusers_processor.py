"""diffusers adapter: an attention processor that runs identifier confinement and reference style.

Install with :func:`install_processors` (``unet.set_attn_processor``); pass the per-call data as
``unet(..., cross_attention_kwargs={"productbg": DiffusersCall(...)})``. Self-attention layers get the same
processor (so the keyword is accepted everywhere) and run plain attention. No diffusers import at module level:
the processor only uses the ``Attention`` module it is handed.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from .guided import CallPlan, Guidance, LayerContext, extend_context, guided_cross_attention, plan_call
from .identifier import identifier_attention_mass, plain_attention
from .masks import infer_grid

CALL_KEY = "productbg"


@dataclass
class DiffusersCall:
    """Per-forward data for the processors.

    Attributes:
        guidance: identifiers and styles for this run.
        latent_hw: (H, W) of the latent the UNet runs on (to find each layer's grid).
        cond_or_uncond: chunk layout of the batch, 0 = positive; diffusers pipelines put the negative first,
            hence the default ``(1, 0)``. Use ``(0,)`` for a batch of positives only (training).
        mass_losses: when a list, every cross-attention layer appends the first identifier's attention mass
            inside the product (for the attention-mass loss); average it over layers.
    """

    guidance: Guidance
    latent_hw: tuple[int, int]
    cond_or_uncond: tuple[int, ...] = (1, 0)
    mass_losses: list | None = field(default=None)
    _last: tuple | None = field(default=None, repr=False)

    def plan(self, context: torch.Tensor) -> tuple[CallPlan, torch.Tensor]:
        """The call plan (once per UNet forward: every layer gets the same context tensor) and the extended
        context. The extension is rebuilt per layer, on purpose: under gradient checkpointing a block's
        recomputation must record the same autograd ops as its forward (it is a cheap ``where`` + ``cat``)."""
        last = self._last
        if last is not None and last[0]() is context:
            plan = last[1]
        else:
            plan = plan_call(self.guidance, context, tuple(self.cond_or_uncond))
            self._last = (weakref.ref(context), plan)
        return plan, extend_context(plan, context)


class ProductBGAttnProcessor:
    """``AttnProcessor2_0`` plus productbg's guided cross-attention (see module docstring)."""

    def __init__(self, layer_index: int | None) -> None:
        self.layer_index = layer_index  # index among cross-attention layers; None for self-attention

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 productbg: DiffusersCall | None = None, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        guided = is_cross and self.layer_index is not None and productbg is not None and productbg.guidance
        if guided and attention_mask is None:
            plan, encoder_hidden_states = productbg.plan(encoder_hidden_states)
        else:
            plan = None
        context = hidden_states if not is_cross else (
            attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            raise NotImplementedError("productbg's processor does not support q/k-normalised attention")

        if plan is not None:
            ctx = LayerContext(layer_index=self.layer_index, grid=infer_grid(q.shape[1], latent_hw=productbg.latent_hw),
                               plan=plan)
            out = guided_cross_attention(q, k, v, attn.heads, ctx)
            if productbg.mass_losses is not None:
                productbg.mass_losses.append(self._mass(q, plan.text(k), attn.heads, ctx))
        else:
            mask = None
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask, k.shape[1], q.shape[0])
                mask = mask.view(q.shape[0], attn.heads, -1, mask.shape[-1])
            out = plain_attention(q, k, v, attn.heads, attn_mask=mask)

        out = attn.to_out[1](attn.to_out[0](out.to(q.dtype)))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _mass(q: torch.Tensor, k: torch.Tensor, heads: int, ctx: LayerContext) -> torch.Tensor:
        plan = ctx.plan
        if not plan.owners:
            return q.new_zeros(())
        o = plan.owners[0]
        cols = o.guidance.columns(k.shape[1], q.device)
        coverage = plan.coverage(o.guidance, ctx.grid, q.shape[0], q.device)
        blend, bias = plan.weights(ctx.grid, q.shape[0], q.device, q.dtype)
        share = None if blend is None else 1.0 - blend[:, :, 0]
        return identifier_attention_mass(q, k, heads, cols, o.rows.to(q.device) > 0, coverage, bias, share)


def install_processors(unet: torch.nn.Module) -> list[str]:
    """Give every attention layer of ``unet`` a :class:`ProductBGAttnProcessor`.

    Cross-attention layers are numbered in ``unet.attn_processors`` order (down, up, mid for SD1.5 — the
    IP-Adapter order, matching ``guided.SD15_LAYER_KEYS``).

    Returns:
        the names of the cross-attention layers, in layer-index order.
    """
    names = list(unet.attn_processors.keys())
    cross = [n for n in names if n.endswith("attn2.processor")]
    index = {n: i for i, n in enumerate(cross)}
    unet.set_attn_processor({n: ProductBGAttnProcessor(index.get(n)) for n in names})
    return cross
