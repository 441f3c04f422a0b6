"""The denoising objective both trainers share: latents, noise, timesteps, inpainting inputs, weighted loss.

Every random draw takes the step's generator in a fixed order (VAE sample, noise, timesteps, mask jitter), so
a step is a pure function of the weights, the batch and the generator — what exact resumption relies on.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.diffusers_processor import CALL_KEY, DiffusersCall


def max_filter(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Square max filter of half-width ``radius`` on [B,C,H,W], separable (two 1-D max-pools, same result)."""
    k = 2 * radius + 1
    x = F.max_pool2d(x, (1, k), stride=1, padding=(0, radius))
    return F.max_pool2d(x, (k, 1), stride=1, padding=(radius, 0))


def morph(m: torch.Tensor, radius: int) -> torch.Tensor:
    """Dilate ([B,1,H,W] binary) masks by ``radius`` pixels, or erode them for a negative radius."""
    if radius == 0:
        return m
    if radius > 0:
        return max_filter(m, radius)
    return 1 - max_filter(1 - m, -radius)


def window_max(x: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Per-sample 1-D max over ``[i - r_b, i + r_b]`` along the last dim of [B, ..., L] (outside ignored).

    Sparse-table range maximum: windows of 1, 2, 4, ... are built once for the batch by doubling, then each
    output is the max of two overlapping power-of-two windows of its sample's level — ``log2(r)`` elementwise
    passes instead of a ``2r+1`` kernel, and different radii in one batched gather.

    Args:
        x: [B, ..., L] floating tensor.
        radius: [B] non-negative integer radii, on the CPU (they size the table; no device sync).
    """
    top = int(radius.max())
    if top == 0:
        return x
    levels = (2 * top + 1).bit_length()
    n, width = x.shape[-1], x.shape[-1] + 2 * top
    table = x.new_empty((levels, *x.shape[:-1], width))  # level j: max of 2^j values from i; its tail is never read
    table[0, ..., :top] = float("-inf")
    table[0, ..., top + n:] = float("-inf")
    table[0, ..., top:top + n] = x
    for j in range(1, levels):
        s, size = 1 << (j - 1), width - (1 << j) + 1
        torch.maximum(table[j - 1, ..., :size], table[j - 1, ..., s:s + size], out=table[j, ..., :size])
    level = torch.floor(torch.log2(2 * radius.double() + 1)).long()
    span = 1 << level
    pos = torch.arange(n)
    left, right = pos + top - radius[:, None], pos + top + radius[:, None] - span[:, None] + 1
    dev = x.device
    rows = table[level.to(dev), torch.arange(x.shape[0], device=dev)]
    shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
    gather = lambda i: rows.gather(-1, i.to(dev).view(shape).expand(x.shape))  # noqa: E731
    return torch.maximum(gather(left), gather(right))


def jitter_masks(mask: torch.Tensor, generator: torch.Generator, jitter: tuple[float, float]) -> torch.Tensor:
    """Grow (positive radius) or shrink (negative) each [B,1,H,W] mask by a random radius (fraction of the side).

    Runs on the mask's device, batched: the radii are drawn on the CPU generator (the draw order resumption
    relies on), each sample's square max filter is two per-sample 1-D :func:`window_max` passes, erosion is
    dilation of the complement. Same values as one ``max_pool2d`` per sample.
    """
    radii = torch.empty(mask.shape[0]).uniform_(jitter[0], jitter[1], generator=generator)
    steps = (radii * mask.shape[-1]).round().long()
    if not steps.any():
        return mask
    shrink = (steps < 0).to(mask.device).view(-1, *([1] * (mask.ndim - 1)))
    x = torch.where(shrink, 1 - mask, mask)
    x = window_max(window_max(x, steps.abs()).transpose(-1, -2).contiguous(), steps.abs())
    x = x.transpose(-1, -2)
    return torch.where(shrink, 1 - x, x)


def loss_weights(mask: torch.Tensor, latent_hw: tuple[int, int], background_weight: float) -> torch.Tensor:
    """[B,1,h,w] per-latent weights: ``background_weight`` on background, 1 on product (area-averaged)."""
    product = F.adaptive_avg_pool2d(mask.float(), latent_hw)
    return background_weight * (1 - product) + product


class DiffusionModule(nn.Module):
    """Frozen UNet + VAE + noise schedule, and the denoising loss on them.

    Args:
        comps: the loaded base model (:class:`~.models.SDComponents`).
    """

    def __init__(self, comps: Any) -> None:
        super().__init__()
        self.unet, self.vae, self.noise_scheduler = comps.unet, comps.vae, comps.noise_scheduler
        self.vae_scale, self.vae_factor, self.inpaint = comps.vae_scale, comps.vae_factor, comps.inpaint
        self.family = getattr(comps, "family", "sd15")
        #: SDXL-style added conditioning (pooled text embedding + 6 time ids) enters through the time embedding.
        self.text_time = getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    def latent_hw(self, image: torch.Tensor) -> tuple[int, int]:
        """Latent (h, w) of a [B,C,H,W] image batch."""
        return image.shape[-2] // self.vae_factor, image.shape[-1] // self.vae_factor

    def encode(self, image: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """VAE latents (sampled when a generator is given, else the mode), scaled."""
        with torch.no_grad():
            dist = self.vae.encode(image.to(self.vae.dtype)).latent_dist
            z = dist.sample(generator) if generator is not None else dist.mode()
        return z.float() * self.vae_scale

    def unet_input(self, noisy: torch.Tensor, image: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The UNet input: noisy latents, plus repaint mask and masked-image latents for inpainting UNets."""
        if not self.inpaint:
            return noisy
        masked = self.encode(image * keep, None)
        return torch.cat([noisy, F.interpolate(1 - keep, size=noisy.shape[-2:]), masked], dim=1)

    def added_conditions(self, batch: dict[str, Any], pooled: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
        """SDXL's ``added_cond_kwargs`` for a batch: ``pooled`` [B or 1, W] and time ids (original size, crop
        top-left, target size) from each sample's ``original_size`` / ``crop_top_left`` (the image's own size
        and no crop when the dataset gives none); None for a UNet without added conditioning."""
        if not self.text_time:
            return None
        if pooled is None:
            raise ValueError("this UNet takes a pooled text embedding (SDXL): the text encoders gave none")
        image = batch["image"]
        n, (h, w), dev = image.shape[0], image.shape[-2:], image.device
        target = torch.tensor([h, w], device=dev).expand(n, 2)
        size = batch.get("original_size")
        crop = batch.get("crop_top_left")
        size = target if size is None else size.to(dev).view(n, 2)
        crop = torch.zeros_like(target) if crop is None else crop.to(dev).view(n, 2)
        dtype = self.unet.dtype
        return {"text_embeds": pooled.to(dev, dtype).expand(n, -1),
                "time_ids": torch.cat([size, crop, target], dim=1).to(dtype)}

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the UNet should predict (epsilon or v)."""
        kind = self.noise_scheduler.config.prediction_type
        return self.noise_scheduler.get_velocity(latents, noise, t) if kind == "v_prediction" else noise

    def denoising_loss(self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator,
                       context: torch.Tensor, call: DiffusersCall | None, jitter: tuple[float, float],
                       background_weight: float, added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Weighted MSE of one noised batch (see module docstring for the draw order)."""
        dev = image.device
        latents = self.encode(image, generator)
        noise = torch.randn(latents.shape, generator=generator).to(dev)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                          generator=generator).to(dev)
        keep = jitter_masks(mask.to(dev), generator, jitter)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        kwargs = {CALL_KEY: call} if call is not None else None  # None: a plain diffusers step (benchmarks)
        pred = self.unet(self.unet_input(noisy, image, keep).to(self.unet.dtype), t, context.to(self.unet.dtype),
                         cross_attention_kwargs=kwargs, added_cond_kwargs=added).sample.float()
        w = loss_weights(mask, tuple(latents.shape[-2:]), background_weight)
        return (((pred - self.target(latents, noise, t)) ** 2) * w).mean() / w.mean()
