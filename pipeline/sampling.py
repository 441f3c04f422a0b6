"""Inpainting sampler: DDIM with classifier-free guidance, the guided attention call on every UNet step.

Mirrors ComfyUI's ``InpaintModelConditioning`` (noise_mask on) + ``KSampler``:

* 9-channel UNet: input = noisy latent ++ latent-size mask ++ latent of the image with the repaint region
  set to grey;
* both kinds (9- and 4-channel): after every step the kept region is reset to the original latent, noised to
  the next step's level ("latent noise mask"), and at the end to the clean original latent;
* SDXL (``addition_embed_type: text_time``): pooled text embeds and the added time ids (original size, crop
  top-left, target size; here all the canvas: original = target = (H, W), crop (0, 0)) go in
  ``added_cond_kwargs`` — the same six ids for the base and the inpainting model (which was trained without an
  aesthetic score).

Samplers: ``ddim`` (SD1.5's recipe) and ``dpmpp_2m_karras`` (DPM-Solver++ 2M with Karras sigmas: SDXL's
default, ComfyUI's ``dpmpp_2m`` + ``karras``).

No host sync per step: the schedule stays on the host (the scheduler reads it there), the UNet gets the timesteps
moved to the device once, the kept region's noise levels are computed once before the loop, and DPM-Solver++ is
given its begin index (else it looks every timestep up with ``nonzero().item()``).

A VAE whose config says ``force_upcast`` (SDXL's) runs in float32 when the models were loaded in float16
(:func:`upcast_vae`), as diffusers' SDXL pipelines do: SDXL's VAE overflows in float16 (NaN / black images).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import Guidance
from ..attention.diffusers_processor import CALL_KEY, DiffusersCall


@dataclass
class SampleInputs:
    """One product, ready to sample.

    Attributes:
        image: ``[1, 3, H, W]`` canvas with the product, in -1..1.
        repaint: ``[1, 1, H, W]`` 1 = regenerate (the inpaint mask).
        cond: ``[1, 77, C]`` positive context; uncond: ``[1, 77, C]`` negative context.
        guidance: identifier / style guidance (may be empty).
        generators: one ``torch.Generator`` per image to make (their count is the batch size).
        pooled, uncond_pooled: ``[1, W]`` pooled text embeds of the positive / negative prompt (SDXL only).
    """

    image: torch.Tensor
    repaint: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    guidance: Guidance
    generators: list[torch.Generator]
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None


#: The UNet samplers; ``euler`` is Flux.1's flow-matching sampler (``flux_sampling``).
SD_SAMPLERS = ("ddim", "dpmpp_2m_karras")
SAMPLERS = (*SD_SAMPLERS, "euler")


def sampler_for(sampler_name: str, scheduler: str) -> str:
    """Our sampler name for a backbone's ComfyUI-style (sampler, scheduler) defaults."""
    named = {("dpmpp_2m", "karras"): "dpmpp_2m_karras", ("euler", "simple"): "euler"}
    return named.get((sampler_name, scheduler), "ddim")


def make_scheduler(config: dict, steps: int, sampler: str = "ddim"):
    """A scheduler from a noise-schedule config, with ``steps`` inference steps set.

    Args:
        config: the noise schedule (``scheduler_config.json``).
        steps: inference steps.
        sampler: ``ddim`` or ``dpmpp_2m_karras``.
    """
    # optional dependency: diffusers
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if sampler == "ddim":
        scheduler = DDIMScheduler.from_config(config)
    elif sampler == "dpmpp_2m_karras":
        scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                            use_karras_sigmas=True)
    else:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    # DDIM's timesteps are offset by steps_offset: at as many steps as training timesteps the last one would
    # index past the noise schedule
    limit = scheduler.config.num_train_timesteps - int(getattr(scheduler.config, "steps_offset", 0) or 0)
    if not 1 <= steps <= limit:
        raise ValueError(f"{steps} sampling steps: this model's noise schedule allows 1 to {limit} with {sampler}; "
                         f"use --steps {limit} or fewer")
    scheduler.set_timesteps(steps)
    return scheduler


def added_conditioning(unet, inputs: "SampleInputs", hw: tuple[int, int], n: int, cfg: bool,
                       device: torch.device, dtype: torch.dtype) -> dict | None:
    """SDXL's ``added_cond_kwargs`` for the batch (negative rows first), or None for a UNet without them."""
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        return None
    if inputs.pooled is None or (cfg and inputs.uncond_pooled is None):
        raise ValueError("this UNet needs pooled text embeds (an SDXL model with an SD1.5 text encoder?)")
    h, w = hw
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=dtype, device=device)
    pooled = [inputs.uncond_pooled.repeat(n, 1), inputs.pooled.repeat(n, 1)] if cfg else [inputs.pooled.repeat(n, 1)]
    text_embeds = torch.cat(pooled).to(device=device, dtype=dtype)
    return {"text_embeds": text_embeds, "time_ids": time_ids.repeat(text_embeds.shape[0], 1)}


def upcast_vae(vae: torch.nn.Module) -> torch.nn.Module:
    """Move a float16 VAE whose config says ``force_upcast`` to float32 (in place; returned for chaining).

    SDXL's VAE overflows in float16 (NaN or black images); diffusers' SDXL pipelines run it in float32 for that
    reason, and so do :func:`encode_latent` / :func:`decode_latent` once it is float32 (latents are cast in and
    out). A config that does not say takes diffusers' default, ``True`` (SD1.5's VAE then runs in float32 too).
    bfloat16 has float32's range and stays; so does a VAE whose config says ``force_upcast: false`` (an
    fp16-fixed VAE).
    """
    if getattr(vae.config, "force_upcast", False) and next(vae.parameters()).dtype == torch.float16:
        vae.float()  # not .to(dtype): diffusers' .to warns on every dtype change
    return vae


@torch.no_grad()
def encode_latent(vae, image: torch.Tensor) -> torch.Tensor:
    """VAE latent (distribution mean, scaled) of ``[B, 3, H, W]`` images in -1..1."""
    p = next(vae.parameters())
    latent = vae.encode(image.to(p)).latent_dist.mean
    return latent.float() * float(vae.config.scaling_factor)


@torch.no_grad()
def decode_latent(vae, latent: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` images in 0..1 from scaled latents."""
    p = next(vae.parameters())
    image = vae.decode((latent / float(vae.config.scaling_factor)).to(p)).sample.float()
    return ((image + 1) / 2).clamp(0, 1)


def latent_mask(repaint: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """The repaint mask at latent size (bilinear, as ComfyUI resizes noise masks), ``[1, 1, h, w]``."""
    return F.interpolate(repaint.float(), size=hw, mode="bilinear", align_corners=False).clamp(0, 1)


def _initial_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.cat([torch.randn(shape, generator=g) for g in generators]).to(device)


@torch.no_grad()
def sample_inpaint(unet, vae, scheduler, inputs: SampleInputs, guidance_scale: float = 7.5,
                   noise_mask: bool = True) -> torch.Tensor:
    """Run the sampler and return the decoded images ``[N, 3, H, W]`` in 0..1 (before paste-back).

    Args:
        unet: the UNet with productbg processors installed (``install_processors``).
        vae: the VAE.
        scheduler: a scheduler with timesteps set (:func:`make_scheduler`).
        inputs: the product, conditioning and per-image generators.
        guidance_scale: classifier-free guidance scale (1 = no negative pass).
        noise_mask: reset the kept region to the original latent after every step.
    """
    p = next(unet.parameters())
    device, n = p.device, len(inputs.generators)
    original = encode_latent(vae, inputs.image).to(device)
    hw = tuple(original.shape[-2:])
    mask = latent_mask(inputs.repaint, hw).to(device)
    concat = None
    if int(unet.config.in_channels) == 9:
        hidden = inputs.image * (inputs.repaint < 0.5)          # repaint region → 0 (grey in 0..1)
        concat = torch.cat([mask, encode_latent(vae, hidden).to(device)], dim=1).repeat(n, 1, 1, 1)
    noise = _initial_noise(inputs.generators, (1, *original.shape[1:]), device)
    latents = noise * scheduler.init_noise_sigma
    cfg = guidance_scale != 1.0
    context = torch.cat([inputs.uncond.repeat(n, 1, 1), inputs.cond.repeat(n, 1, 1)] if cfg
                        else [inputs.cond.repeat(n, 1, 1)]).to(device=device, dtype=p.dtype)
    call = DiffusersCall(inputs.guidance, latent_hw=hw, cond_or_uncond=(1, 0) if cfg else (0,))
    pixels = tuple(int(s) for s in inputs.image.shape[-2:])
    added = added_conditioning(unet, inputs, pixels, n, cfg, device, p.dtype)
    timesteps = scheduler.timesteps
    levels = noise_levels(scheduler) if noise_mask else []
    if hasattr(scheduler, "set_begin_index"):  # else its first step looks its timestep up (nonzero().item())
        scheduler.set_begin_index(0)
    unet_timesteps = timesteps.to(device)      # once: a host tensor would be copied to the device every step
    for i, t in enumerate(timesteps):
        x = torch.cat([latents, concat], dim=1) if concat is not None else latents
        x = torch.cat([x, x]) if cfg else x
        eps = unet(x.to(p.dtype), unet_timesteps[i], context, cross_attention_kwargs={CALL_KEY: call},
                   added_cond_kwargs=added).sample.float()
        if cfg:
            uncond, cond = eps.chunk(2)
            eps = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
        if noise_mask:
            kept = original.expand_as(latents)
            if i < len(levels):  # the original noised to the next step's level, as scheduler.add_noise does
                kept = levels[i][0] * kept + levels[i][1] * noise
            latents = mask * latents + (1 - mask) * kept
    return decode_latent(vae, latents)


def noise_levels(scheduler) -> list[tuple[float, float]]:
    """``(signal, noise)`` coefficients of ``scheduler.add_noise`` for the level after each step but the last.

    ``add_noise(x, n, t) = signal·x + noise·n``: read off once, on the host, with unit vectors, so the loop needs
    no per-step schedule lookup (DPM-Solver++ without a begin index finds each timestep with
    ``nonzero().item()``, a host sync, and copies its sigmas to the device every call). A scheduler with a begin
    index (DPM-Solver++) is asked for step ``i + 1`` by index, as diffusers' pipelines ask it (its Karras
    timesteps repeat from 45 steps on, where a lookup by value takes the wrong one); others (DDIM) by timestep.

    Args:
        scheduler: a scheduler with timesteps set that has not stepped yet (its begin index is restored).
    """
    if getattr(scheduler, "step_index", None) is not None:
        raise ValueError("noise_levels needs a scheduler that has not stepped yet")
    timesteps = scheduler.timesteps.cpu()
    unit = torch.eye(2, dtype=torch.float32)
    by_index = hasattr(scheduler, "set_begin_index")
    begin = getattr(scheduler, "begin_index", None)
    levels = []
    for i in range(1, len(timesteps)):
        if by_index:
            scheduler.set_begin_index(i)
        a, b = scheduler.add_noise(unit[:1], unit[1:], timesteps[i:i + 1])[0].tolist()
        levels.append((a, b))
    if by_index:
        scheduler.set_begin_index(begin)
    return levels
