"""Flux.1 inpainting sampler: flow matching with Euler steps, Flux's time shift, distilled guidance, and joint
confinement in every block.

* Sigmas from :func:`~.flux_latents.flux_sigmas` (dev / Fill shifted for the image's token count, schnell not);
  the model predicts the velocity ``v`` and ``x ← x + (σ_{i+1} − σ_i)·v``, starting from pure noise at σ = 1.
* Distilled guidance (dev's 3.5, Fill's 30) goes in as ``guidance``; schnell has none. With CFG ≠ 1 a negative
  row runs beside the positive (``cond_or_uncond = (1, 0)``) and ``v = v_neg + cfg·(v_pos − v_neg)``.
* Flux Fill reads the masked image's latents and the folded mask (:func:`~.flux_latents.fill_conditioning`);
  dev / schnell inpaint with ComfyUI's noise mask alone: after every step the kept region is reset to the
  product latents noised to the next step's level, ``(1 − σ)·x₀ + σ·noise`` (and with ``noise_mask`` Fill too,
  as ComfyUI's InpaintModelConditioning does with its noise mask on).
* Confinement: a :class:`~productbg.attention.joint.JointCall` (identifier and / or Redux style); its text
  inputs (``[full ; free]``) are built once per run with :func:`~productbg.attention.flux_processor.confined_inputs`.

Per-run tensors are built once on the model's device (timesteps, guidance, ids, masks, text); the loop makes no
host sync. Latents stay in float32 between steps; the transformer runs in its own dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention.flux_processor import confined_inputs
from ..attention.joint import JointCall
from .flux_latents import (denormalize_latents, fill_conditioning, flux_sigmas, image_seq_len, latent_image_ids,
                           normalize_latents, pack_latents, unpack_latents)


@dataclass
class FluxSampleInputs:
    """One product, ready to sample on Flux.

    Attributes:
        image: ``[1, 3, H, W]`` canvas with the product, in -1..1 (H, W multiples of 16).
        repaint: ``[1, 1, H, W]`` 1 = regenerate.
        context: ``[1, L, 4096]`` the text the unpatched model gets (T5 prompt, then any Redux tokens).
        pooled: ``[1, 768]`` pooled CLIP-L (the identifier-free prompt's).
        generators: one ``torch.Generator`` per image.
        call: the joint confinement of the positive row, or None.
        uncond_context, uncond_pooled: the negative prompt's (only read when CFG ≠ 1).
    """

    image: torch.Tensor
    repaint: torch.Tensor
    context: torch.Tensor
    pooled: torch.Tensor
    generators: list[torch.Generator]
    call: JointCall | None = None
    uncond_context: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None


@torch.no_grad()
def encode_image(vae, image: torch.Tensor) -> torch.Tensor:
    """Normalised Flux latents (distribution mean) of ``[B, 3, H, W]`` images in -1..1, float32."""
    p = next(vae.parameters())
    return normalize_latents(vae.encode(image.to(p)).latent_dist.mean.float())


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` images in 0..1 from normalised Flux latents."""
    p = next(vae.parameters())
    image = vae.decode(denormalize_latents(latents.float()).to(p)).sample.float()
    return ((image + 1) / 2).clamp(0, 1)


def _text_rows(inputs: FluxSampleInputs, n: int, cfg: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Text and pooled rows of the batch, negative rows first (CFG), padded to one length with the free stream
    appended by the caller."""
    if not cfg:
        return inputs.context.repeat(n, 1, 1), inputs.pooled.repeat(n, 1)
    if inputs.uncond_context is None or inputs.uncond_pooled is None:
        raise ValueError("CFG needs the negative prompt's context and pooled vector")
    pos, neg = inputs.context, inputs.uncond_context
    if neg.shape[1] != pos.shape[1]:  # the longer one's length; padding rows are T5 <pad> states of neither
        neg = F.pad(neg, (0, 0, 0, pos.shape[1] - neg.shape[1])) if neg.shape[1] < pos.shape[1] else \
            neg[:, :pos.shape[1]]
    return (torch.cat([neg.repeat(n, 1, 1), pos.repeat(n, 1, 1)]),
            torch.cat([inputs.uncond_pooled.repeat(n, 1), inputs.pooled.repeat(n, 1)]))


@torch.no_grad()
def sample_flux(transformer, vae, inputs: FluxSampleInputs, steps: int, guidance: float | None = None,
                cfg: float = 1.0, shift: bool = True, noise_mask: bool = True) -> torch.Tensor:
    """Run the sampler and return the decoded images ``[N, 3, H, W]`` in 0..1 (before paste-back).

    Args:
        transformer: a diffusers ``FluxTransformer2DModel`` (with ``install_flux_processors`` when confining).
        vae: the 16-channel VAE.
        inputs: the product, conditioning, per-image generators and confinement.
        steps: Euler steps.
        guidance: distilled guidance (None: the model has no guidance embedder, schnell).
        cfg: classifier-free guidance scale (1 = the positive row alone).
        shift: apply Flux's resolution-dependent time shift (dev, Fill; not schnell).
        noise_mask: reset the kept region to the product latents after every step.
    """
    p = next(transformer.parameters())
    device, dtype, n = p.device, p.dtype, len(inputs.generators)
    original = encode_image(vae, inputs.image).to(device)  # [1, 16, h, w]
    hw = tuple(original.shape[-2:])
    x0 = pack_latents(original)
    noise = torch.cat([pack_latents(torch.randn((1, *original.shape[1:]), generator=g)) for g in inputs.generators])
    noise = noise.to(device)
    fill = None
    if int(transformer.config.in_channels) > x0.shape[-1]:  # Flux Fill
        hidden = inputs.image * (inputs.repaint < 0.5)  # the repaint region grey (0 in -1..1)
        fill = fill_conditioning(encode_image(vae, hidden).to(device), inputs.repaint.to(device).float())
        fill = fill.repeat(2 * n if cfg != 1.0 else n, 1, 1).to(dtype)  # the rows of every step, built once
    keep = None
    if noise_mask:
        m = F.interpolate(inputs.repaint.float(), size=hw, mode="bilinear", align_corners=False).clamp(0, 1)
        keep = pack_latents(m.expand(1, original.shape[1], *hw).contiguous()).to(device)

    use_cfg = cfg != 1.0
    rows = 2 * n if use_cfg else n
    text, pooled = _text_rows(inputs, n, use_cfg)
    txt_ids = torch.zeros(text.shape[1], 3, device=device, dtype=dtype)
    kwargs: dict = {"encoder_hidden_states": text.to(device=device, dtype=dtype), "txt_ids": txt_ids}
    if inputs.call is not None:
        call = inputs.call.for_call(cond_or_uncond=(1, 0) if use_cfg else (0,))
        kwargs = confined_inputs(call, kwargs["encoder_hidden_states"], txt_ids)
    kwargs.update(pooled_projections=pooled.to(device=device, dtype=dtype),
                  img_ids=latent_image_ids(hw, device, dtype))
    if guidance is not None and transformer.config.guidance_embeds:
        kwargs["guidance"] = torch.full((rows,), float(guidance), device=device, dtype=torch.float32)

    sigmas = flux_sigmas(steps, image_seq_len(hw), shift)
    levels = sigmas.tolist()
    timesteps = sigmas.to(device)[:, None].expand(-1, rows)  # once: no host-to-device copy per step
    x = noise.clone()
    for i in range(steps):
        h = torch.cat([x, x]) if use_cfg else x
        if fill is not None:
            h = torch.cat([h, fill], dim=-1)
        v = transformer(hidden_states=h.to(dtype), timestep=timesteps[i], **kwargs).sample.float()
        if use_cfg:
            neg, pos = v.chunk(2)
            v = neg + cfg * (pos - neg)
        x = x + (levels[i + 1] - levels[i]) * v
        if keep is not None:
            x = keep * x + (1 - keep) * ((1 - levels[i + 1]) * x0 + levels[i + 1] * noise)
    return decode_latents(vae, unpack_latents(x, hw))
