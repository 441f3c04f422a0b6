"""Sample previews during training: a few DDIM steps on fixed training items, product pasted back.

Each preview is one PNG, ``samples/step-000100.png``. ``train-cg``: training images on top, below what the
current weights generate for the same product and category (identifier confined to the background).
``train-pg``: references, targets, and what the current style encoder generates for the target's product from
the reference. Both use classifier-free guidance and the inference recipe's eroded keep-mask.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..attention import Guidance, ProductMask, StyleGuidance
from ..attention.diffusers_processor import CALL_KEY, DiffusersCall
from ..fileio import write_bytes_atomically
from .bgsynth import png_bytes
from .diffusion import morph

PREVIEW_EROSION = 0.04  # inference recipe: repaint mask = background dilated by ≈20 px at 512²


def _pick(dataset, count: int) -> list[int]:
    """First item of each of the first ``count`` categories (fixed across previews).

    With aspect-ratio buckets the items come from one bucket (they are stacked into one batch): the bucket that
    holds the most categories, the earliest such bucket on a tie.
    """
    ids = getattr(dataset, "bucket_ids", None)
    if ids is not None:
        held: dict[int, set[int]] = {}
        for c, b in zip(dataset._cat, ids):
            held.setdefault(b, set()).add(c)
        best = max(held, key=lambda b: len(held[b]))
    seen: dict[int, int] = {}
    for i, c in enumerate(dataset._cat):
        if ids is not None and ids[i] != best:
            continue
        seen.setdefault(c, i)
        if len(seen) == count:
            break
    return list(seen.values())


@torch.no_grad()
def cg_preview(module, dataset, out_dir: Path, step: int, count: int = 4, steps: int = 10,
               guidance_scale: float = 4.0) -> Path:
    """Write the ``train-cg`` preview PNG of ``step`` (training images / generated); returns its path."""
    items = [dataset[(i, 0)] for i in _pick(dataset, count)]
    image, mask = _stack(items, "image", module), _stack(items, "mask", module)
    cats = torch.tensor([it["category"] for it in items], device=image.device)
    cond, _ = module.encode_rows(cats)
    uncond, uncond_pooled = module.empty_prompt()
    plain_context, plain_pooled = module.plain_prompt()
    g = module.identifier_guidance(mask, 1.0, plain_context)
    pooled = None if plain_pooled is None else torch.cat([uncond_pooled.expand(len(items), -1),
                                                          plain_pooled.expand(len(items), -1)])
    composite = _generate(module, image, mask, torch.cat([uncond.expand_as(cond), cond]),
                          Guidance().with_identifier(g), steps, guidance_scale, pooled)
    return save_rows(out_dir, step, [image, composite])


@torch.no_grad()
def pg_preview(module, dataset, out_dir: Path, step: int, count: int = 4, steps: int = 10,
               guidance_scale: float = 4.0) -> Path:
    """Write the ``train-pg`` preview PNG of ``step`` (references / targets / generated); returns its path."""
    items = [dataset[(i, 0)] for i in _pick(dataset.base, count)]
    image, mask, ref = (_stack(items, k, module) for k in ("image", "mask", "reference"))
    tokens = module.style_tokens(ref, torch.Generator().manual_seed(0), drop=0.0)
    empty = module.style_tokens(ref, torch.Generator().manual_seed(0), drop=1.0)  # the null reference
    style = StyleGuidance(tokens, empty, module.encoder.layer_kv, product=ProductMask(mask[:, 0]))
    context = module.context.expand(2 * image.shape[0], -1, -1)
    pooled = None if module.pooled is None else module.pooled.expand(2 * image.shape[0], -1)
    composite = _generate(module, image, mask, context, Guidance().with_style(style), steps, guidance_scale, pooled)
    return save_rows(out_dir, step, [ref, image, composite])


def _stack(items: list[dict], key: str, module) -> torch.Tensor:
    return torch.stack([it[key] for it in items]).to(next(module.unet.parameters()).device)


def _generate(module, image, mask, context, guidance, steps: int, scale: float,
              pooled: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM with CFG (rows: uncond, cond), the inference recipe's keep-mask, product pasted back (SDXL:
    ``pooled`` [2B, W] in the same row order)."""
    # optional dependency: diffusers
    from diffusers import DDIMScheduler


    scheduler = DDIMScheduler.from_config(module.noise_scheduler.config)
    keep = morph(mask, -round(PREVIEW_EROSION * mask.shape[-1]))
    h, w = module.latent_hw(image)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(image.shape[0], 4, h, w, generator=gen).to(image.device) * scheduler.init_noise_sigma
    call = DiffusersCall(guidance, latent_hw=(h, w), cond_or_uncond=(1, 0))
    added = module.added_conditions({"image": torch.cat([image, image])}, pooled)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        inp = module.unet_input(x, torch.cat([image, image]), torch.cat([keep, keep]))
        eps = module.unet(inp.to(module.unet.dtype), t, context.to(module.unet.dtype),
                          cross_attention_kwargs={CALL_KEY: call}, added_cond_kwargs=added).sample
        u, c = eps.float().chunk(2)
        latents = scheduler.step(u + scale * (c - u), t, latents).prev_sample
    decoded = module.vae.decode(latents.to(module.vae.dtype) / module.vae_scale).sample.float().clamp(-1, 1)
    return decoded * (1 - mask) + image * mask


def save_rows(out_dir: Path, step: int, rows: list[torch.Tensor]) -> Path:
    """One PNG of image rows ([B,3,H,W] in -1..1 each), ``out_dir/step-NNNNNN.png``."""
    path = Path(out_dir) / f"step-{step:06d}.png"
    write_bytes_atomically(path, png_bytes(_grid(rows)))
    return path


def _grid(rows: list[torch.Tensor]) -> np.ndarray:
    img = torch.cat([torch.cat(list(x), dim=-1) for x in rows], dim=-2).permute(1, 2, 0).cpu().numpy()
    return ((img + 1) * 127.5).clip(0, 255).round().astype(np.uint8)
