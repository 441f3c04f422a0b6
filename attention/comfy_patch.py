"""ComfyUI adapter: one attn2 replace object per cross-attention block, and one attn2 patch per model.

ComfyUI runs, in every transformer block, first the ``patches["attn2_patch"]`` callables on the *unprojected*
query input and context, ``(n, context, value, extra_options) -> (n, context, value)``, then the block's
``patches_replace["attn2"][key](q, k, v, extra_options)`` on the projected q/k/v, which returns the attention
output before ``to_out``.

* :class:`ProductBGContextPatch` (the attn2 patch) builds the call's :class:`CallPlan` once per model call —
  which rows carry which identifier's prompt (recognised by its encoded context, so regional, combined and
  concatenated prompts are never confined by mistake), the sigma gates — and, for ``context`` confinement,
  appends each row's identifier-free context so the layer's own K/V weights project it (LoRA, low-VRAM casts
  and all). The plan travels to the replace object in ``extra_options`` (one dict per block call).
* :class:`ProductBGAttn2` (the replace object) runs :func:`guided_cross_attention` on it.

Stacking (the ComfyUI_IPAdapter_plus convention): objects at a key expose ``.add(callback, **kwargs)``; each
callback is ``callback(out, q, k, v, extra_options, **kwargs) -> delta`` added to the output while the current
sigma lies in ``[sigma_end, sigma_start]``. If such a foreign object already sits at a key — including the
``(block, number, transformer index)`` keys ComfyUI looks up first — we add a delta callback to it; our own
object offers the same ``.add`` and hands callbacks the text context's k / v, as they would get without us.
This module does not import ComfyUI: it only touches the plain dicts of ``model_options``. No host sync in the
hot path: sigma gates are tensors.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Callable

import torch

from .guided import SD15_LAYER_KEYS, CallPlan, Guidance, LayerContext, extend_context, guided_cross_attention, plan_call
from .identifier import plain_attention
from .masks import infer_grid

OPTIONS_KEY = "productbg"
PLAN_KEY = "productbg_plan"


class GuidanceError(ValueError):
    """A sampling set-up productbg cannot confine correctly (shown by ComfyUI on the sampler node)."""


def _grid(q: torch.Tensor, extra_options: dict) -> tuple[int, int]:
    exact = extra_options.get("activations_shape")
    latent = extra_options.get("original_shape")
    return infer_grid(q.shape[1], latent_hw=tuple(latent[-2:]) if latent else None,
                      exact_hw=tuple(exact[-2:]) if exact else None)


def _check_latent(guidance: Guidance, extra_options: dict) -> None:
    """Refuse a latent whose shape does not fit the product mask (area conditioning, tiled samplers)."""
    latent = extra_options.get("original_shape")
    if not latent:
        return
    h, w = int(latent[-2]), int(latent[-1])
    for g in (*guidance.identifiers, *guidance.styles):
        product = getattr(g, "product", None)
        if product is None:
            continue
        mh, mw = product.mask.shape[-2:]
        if abs(h * mw - w * mh) > max(mh, mw):  # more than one latent cell of aspect difference
            raise GuidanceError(
                f"productbg: the sampler runs on a {w * 8}x{h * 8} region but the product mask is {mw}x{mh}. "
                "Area conditioning (ConditioningSetArea) and tiled samplers crop the latent, and the mask "
                "cannot be aligned with a crop: use ConditioningSetMask, or sample the full image")


class ProductBGContextPatch:
    """The attn2 patch productbg adds once per model (see the module docstring)."""

    def __init__(self, layer_keys: tuple[tuple, ...]) -> None:
        self.layer_keys = layer_keys
        self._blocks = {tuple(key[:2]) for key in layer_keys}  # (block, number) of 2- and 3-tuple keys
        self._last: tuple[Any, Any, CallPlan] | None = None

    def __deepcopy__(self, memo: dict) -> "ProductBGContextPatch":
        return ProductBGContextPatch(self.layer_keys)

    def __call__(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict):
        guidance: Guidance | None = extra_options.get(OPTIONS_KEY)
        block = extra_options.get("block")
        if not guidance or block is None or tuple(block[:2]) not in self._blocks:
            return n, context, value
        plan = self._plan(guidance, context, extra_options)
        extra_options[PLAN_KEY] = plan
        if not plan.extended:
            return n, context, value
        extended = extend_context(plan, context)
        if value is context:
            return n, extended, extended
        return n, extended, torch.cat([value, plan.plain(extended)], dim=1)

    def _plan(self, guidance: Guidance, context: torch.Tensor, extra_options: dict) -> CallPlan:
        # Every block of one model call sees the same context tensor: plan once per call.
        last = self._last
        if last is not None and last[0]() is context and last[1] is guidance:
            return last[2]
        _check_latent(guidance, extra_options)
        cond_or_uncond = tuple(extra_options.get("cond_or_uncond") or (0,))
        sigmas = extra_options.get("sigmas")
        plan = plan_call(guidance, context, cond_or_uncond,
                         sigmas if isinstance(sigmas, torch.Tensor) else None, recognise_prompts=True)
        self._last = (weakref.ref(context), guidance, plan)
        return plan


def _layer_context(q: torch.Tensor, extra_options: dict, layer_index: int) -> LayerContext | None:
    plan = extra_options.get(PLAN_KEY)
    if plan is None:
        return None
    return LayerContext(layer_index=layer_index, grid=_grid(q, extra_options), plan=plan)


def _callback_gate(kwargs: dict, extra_options: dict, rows: int) -> torch.Tensor | None:
    """[rows, 1, 1] gate of a stacked callback from the current sigma, or None when it always acts."""
    start, end = kwargs.get("sigma_start", math.inf), kwargs.get("sigma_end", 0.0)
    sigmas = extra_options.get("sigmas")
    if (start == math.inf and end <= 0) or not isinstance(sigmas, torch.Tensor) or not sigmas.numel():
        return None
    sig = sigmas.detach().flatten()
    sig = sig if sig.numel() == rows else sig[:1].expand(rows)
    return ((sig >= end) & (sig <= start))[:, None, None]


def productbg_delta(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict,
                    layer_index: int = 0, by_block_index: dict | None = None, **_: Any) -> torch.Tensor:
    """What productbg adds to plain attention; the callback we add to a foreign (IPAdapter-style) object.

    ``by_block_index``: for a foreign object at a 2-part key of a multi-transformer block (SDXL), the layer
    index of each ``extra_options["block_index"]``.
    """
    if by_block_index is not None:
        layer_index = by_block_index.get(extra_options.get("block_index", 0), layer_index)
    ctx = _layer_context(q, extra_options, layer_index)
    if ctx is None:
        return torch.zeros_like(out)
    return guided_cross_attention(q, k, v, extra_options["n_heads"], ctx, include_base=False).to(out.dtype)


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
        ctx = _layer_context(q, extra_options, self.layer_index)
        if ctx is not None:
            out = guided_cross_attention(q, k, v, heads, ctx)
            k, v = ctx.plan.text(k), ctx.plan.text(v)
        else:
            out = plain_attention(q, k, v, heads)
        for callback, kwargs in zip(self.callback, self.kwargs):
            delta = callback(out, q, k, v, extra_options, **kwargs)
            gate = _callback_gate(kwargs, extra_options, q.shape[0])
            out = out + (delta if gate is None else delta * gate.to(delta.dtype))
        return out.to(q.dtype)


def _foreign_keys(attn2: dict, key: tuple[str, int]) -> list[tuple]:
    """Keys ``(block, number, transformer index)`` that ComfyUI looks up before ``key`` itself."""
    return [k for k in attn2 if len(k) == 3 and tuple(k[:2]) == tuple(key)]


def _stack_onto(current: Any, key: tuple, index: int, **kwargs: Any) -> None:
    if not hasattr(current, "add"):
        raise ValueError(f"another node pack replaced cross-attention at {key} with "
                         f"{type(current).__name__}, which cannot be stacked with; apply productbg first")
    if not any(kw.get("productbg") for kw in getattr(current, "kwargs", [])):
        current.add(productbg_delta, productbg=True, layer_index=index, sigma_start=math.inf, sigma_end=0.0,
                    **kwargs)


def install(model_options: dict, guidance: Guidance,
            layer_keys: tuple[tuple, ...] = SD15_LAYER_KEYS) -> dict:
    """Put ``guidance``, our attn2 patch and our attn2 objects into (a clone's) ``model_options``; returns it.

    Call on ``model.clone().model_options``: the dicts and lists along the path are copied before writing, so
    other clones that share them stay untouched. Keys already holding an object with ``.add`` (ours or
    IPAdapter_plus') keep it; ours reads the new guidance from transformer options, a foreign one gets our
    delta callback added once — also at a foreign ``(block, number, index)`` key that would shadow ours.

    ``layer_keys`` with 3 parts (SDXL): a foreign object at the 2-part ``(block, number)`` key of such a block
    would be shadowed by our 3-part objects (ComfyUI looks those up first), so there we put none and stack onto
    the foreign object instead, with the layer of each transformer (``extra_options["block_index"]``).
    """
    to = dict(model_options.get("transformer_options", {}))
    to[OPTIONS_KEY] = guidance
    patches = dict(to.get("patches", {}))
    attn2_patches = list(patches.get("attn2_patch", []))
    if not any(isinstance(p, ProductBGContextPatch) for p in attn2_patches):
        attn2_patches.append(ProductBGContextPatch(layer_keys))
    patches["attn2_patch"] = attn2_patches
    to["patches"] = patches
    replace = dict(to.get("patches_replace", {}))
    attn2 = dict(replace.get("attn2", {}))
    block_layers: dict[tuple, dict[int, int]] = {}
    for index, key in enumerate(layer_keys):
        for shadow in _foreign_keys(attn2, key):
            if not isinstance(attn2[shadow], ProductBGAttn2):
                _stack_onto(attn2[shadow], shadow, index)
        block = tuple(key[:2])
        if len(key) == 3 and key not in attn2 and attn2.get(block) is not None \
                and not isinstance(attn2[block], ProductBGAttn2):
            block_layers.setdefault(block, {})[key[2]] = index  # a foreign 2-part object: stack onto it below
            continue
        current = attn2.get(key)
        if current is None:
            attn2[key] = ProductBGAttn2(index)
        elif not isinstance(current, ProductBGAttn2):
            _stack_onto(current, key, index)
    for block, by_index in block_layers.items():
        _stack_onto(attn2[block], block, min(by_index.values()), by_block_index=by_index)
    replace["attn2"] = attn2
    to["patches_replace"] = replace
    model_options["transformer_options"] = to
    return model_options


def current_guidance(model_options: dict) -> Guidance:
    """The guidance already installed on a model (empty if none)."""
    return model_options.get("transformer_options", {}).get(OPTIONS_KEY) or Guidance()
