"""ComfyUI adapter for joint attention (Flux.1): identifier confinement through ComfyUI's own DiT hooks.

Installed as two things in the patched clone's ``transformer_options``, never as block replacements, so that other
packs' ``patches_replace["dit"]`` blocks, their diffusion-model wrappers and their attention overrides keep
working beside ours:

* a **diffusion-model wrapper** (``WrappersMP.DIFFUSION_MODEL``), once per model call: it appends to the T5 text
  each row's **free stream** — the row's text with every period that holds an identifier's prompt replaced by the
  prompt encoded without the identifier (recognised on the device exactly as the UNet adapter recognises prompts,
  :func:`guided.plan_call`), the row's own text elsewhere — so every block runs on ``[full ; free ; image]``
  (ComfyUI sizes the text positions from the context: the free stream sits at the text's own positions, 0), builds
  the run's :class:`joint.JointPlan` once, and sets ``optimized_attention_override`` for the call;
* with Flux **Redux** tokens appended to the positive text (Reference Style Redux: the conditioning is tagged with
  their count R, ``REDUX_TAG``, and the style is listed under ``REDUX_KEY``), the free stream is the prompt part
  alone, ``Lf − R`` tokens: product cells see neither the identifier nor the reference's tokens;
* that **attention override**, in every double- and single-stream block: on a joint sequence of the expected
  length it runs :func:`joint.confined_joint_attention` with ComfyUI's own kernel (the backend the user picked,
  and any override another pack set before ours) for the unmasked sub-attentions; any other attention call
  passes through untouched.

The blocks' outputs keep only the image tokens (``forward_orig`` slices the text off before the last layer), so
the free stream costs compute and changes nothing else. The pooled CLIP-L vector must be the identifier-free
prompt's (Category Prompt and Background Words make it so). The sampling guard of the UNet adapter
(``comfy_patch.guard_sampling``) runs too: area crops refused, rebuilt prompts refused, ControlNets given the
identifier-free text.

No host sync per call unless a sigma range is set (then one read of the current sigma per model call); the plan
is built on the host once per run and layout. This module imports ComfyUI nowhere.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch

from .comfy_patch import (CALC_COND_BATCH, OPTIONS_KEY, REDUX_KEY, REDUX_TAG, GuidanceError, _check_latent,
                          guard_sampling)
from .guided import Guidance, extend_context, plan_call
from .joint import JointPlan, ReduxStyle, build_plan, confined_joint_attention
from .masks import rows_for_batch

#: ``comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL`` (a plain string: no import).
DIFFUSION_MODEL = "diffusion_model"
OVERRIDE_KEY = "optimized_attention_override"
__all__ = ["DIFFUSION_MODEL", "OVERRIDE_KEY", "REDUX_KEY", "REDUX_TAG", "JointRun", "confine_joint", "install_joint",
           "token_grid"]
PATCH_SIZE = 2  # Flux packs 2×2 latent cells into one image token
#: The run's plans, kept with the first identifier or style confined (they live as long as the patched model does).
_PLANS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def token_grid(latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The image-token grid of a latent of ``latent_hw`` as ComfyUI's Flux pads it (odd sides round up)."""
    h, w = latent_hw
    return (h + PATCH_SIZE // 2) // PATCH_SIZE, (w + PATCH_SIZE // 2) // PATCH_SIZE


def _sigma(transformer_options: dict) -> float | None:
    sigmas = transformer_options.get("sigmas")
    return float(sigmas.flatten()[0]) if isinstance(sigmas, torch.Tensor) and sigmas.numel() else None


def _in_range(obj: Any, sigma: float | None) -> bool:
    return not obj.gated or sigma is None or obj.sigma_end <= sigma <= obj.sigma_start


def _active(guidance: Guidance | None, styles: tuple, transformer_options: dict) -> tuple[list, list]:
    """The identifiers confining by context and the Redux styles confined at this call (strength > 0 and, when
    gated, inside their range: one read of the current sigma, only then)."""
    identifiers = [g for g in (guidance.identifiers if guidance else ()) if g.confinement == "context" and g.strength > 0]
    styles = [s for s in styles if s.strength > 0]
    if any(o.gated for o in (*identifiers, *styles)):
        sigma = _sigma(transformer_options)
        identifiers = [g for g in identifiers if _in_range(g, sigma)]
        styles = [s for s in styles if _in_range(s, sigma)]
    return identifiers, styles


def _share(confined: list, grid: tuple[int, int], rows: int, cond_or_uncond: tuple[int, ...]) -> torch.Tensor:
    """[rows, N] float32 on the host: ``strength · (1 − m)`` on positive rows — the largest over what is confined
    (an identifier and a Redux style at different strengths: product cells take the larger) — 0 on negative rows.
    A positive row that does not hold an identifier's prompt gets its own text as free stream, so whichever view
    its cells take is the same attention."""
    chunks = len(cond_or_uncond)
    positive = torch.tensor(_positive(cond_or_uncond, rows), dtype=torch.float32)[:, None]
    share = torch.zeros(rows, grid[0] * grid[1])
    for o in confined:
        background = rows_for_batch(o.product.background(grid, torch.device("cpu")), rows, chunks)
        share = torch.maximum(share, (1.0 - background) * positive * o.strength)
    return share


def _positive(cond_or_uncond: tuple[int, ...], rows: int) -> list[bool]:
    chunks = len(cond_or_uncond)
    return [cond_or_uncond[r // (rows // chunks)] == 0 for r in range(rows)]


class JointRun:
    """One model call's confinement: its plan and the attention override handed to every block."""

    def __init__(self, plan: JointPlan, previous: Callable | None) -> None:
        self.plan = plan
        self.sequence = plan.sequence_len
        self.previous = previous

    def _host(self, func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.previous(func, *args, **kwargs) if self.previous is not None else func(*args, **kwargs)

    def __call__(self, func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``optimized_attention_override``: ``func`` is ComfyUI's attention backend, ``args`` its (q, k, v,
        heads, ...) — [B, heads, S, d] after RoPE in Flux's blocks (``skip_reshape``)."""
        q, k, v, heads = args[:4]
        if (len(args) > 4 or kwargs.get("mask") is not None or not kwargs.get("skip_reshape")
                or q.ndim != 4 or q.shape[2] != self.sequence):
            return self._host(func, *args, **kwargs)
        rest = {key: value for key, value in kwargs.items() if key not in ("skip_reshape", "skip_output_reshape")}

        def kernel(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
            return self._host(func, q_, k_, v_, heads, skip_reshape=True, skip_output_reshape=True, **rest)

        out = confined_joint_attention(q, k, v, self.plan, kernel)
        if kwargs.get("skip_output_reshape"):
            return out
        b, h, s, d = out.shape
        return out.transpose(1, 2).reshape(b, s, h * d)


def confine_joint(executor: Callable, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                  y: torch.Tensor | None = None, guidance: torch.Tensor | None = None, ref_latents: Any = None,
                  control: Any = None, transformer_options: dict | None = None, **kwargs: Any) -> torch.Tensor:
    """The diffusion-model wrapper (see the module docstring); ComfyUI calls it with Flux's ``_forward`` args."""
    transformer_options = {} if transformer_options is None else transformer_options
    run_guidance: Guidance | None = transformer_options.get(OPTIONS_KEY)
    identifiers, styles = _active(run_guidance, transformer_options.get(REDUX_KEY, ()), transformer_options)
    cond_or_uncond = tuple(transformer_options.get("cond_or_uncond") or (0,))
    if not (identifiers or styles) or 0 not in cond_or_uncond:
        return executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)
    if ref_latents:
        raise GuidanceError("productbg: reference latents (Kontext-style) add image tokens the product mask does "
                            "not cover; remove ReferenceLatent from the conditioning, or use a model without "
                            "Mask-Guided Attention")
    if kwargs.get("attention_mask") is not None:
        raise GuidanceError("productbg: a text attention mask is set on the conditioning (StyleModelApply's "
                            "attn_bias, a masked text encoder); Mask-Guided Attention on Flux needs the unmasked "
                            "text: use Reference Style Redux's strength, or remove the node that adds the mask")
    if run_guidance:
        _check_latent(run_guidance, {"original_shape": tuple(x.shape)})
    rows, text_len = context.shape[0], context.shape[1]
    style_len = sum(s.tokens for s in styles)
    if style_len >= text_len:
        raise GuidanceError(f"productbg: the text has {text_len} tokens but Reference Style Redux appended "
                            f"{style_len}: connect its conditioning output to the sampler's positive")
    prompt = context[:, :text_len - style_len]
    free = prompt
    if identifiers:
        call = plan_call(Guidance(identifiers=tuple(identifiers)), prompt, cond_or_uncond, recognise_prompts=True)
        free = extend_context(call, prompt)[:, prompt.shape[1]:]
    grid = token_grid(tuple(x.shape[-2:]))
    plan = _plan((*identifiers, *styles), grid, rows, cond_or_uncond, text_len, prompt.shape[1], x.device, x.dtype)
    previous = transformer_options.get(OVERRIDE_KEY)
    transformer_options[OVERRIDE_KEY] = JointRun(plan, previous)
    try:
        return executor(x, timestep, torch.cat([context, free], 1), y, guidance, ref_latents, control,
                        transformer_options, **kwargs)
    finally:
        if previous is None:
            transformer_options.pop(OVERRIDE_KEY, None)
        else:
            transformer_options[OVERRIDE_KEY] = previous


def _plan(confined: tuple, grid: tuple[int, int], rows: int, cond_or_uncond: tuple[int, ...], text_len: int,
          free_len: int, device: torch.device, dtype: torch.dtype) -> JointPlan:
    """The run's plan for this layout (built on the host on first use, then cached with the first guidance)."""
    key = ("joint-plan", tuple(id(o) for o in confined), grid, rows, cond_or_uncond, text_len, free_len,
           str(device), dtype)
    cache = _PLANS.setdefault(confined[0], {})
    if key not in cache:
        cache[key] = build_plan(_share(list(confined), grid, rows, cond_or_uncond),
                                _positive(cond_or_uncond, rows), text_len, device, dtype, free_len)
    return cache[key]


def install_joint(model_options: dict, guidance: Guidance, redux: ReduxStyle | None = None) -> dict:
    """Put ``guidance`` (and a Redux style to confine), the diffusion-model wrapper and the sampling guard into (a
    clone's) ``model_options``; the dicts along the path are copied before writing, so other clones stay
    untouched. Returns it."""
    to = dict(model_options.get("transformer_options", {}))
    to[OPTIONS_KEY] = guidance
    if redux is not None:
        to[REDUX_KEY] = tuple(to.get(REDUX_KEY, ())) + (redux,)
    wrappers = dict(to.get("wrappers", {}))
    wrappers[DIFFUSION_MODEL] = {**wrappers.get(DIFFUSION_MODEL, {}), OPTIONS_KEY: [confine_joint]}
    wrappers[CALC_COND_BATCH] = {**wrappers.get(CALC_COND_BATCH, {}), OPTIONS_KEY: [guard_sampling]}
    to["wrappers"] = wrappers
    model_options["transformer_options"] = to
    return model_options
