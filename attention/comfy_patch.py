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
Sampling guard (a ``calc_cond_batch`` wrapper, once per sampler step, on the conditioning rather than per layer):
refuses area crops (ConditioningSetArea) the product mask cannot follow, refuses a conditioning whose identifier
prompt a node rebuilt (ConditioningAverage, rescaling: its rows could no longer be recognised, and the identifier
would reach the product unconfined), warns when the identifier's prompt is missing from the positive, and gives
ControlNets the identifier-free prompt (``crossattn_controlnet``; ComfyUI's control models run their own
cross-attention, unpatched).

Clones: newer ComfyUI's ``ModelPatcher.clone()`` copies only the dicts and lists of ``model_options`` and shares
every other object with the parent. Patch objects are therefore copied before anything is added to them (ours and
foreign ones alike), and :func:`copy_on_clone` (an ``on_clone`` callback) gives every clone its own copies of the
objects we own or stacked onto, so a later ``.add`` (IPAdapter_plus) never reaches the upstream model.

The attention itself runs through ComfyUI's optimized attention (the backend the user picked: sage, flash,
xformers, ``attn_precision``, ``optimized_attention_override``), for the text, identifier-free and style terms.
This module imports ComfyUI only lazily, inside sampling. No host sync in the hot path: sigma gates are tensors.
"""
from __future__ import annotations

import copy
import logging
import math
import sys
import weakref
from collections import OrderedDict
from typing import Any, Callable

import torch

from .guided import (SD15_LAYER_KEYS, CallPlan, Guidance, IdentifierGuidance, LayerContext, prompt_tokens,
                     extend_context, guided_cross_attention, plan_call)
from .identifier import AttentionFn, plain_attention
from .masks import infer_grid

OPTIONS_KEY = "productbg"
PLAN_KEY = "productbg_plan"
#: CONDITIONING extras key naming the identifier prompt a tensor was encoded as (``IdentifierSpec.tag``).
PROMPT_TAG_KEY = "productbg_prompt"
#: CONDITIONING extras key: how many Flux Redux tokens end this conditioning's text (Reference Style Redux sets it; the
#: identifier's prompt is then recognised in the text before them).
REDUX_TAG = "productbg_redux_tokens"
#: transformer_options key of the Flux Redux styles confined on a model (Reference Style Redux; ``comfy_joint``).
REDUX_KEY = "productbg_redux"
#: ``comfy.patcher_extension.WrappersMP.CALC_COND_BATCH`` and ``CallbacksMP.ON_CLONE`` (plain strings: no import).
CALC_COND_BATCH = "calc_cond_batch"
ON_CLONE = "on_clone"
CONTROLNET_CONTEXT = "crossattn_controlnet"  # the model cond ComfyUI's ControlNets read instead of c_crossattn
log = logging.getLogger(__name__)


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


def comfy_attention(extra_options: dict) -> AttentionFn:
    """ComfyUI's optimized attention with this layer's precision and transformer options (read at call time, so
    packs that replace it — sage attention and the like — and ``optimized_attention_override`` apply)."""
    # ComfyUI's UNet imported it before any attention call; absent, the adapter runs outside ComfyUI (unit tests)
    comfy_attn = sys.modules.get("comfy.ldm.modules.attention")
    if comfy_attn is None:
        return plain_attention
    precision = extra_options.get("attn_precision")

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                  mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None:
            return comfy_attn.optimized_attention(q, k, v, heads, attn_precision=precision,
                                                  transformer_options=extra_options)
        return comfy_attn.optimized_attention_masked(q, k, v, heads, mask, attn_precision=precision,
                                                     transformer_options=extra_options)
    return attention


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
    return LayerContext(layer_index=layer_index, grid=_grid(q, extra_options), plan=plan,
                        attention=comfy_attention(extra_options))


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

    def copy(self) -> "ProductBGAttn2":
        """A copy whose lists are its own (a later ``.add`` leaves this one alone); callbacks and their (possibly
        large) arguments are shared."""
        new = ProductBGAttn2(self.layer_index)
        new.callback = list(self.callback)
        new.kwargs = [dict(kw) for kw in self.kwargs]
        return new

    def __deepcopy__(self, memo: dict) -> "ProductBGAttn2":  # ModelPatcher.clone() in ComfyUI 0.3.x
        return self.copy()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        ctx = _layer_context(q, extra_options, self.layer_index)
        if ctx is not None:
            out = guided_cross_attention(q, k, v, heads, ctx)
            k, v = ctx.plan.text(k), ctx.plan.text(v)
        else:
            out = comfy_attention(extra_options)(q, k, v, heads, None)
        for callback, kwargs in zip(self.callback, self.kwargs):
            delta = callback(out, q, k, v, extra_options, **kwargs)
            gate = _callback_gate(kwargs, extra_options, q.shape[0])
            out = out + (delta if gate is None else delta * gate.to(delta.dtype))
        return out.to(q.dtype)


def _foreign_keys(attn2: dict, key: tuple[str, int]) -> list[tuple]:
    """Keys ``(block, number, transformer index)`` that ComfyUI looks up before ``key`` itself."""
    return [k for k in attn2 if len(k) == 3 and tuple(k[:2]) == tuple(key)]


def _carries_ours(obj: Any) -> bool:
    return any(kw.get("productbg") for kw in getattr(obj, "kwargs", None) or [] if isinstance(kw, dict))


def copy_for_write(obj: Any) -> Any:
    """A copy of an attn2 object to add to: ours via :meth:`ProductBGAttn2.copy`; a foreign one shallow-copied
    with its lists and dicts copied (its tensors, e.g. IPAdapter weights, stay shared)."""
    if isinstance(obj, ProductBGAttn2):
        return obj.copy()
    new = copy.copy(obj)
    for name, value in list(getattr(new, "__dict__", {}).items()):
        if isinstance(value, (list, dict)):
            setattr(new, name, copy.copy(value))
    return new


def _stack_onto(current: Any, key: tuple, index: int, **kwargs: Any) -> Any:
    """``current`` with our delta callback added — on a copy, never on the object itself (it may be shared with
    the input model); ``current`` itself when it already carries ours."""
    if not hasattr(current, "add"):
        raise ValueError(f"another node pack replaced cross-attention at {key} with "
                         f"{type(current).__name__}, which cannot be stacked with; apply productbg first")
    if _carries_ours(current):
        return current
    new = copy_for_write(current)
    new.add(productbg_delta, productbg=True, layer_index=index, sigma_start=math.inf, sigma_end=0.0, **kwargs)
    return new


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
                attn2[shadow] = _stack_onto(attn2[shadow], shadow, index)
        block = tuple(key[:2])
        if len(key) == 3 and key not in attn2 and attn2.get(block) is not None \
                and not isinstance(attn2[block], ProductBGAttn2):
            block_layers.setdefault(block, {})[key[2]] = index  # a foreign 2-part object: stack onto it below
            continue
        current = attn2.get(key)
        if current is None:
            attn2[key] = ProductBGAttn2(index)
        elif not isinstance(current, ProductBGAttn2):
            attn2[key] = _stack_onto(current, key, index)
    for block, by_index in block_layers.items():
        attn2[block] = _stack_onto(attn2[block], block, min(by_index.values()), by_block_index=by_index)
    replace["attn2"] = attn2
    to["patches_replace"] = replace
    wrappers = dict(to.get("wrappers", {}))
    wrappers[CALC_COND_BATCH] = {**wrappers.get(CALC_COND_BATCH, {}), OPTIONS_KEY: [guard_sampling]}
    to["wrappers"] = wrappers
    model_options["transformer_options"] = to
    return model_options


def patch_model(model: Any, guidance: Guidance, layer_keys: tuple[tuple, ...]) -> Any:
    """Install ``guidance`` on a ComfyUI ModelPatcher that the caller just cloned (:func:`install`), and make its
    clones copy our patch objects (:func:`copy_on_clone`, under any clone semantics); returns ``model``."""
    install(model.model_options, guidance, layer_keys)
    if hasattr(model, "add_callback_with_key") and not model.get_callbacks(ON_CLONE, OPTIONS_KEY):
        model.add_callback_with_key(ON_CLONE, OPTIONS_KEY, copy_on_clone)
    return model


def copy_on_clone(parent: Any, clone: Any) -> None:
    """``on_clone`` callback: the clone gets its own copies of our attn2 objects and of foreign ones carrying our
    callback, so an ``.add`` on the clone (IPAdapter_plus adds in place) never reaches the parent. The dicts on
    the path are already the clone's own (both clone semantics copy dicts)."""
    attn2 = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2")
    if not attn2:
        return
    for key, obj in attn2.items():
        if isinstance(obj, ProductBGAttn2) or (hasattr(obj, "add") and _carries_ours(obj)):
            attn2[key] = copy_for_write(obj)


# ------------------------------------------------------------------------------------------- sampling guard
#: Per sampling run (guidance, latent size, cond uuids): each cond's identifier-free context for ControlNets
#: ({} without one). Checked and built at the first step, reused by the others; only small tensors are kept.
_GUARDED: "OrderedDict[tuple, dict[str, torch.Tensor]]" = OrderedDict()
_WARNED_MISSING: "weakref.WeakSet[IdentifierGuidance]" = weakref.WeakSet()  # warned once per identifier


def guard_sampling(executor: Callable, model: Any, conds: list, x_in: torch.Tensor, timestep: Any,
                   model_options: dict) -> Any:
    """``calc_cond_batch`` wrapper: check the sampler's conditioning against the guidance (once per run), give
    ControlNets the identifier-free prompt, then run the step. See the module docstring."""
    guidance = model_options.get("transformer_options", {}).get(OPTIONS_KEY)
    styles = model_options.get("transformer_options", {}).get(REDUX_KEY)
    if guidance is not None and (guidance or styles or _has_redux(conds)):
        latent_hw = tuple(x_in.shape[2:])
        key = (id(guidance), latent_hw, tuple(str(x.get("uuid")) for group in conds if group for x in group))
        free = _GUARDED.get(key)
        if free is None:
            if styles:
                check_redux_conds(conds)
            free = check_conds(guidance, conds, latent_hw)
            _GUARDED[key] = free
            while len(_GUARDED) > 8:
                _GUARDED.popitem(last=False)
        if free:
            conds = _with_controlnet_contexts(conds, free)
    try:
        return executor(model, conds, x_in, timestep, model_options)
    finally:
        # The per-call plan holds the guidance (style encoders included): drop it with the step, so a cached
        # upstream model sharing the patch object does not keep a removed encoder alive.
        for p in model_options.get("transformer_options", {}).get("patches", {}).get("attn2_patch", ()):
            if isinstance(p, ProductBGContextPatch):
                p._last = None


def check_conds(guidance: Guidance, conds: list, latent_hw: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Check ComfyUI's processed conds (positive first) against the guidance; return, when a ControlNet is in
    them, each cond's (by uuid) context for the control model. Raises :class:`GuidanceError`."""
    _check_areas(guidance, conds, latent_hw)
    _check_identifier_prompts(guidance, conds[0] if conds else None)
    return _controlnet_contexts(guidance, conds)


def check_redux_conds(conds: list) -> None:
    """Refuse a run whose MODEL confines Redux tokens (Reference Style Redux) while its positive does not carry them:
    the adapter would cut the prompt's own last tokens instead."""
    if not any(x.get(REDUX_TAG) for x in (conds[0] if conds else None) or ()):
        raise GuidanceError("productbg: the MODEL comes from Reference Style Redux but the sampler's positive is not "
                            "its conditioning output: connect both of its outputs (MODEL and conditioning)")


def _check_areas(guidance: Guidance, conds: list, latent_hw: tuple[int, ...]) -> None:
    """Refuse a cond that samples a crop of the latent (ConditioningSetArea, by pixels or by percentage)."""
    if not any(getattr(g, "product", None) is not None for g in (*guidance.identifiers, *guidance.styles)):
        return
    for group in conds:
        for x in group or ():
            area = x.get("area")
            if area is None:
                continue
            if isinstance(area[0], str):  # ("percentage", h, w, y, x): ComfyUI resolves it before sampling
                cropped = any(float(a) < 1.0 for a in area[1:1 + (len(area) - 1) // 2])
            else:
                dims = len(area) // 2
                cropped = any(min(int(full) - int(area[dims + i]), int(area[i])) < int(full)
                              for i, full in enumerate(latent_hw[-dims:]))
            if cropped:
                raise GuidanceError(
                    "productbg: an area conditioning (ConditioningSetArea) samples a crop of the latent, and the "
                    "product mask cannot follow a crop: use ConditioningSetMask (the same effect on the full "
                    "latent), or apply the area to a model without productbg's patch")


def _holds_prompt(context: torch.Tensor, g: IdentifierGuidance) -> bool:
    """Whether ``context`` [1, L, width] holds ``g``'s encoded prompt in one of its 77·k periods."""
    prompt = g.prompt(context.device, context.dtype)
    positive = torch.ones(context.shape[0], dtype=torch.bool, device=context.device)
    return bool(prompt_tokens(context, g, prompt, positive).any())


def _has_redux(conds: list) -> bool:
    return any(x.get(REDUX_TAG) for group in conds if group for x in group)


def _prompt_part(x: dict) -> torch.Tensor | None:
    """A processed cond's text without the Redux tokens appended to it (``REDUX_TAG``)."""
    context, redux = x.get("cross_attn"), int(x.get(REDUX_TAG) or 0)
    return context[:, :context.shape[1] - redux] if context is not None and redux else context


def _check_identifier_prompts(guidance: Guidance, positive: list | None) -> None:
    for g in guidance.identifiers:
        if g.strength == 0 or g.spec.prompt_context is None:
            continue
        found = rebuilt = False
        for x in positive or ():
            context = _prompt_part(x)
            if context is None:
                continue
            if _holds_prompt(context, g):
                found = True
            elif g.spec.tag is not None and x.get(PROMPT_TAG_KEY) == g.spec.tag:
                rebuilt = True
        if rebuilt:
            raise GuidanceError(
                "productbg: a node between Category Prompt / Background Words and the sampler rebuilt the prompt's "
                "conditioning (ConditioningAverage, a rescaling or weighting node...), so its rows can no longer be "
                "recognised and the identifier would reach the product unconfined. Connect the prompt's "
                "conditioning to the sampler unchanged (Combine, Concat, SetMask and timestep ranges are fine)")
        if not found and g not in _WARNED_MISSING:
            _WARNED_MISSING.add(g)
            log.warning("productbg: Mask-Guided Attention's identifier prompt is not among the sampler's positive "
                        "conditioning, so nothing is confined; connect Category Prompt / Background Words' "
                        "conditioning to the sampler (a node that rebuilt it, e.g. ConditioningAverage, also "
                        "hides it)")


def _controlnet_contexts(guidance: Guidance, conds: list) -> dict[str, torch.Tensor]:
    """With a ControlNet in the conditioning, every cond's context with each identifier prompt replaced by its
    identifier-free prompt (unchanged elsewhere), by cond uuid; {} without a ControlNet. The control model then
    never sees the identifier, so its residuals cannot carry it onto the product."""
    every = [x for group in conds if group for x in group]
    if not (guidance.needs_plain_context or _has_redux(conds)) or not any("control" in x for x in every):
        return {}
    free = {}
    for x in every:
        context = _prompt_part(x)  # a ControlNet sees no Redux tokens either: its residuals reach the product
        if context is None or CONTROLNET_CONTEXT in x.get("model_conds", {}):
            continue
        plan = plan_call(guidance, context, (0,) * context.shape[0], recognise_prompts=True)
        free[str(x.get("uuid"))] = extend_context(plan, context)[:, context.shape[1]:]
    return free


def _with_controlnet_contexts(conds: list, free: dict[str, torch.Tensor]) -> list:
    """New cond dicts with ``crossattn_controlnet`` set (on every cond, so cond and uncond still batch). The model
    cond is built with the class of the cond's own ``c_crossattn`` (ComfyUI's CONDCrossAttn): no ComfyUI import."""
    def one(x: dict) -> dict:
        context, model_conds = free.get(str(x.get("uuid"))), x.get("model_conds", {})
        if context is None or "c_crossattn" not in model_conds:
            return x
        return {**x, "model_conds": {**model_conds, CONTROLNET_CONTEXT: type(model_conds["c_crossattn"])(context)}}
    return [[one(x) for x in group] if group else group for group in conds]


def current_guidance(model_options: dict) -> Guidance:
    """The guidance already installed on a model (empty if none)."""
    return model_options.get("transformer_options", {}).get(OPTIONS_KEY) or Guidance()
