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

from typing import Any, Callable

import torch

from .comfy_patch import CALC_COND_BATCH, OPTIONS_KEY, GuidanceError, _check_latent, guard_sampling
from .guided import Guidance, extend_context, plan_call
from .joint import JointPlan, build_plan, confined_joint_attention
from .masks import rows_for_batch

#: ``comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL`` (a plain string: no import).
DIFFUSION_MODEL = "diffusion_model"
OVERRIDE_KEY = "optimized_attention_override"
PATCH_SIZE = 2  # Flux packs 2×2 latent cells into one image token


def token_grid(latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The image-token grid of a latent of ``latent_hw`` as ComfyUI's Flux pads it (odd sides round up)."""
    h, w = latent_hw
    return (h + PATCH_SIZE // 2) // PATCH_SIZE, (w + PATCH_SIZE // 2) // PATCH_SIZE


def _active(guidance: Guidance, transformer_options: dict) -> list:
    """The identifiers confining by context at this call (strength > 0 and, when gated, inside their range)."""
    active = [g for g in guidance.identifiers if g.confinement == "context" and g.strength > 0]
    if any(g.gated for g in active):
        sigmas = transformer_options.get("sigmas")
        sigma = float(sigmas.flatten()[0]) if isinstance(sigmas, torch.Tensor) and sigmas.numel() else None
        active = [g for g in active if not g.gated or sigma is None or g.sigma_end <= sigma <= g.sigma_start]
    return active


def _share(identifiers: list, grid: tuple[int, int], rows: int, cond_or_uncond: tuple[int, ...]) -> torch.Tensor:
    """[rows, N] float32 on the host: ``strength · (1 − m)`` on positive rows (the largest over identifiers), 0 on
    negative rows. A positive row that does not hold an identifier's prompt gets its own text as free stream, so
    whichever view its cells take is the same attention."""
    chunks = len(cond_or_uncond)
    positive = torch.tensor([cond_or_uncond[r // (rows // chunks)] == 0 for r in range(rows)],
                            dtype=torch.float32)[:, None]
    share = torch.zeros(rows, grid[0] * grid[1])
    for g in identifiers:
        background = rows_for_batch(g.product.background(grid, torch.device("cpu")), rows, chunks)
        share = torch.maximum(share, (1.0 - background) * positive * g.strength)
    return share


class JointRun:
    """One model call's confinement: its plan and the attention override handed to every block."""

    def __init__(self, plan: JointPlan, text_len: int, previous: Callable | None) -> None:
        self.plan = plan
        self.sequence = 2 * text_len + plan.image_len
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
    identifiers = _active(run_guidance, transformer_options) if run_guidance else []
    if not identifiers:
        return executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)
    if ref_latents:
        raise GuidanceError("productbg: reference latents (Kontext-style) add image tokens the product mask does "
                            "not cover; remove ReferenceLatent from the conditioning, or use a model without "
                            "Mask-Guided Attention")
    if kwargs.get("attention_mask") is not None:
        raise GuidanceError("productbg: a text attention mask is set on the conditioning; Mask-Guided Attention "
                            "on Flux needs the unmasked T5 text (remove the node that adds the mask)")
    _check_latent(run_guidance, {"original_shape": tuple(x.shape)})
    rows, text_len = context.shape[0], context.shape[1]
    cond_or_uncond = tuple(transformer_options.get("cond_or_uncond") or (0,))
    grid = token_grid(tuple(x.shape[-2:]))
    call = plan_call(Guidance(identifiers=tuple(identifiers)), context, cond_or_uncond, recognise_prompts=True)
    joint_text = extend_context(call, context)
    plan = _plan(identifiers, grid, rows, cond_or_uncond, text_len, x.device, x.dtype)
    previous = transformer_options.get(OVERRIDE_KEY)
    transformer_options[OVERRIDE_KEY] = JointRun(plan, text_len, previous)
    try:
        return executor(x, timestep, joint_text, y, guidance, ref_latents, control, transformer_options, **kwargs)
    finally:
        if previous is None:
            transformer_options.pop(OVERRIDE_KEY, None)
        else:
            transformer_options[OVERRIDE_KEY] = previous


def _plan(identifiers: list, grid: tuple[int, int], rows: int, cond_or_uncond: tuple[int, ...], text_len: int,
          device: torch.device, dtype: torch.dtype) -> JointPlan:
    """The run's plan for this layout (built on the host on first use, then cached on the first identifier)."""
    key = ("joint-plan", tuple(id(g) for g in identifiers), grid, rows, cond_or_uncond, text_len, str(device), dtype)
    cache = identifiers[0]._cache
    if key not in cache:
        chunks = len(cond_or_uncond)
        confined = [cond_or_uncond[r // (rows // chunks)] == 0 for r in range(rows)]
        cache[key] = build_plan(_share(identifiers, grid, rows, cond_or_uncond), confined, text_len, device, dtype)
    return cache[key]


def install_joint(model_options: dict, guidance: Guidance) -> dict:
    """Put ``guidance``, the diffusion-model wrapper and the sampling guard into (a clone's) ``model_options``;
    the dicts along the path are copied before writing, so other clones stay untouched. Returns it."""
    to = dict(model_options.get("transformer_options", {}))
    to[OPTIONS_KEY] = guidance
    wrappers = dict(to.get("wrappers", {}))
    wrappers[DIFFUSION_MODEL] = {**wrappers.get(DIFFUSION_MODEL, {}), OPTIONS_KEY: [confine_joint]}
    wrappers[CALC_COND_BATCH] = {**wrappers.get(CALC_COND_BATCH, {}), OPTIONS_KEY: [guard_sampling]}
    to["wrappers"] = wrappers
    model_options["transformer_options"] = to
    return model_options
