"""ComfyUI adapter: one attn2 replace object per cross-attention block.

ComfyUI calls ``patches_replace["attn2"][key](q, k, v, extra_options)`` with projected q/k/v and expects the
attention output before ``to_out``. Our object reads the run's :class:`Guidance` from
``transformer_options["productbg"]`` (ComfyUI copies transformer options into ``extra_options``), works out the
layer's grid and positive rows, and calls :func:`guided_cross_attention`.

Stacking (the ComfyUI_IPAdapter_plus convention): objects at a key expose ``.add(callback, **kwargs)``; each
callback is ``callback(out, q, k, v, extra_options, **kwargs) -> delta`` added to the output while the current
sigma lies in ``[sigma_end, sigma_start]``. If such a foreign object already sits at a key we add a delta
callback to it; our own object offers the same ``.add`` so IPAdapter_plus can add to us. This module does not
import ComfyUI: it only touches the plain dicts of ``model_options``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .guided import SD15_LAYER_KEYS, Guidance, LayerContext, guided_cross_attention, positive_rows_from
from .identifier import plain_attention
from .masks import infer_grid

OPTIONS_KEY = "productbg"


def _layer_context(q: torch.Tensor, extra_options: dict, layer_index: int) -> LayerContext:
    exact = extra_options.get("activations_shape")
    latent = extra_options.get("original_shape")
    grid = infer_grid(q.shape[1], latent_hw=tuple(latent[-2:]) if latent else None,
                      exact_hw=tuple(exact[-2:]) if exact else None)
    cond_or_uncond = extra_options.get("cond_or_uncond") or [0]
    sigmas = extra_options.get("sigmas")
    sigma = float(sigmas.detach().flatten()[0]) if isinstance(sigmas, torch.Tensor) and sigmas.numel() else None
    return LayerContext(layer_index=layer_index, grid=grid,
                        positive_rows=positive_rows_from(cond_or_uncond, q.shape[0], q.device),
                        chunks=len(cond_or_uncond), sigma=sigma)


def productbg_delta(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict,
                    layer_index: int = 0, **_: Any) -> torch.Tensor:
    """What productbg adds to plain attention; the callback we add to a foreign (IPAdapter-style) object."""
    guidance = extra_options.get(OPTIONS_KEY)
    if not guidance:
        return torch.zeros_like(out)
    ctx = _layer_context(q, extra_options, layer_index)
    return guided_cross_attention(q, k, v, extra_options["n_heads"], guidance, ctx, include_base=False).to(out.dtype)


class ProductBGAttn2:
    """The attn2 replace object productbg puts at each cross-attention block key."""

    def __init__(self, layer_index: int) -> None:
        self.layer_index = layer_index
        self.callback: list[Callable[..., torch.Tensor]] = []
        self.kwargs: list[dict] = []

    def add(self, callback: Callable[..., torch.Tensor], **kwargs: Any) -> None:
        """Stack another attention contribution (IPAdapter_plus calls this with sigma_start/sigma_end)."""
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def to(self, device_or_dtype: Any) -> "ProductBGAttn2":
        """ComfyUI's ``model_patches_to`` hook (it assigns the result back). We hold no tensors: the style
        weights are a ModelPatcher of their own (``StyleGuidance.models``), which ComfyUI loads and offloads."""
        return self

    def __deepcopy__(self, memo: dict) -> "ProductBGAttn2":
        # ModelPatcher.clone() deep-copies model_options: copy our lists (so a later .add on the clone leaves
        # the original alone) but share the callbacks and their (possibly large) arguments.
        new = ProductBGAttn2(self.layer_index)
        new.callback = list(self.callback)
        new.kwargs = [dict(kw) for kw in self.kwargs]
        return new

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        guidance: Guidance | None = extra_options.get(OPTIONS_KEY)
        ctx = None
        if guidance:
            ctx = _layer_context(q, extra_options, self.layer_index)
            out = guided_cross_attention(q, k, v, heads, guidance, ctx)
        else:
            out = plain_attention(q, k, v, heads)
        if self.callback:
            sigma = ctx.sigma if ctx is not None else _layer_context(q, extra_options, self.layer_index).sigma
            for callback, kwargs in zip(self.callback, self.kwargs):
                if sigma is None or kwargs.get("sigma_end", 0.0) <= sigma <= kwargs.get("sigma_start", math.inf):
                    out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(q.dtype)


def install(model_options: dict, guidance: Guidance,
            layer_keys: tuple[tuple[str, int], ...] = SD15_LAYER_KEYS) -> dict:
    """Put ``guidance`` and our attn2 objects into (a clone's) ``model_options``; returns it.

    Call on ``model.clone().model_options``: the dicts along the path are copied before writing, so other
    clones that share them stay untouched. Keys already holding an object with ``.add`` (ours or
    IPAdapter_plus') keep it; ours reads the new guidance from transformer options, a foreign one gets our
    delta callback added once.
    """
    to = dict(model_options.get("transformer_options", {}))
    to[OPTIONS_KEY] = guidance
    patches = dict(to.get("patches_replace", {}))
    attn2 = dict(patches.get("attn2", {}))
    for index, key in enumerate(layer_keys):
        current = attn2.get(key)
        if current is None:
            attn2[key] = ProductBGAttn2(index)
        elif isinstance(current, ProductBGAttn2):
            continue
        elif hasattr(current, "add"):
            if not any(kw.get("productbg") for kw in getattr(current, "kwargs", [])):
                current.add(productbg_delta, productbg=True, layer_index=index,
                            sigma_start=math.inf, sigma_end=0.0)
        else:
            raise ValueError(f"another node pack replaced cross-attention at {key} with "
                             f"{type(current).__name__}, which cannot be stacked with; apply productbg first")
    patches["attn2"] = attn2
    to["patches_replace"] = patches
    model_options["transformer_options"] = to
    return model_options


def current_guidance(model_options: dict) -> Guidance:
    """The guidance already installed on a model (empty if none)."""
    return model_options.get("transformer_options", {}).get(OPTIONS_KEY) or Guidance()
