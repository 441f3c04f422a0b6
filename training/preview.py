"""Sample previews during training: a few DDIM steps on fixed training items, product pasted back.

Each preview is one PNG, ``samples/step-000100.png``: the top row holds the training images, the bottom row
what the current weights generate for the same product and category (classifier-free guidance, identifier
confined to the background, the inference recipe's eroded keep-mask for inpainting UNets).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..attention import Guidance, IdentifierGuidance, ProductMask
from ..attention.diffusers_processor import CALL_KEY, DiffusersCall
from .bgsynth import png_bytes
from .layout import atomic_write_bytes

PREVIEW_EROSION = 0.04  # inference recipe: repaint mask = background dilated by ≈20 px at 512²


def _pick(dataset, count: int) -> list[int]:
    """First item of each of the first ``count`` categories (fixed across previews)."""
    seen: dict[int, int] = {}
    for i, c in enumerate(dataset._cat):
        seen.setdefault(c, i)
        if len(seen) == count:
            break
    return list(seen.values())


@torch.no_grad()
def cg_preview(module, dataset, out_dir: Path, step: int, count: int = 4, steps: int = 10,
               guidance_scale: float = 4.0) -> Path:
    """Write the preview PNG of ``step``; returns its path."""
    from diffusers import DDIMScheduler

    from .diffusion import morph

    items = [dataset[(i, 0)] for i in _pick(dataset, count)]
    dev = module.prompt_ids.device
    image = torch.stack([it["image"] for it in items]).to(dev)
    mask = torch.stack([it["mask"] for it in items]).to(dev)
    cats = torch.tensor([it["category"] for it in items], device=dev)
    keep = morph(mask, -round(PREVIEW_EROSION * mask.shape[-1]))
    latents = _denoise(module, image, mask, keep, cats, DDIMScheduler.from_config(module.noise_scheduler.config),
                       steps, guidance_scale)
    decoded = module.vae.decode(latents.to(module.vae.dtype) / module.vae_scale).sample.float().clamp(-1, 1)
    composite = decoded * (1 - mask) + image * mask
    path = Path(out_dir) / f"step-{step:06d}.png"
    atomic_write_bytes(path, png_bytes(_grid(image, composite)))
    return path


def _denoise(module, image, mask, keep, cats, scheduler, steps: int, scale: float) -> torch.Tensor:
    b = image.shape[0]
    h, w = image.shape[-2] // 8, image.shape[-1] // 8
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(b, 4, h, w, generator=gen).to(image.device) * scheduler.init_noise_sigma
    cond = module.text_encoder(module.prompt_ids[cats])[0]
    empty = module.prompt_ids.new_full((1, module.prompt_ids.shape[1]), 49407)
    empty[0, 0] = 49406
    uncond = module.text_encoder(empty)[0].expand_as(cond)
    context = torch.cat([uncond, cond]).to(module.unet.dtype)
    g = IdentifierGuidance(module.spec, ProductMask(mask[:, 0]), 1.0)
    call = DiffusersCall(Guidance().with_identifier(g), latent_hw=(h, w), cond_or_uncond=(1, 0))
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        inp = module.unet_input(x, torch.cat([image, image]), torch.cat([keep, keep]))
        eps = module.unet(inp.to(module.unet.dtype), t, context, cross_attention_kwargs={CALL_KEY: call}).sample
        u, c = eps.float().chunk(2)
        latents = scheduler.step(u + scale * (c - u), t, latents).prev_sample
    return latents


def _grid(top: torch.Tensor, bottom: torch.Tensor) -> np.ndarray:
    rows = [torch.cat(list(x), dim=-1) for x in (top, bottom)]
    img = torch.cat(rows, dim=-2).permute(1, 2, 0).cpu().numpy()
    return ((img + 1) * 127.5).clip(0, 255).round().astype(np.uint8)
