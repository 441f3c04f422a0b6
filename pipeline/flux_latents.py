"""Flux.1 latents on diffusers: normalisation, 2×2 packing, image position ids, the flow-matching time shift and
Flux Fill's conditioning. Pure torch, no model.

* The VAE's 16-channel latents are normalised as ``z = (x - shift) · scale`` (``backbones.FLUX.latent``: 0.1159,
  0.3611), then packed in 2×2 patches into a token sequence ``[B, (h/2)·(w/2), 64]`` (diffusers' ``FluxPipeline``
  ``_pack_latents``); :func:`latent_image_ids` gives each token its (0, row, column) position id.
* Sigmas (:func:`flux_sigmas`): ``linspace(1, 1/steps, steps)`` then 0, time-shifted for dev and Fill by
  ``mu`` linear in the image sequence length (0.5 at 256 tokens → 1.15 at 4096, diffusers' ``calculate_shift``),
  ``σ' = e^mu / (e^mu + (1/σ − 1))``; schnell is not shifted. The transformer takes ``timestep = σ``.
* Flux Fill (``img_in`` over 384 features) reads ``[noisy (64) ; masked image (64) ; mask (256)]`` per token: the
  normalised latents of the canvas with the repaint region grey (0 in −1..1), packed, and the pixel-size repaint
  mask folded 8×8 into 64 channels, then packed (diffusers' ``FluxFillPipeline.prepare_mask_latents``).
"""
from __future__ import annotations

import math

import torch

from ..backbones import FLUX
from ..backbones.table import LatentFormat

#: diffusers' ``FluxPipeline`` / ComfyUI's Flux time-shift line: (image tokens, mu) at both ends.
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15
PATCH = 2
#: input features of the transformer: plain latents (16 ch × 2×2), Flux Fill's (+ masked image 64 + mask 256)
PLAIN_FEATURES = FLUX.latent.channels * PATCH * PATCH
FILL_FEATURES = PLAIN_FEATURES + PLAIN_FEATURES + FLUX.latent.factor ** 2 * PATCH * PATCH


def normalize_latents(z: torch.Tensor, fmt: LatentFormat = FLUX.latent) -> torch.Tensor:
    """VAE latents → the transformer's space: ``(z − shift) · scale``."""
    return (z - fmt.shift) * fmt.scale


def denormalize_latents(z: torch.Tensor, fmt: LatentFormat = FLUX.latent) -> torch.Tensor:
    """The transformer's space → VAE latents: ``z / scale + shift``."""
    return z / fmt.scale + fmt.shift


def check_latent_hw(hw: tuple[int, int]) -> tuple[int, int]:
    """``(h, w)`` of a latent grid that packs into 2×2 patches (ValueError otherwise)."""
    h, w = (int(v) for v in hw)
    if h % PATCH or w % PATCH or h < PATCH or w < PATCH:
        raise ValueError(f"a Flux latent grid must have even sides (canvas sides multiples of 16), got {h}x{w}")
    return h, w


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → ``[B, (h/2)·(w/2), 4C]``: 2×2 patches as tokens, row-major (diffusers' order)."""
    b, c, h, w = z.shape
    check_latent_hw((h, w))
    z = z.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack_latents(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``[B, (h/2)·(w/2), 4C]`` → ``[B, C, h, w]`` for the latent grid ``hw`` (the inverse of :func:`pack_latents`)."""
    h, w = check_latent_hw(hw)
    b, n, f = x.shape
    if n != (h // PATCH) * (w // PATCH) or f % (PATCH * PATCH):
        raise ValueError(f"{n} tokens of {f} features do not unpack to a {h}x{w} latent grid")
    x = x.view(b, h // PATCH, w // PATCH, f // (PATCH * PATCH), PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, f // (PATCH * PATCH), h, w)


def latent_image_ids(hw: tuple[int, int], device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[(h/2)·(w/2), 3]`` position ids of the packed tokens of an ``h``×``w`` latent: (0, row, column)."""
    h, w = check_latent_hw(hw)
    rows, cols = torch.meshgrid(torch.arange(h // PATCH), torch.arange(w // PATCH), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


def image_seq_len(hw: tuple[int, int]) -> int:
    """Packed image tokens of an ``h``×``w`` latent."""
    h, w = check_latent_hw(hw)
    return (h // PATCH) * (w // PATCH)


def time_shift_mu(seq_len: int, base_seq_len: int = BASE_SEQ_LEN, max_seq_len: int = MAX_SEQ_LEN,
                  base_shift: float = BASE_SHIFT, max_shift: float = MAX_SHIFT) -> float:
    """Flux's resolution-dependent shift ``mu``, linear in the image sequence length (diffusers'
    ``calculate_shift``; extrapolated outside 256..4096 as there)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * slope + (base_shift - slope * base_seq_len)


def time_shift(mu: float, sigmas: torch.Tensor) -> torch.Tensor:
    """``e^mu / (e^mu + (1/σ − 1))`` on σ in (0, 1] (diffusers' exponential time shift with exponent 1)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def flux_sigmas(steps: int, seq_len: int, shift: bool = True) -> torch.Tensor:
    """``[steps + 1]`` float32 sigmas from 1 down to 0 (host tensor): ``linspace(1, 1/steps, steps)``, time-shifted
    for ``seq_len`` image tokens when ``shift`` (dev, Fill; schnell: not), then a final 0."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    sigmas = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    if shift:
        sigmas = time_shift(time_shift_mu(seq_len), sigmas)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def fold_mask(repaint: torch.Tensor, factor: int = FLUX.latent.factor) -> torch.Tensor:
    """A pixel-size mask ``[B, 1, H, W]`` as ``[B, factor², H/factor, W/factor]``: each latent cell's factor×factor
    pixels as channels (diffusers' ``FluxFillPipeline`` order: channel ``8·dy + dx``)."""
    b, c, hh, ww = repaint.shape
    if c != 1 or hh % factor or ww % factor:
        raise ValueError(f"a Fill mask must be [B, 1, H, W] with sides multiples of {factor}, got {list(repaint.shape)}")
    h, w = hh // factor, ww // factor
    m = repaint.reshape(b, h, factor, w, factor).permute(0, 2, 4, 1, 3)
    return m.reshape(b, factor * factor, h, w)


def fill_conditioning(masked_latents: torch.Tensor, repaint: torch.Tensor) -> torch.Tensor:
    """Flux Fill's extra input per token, ``[B, N, 320]``: the packed normalised latents of the canvas with its
    repaint region grey (``masked_latents`` ``[B, 16, h, w]``) then the packed folded pixel mask (``repaint``
    ``[B, 1, 8h, 8w]``, 1 = regenerate)."""
    b, _, h, w = masked_latents.shape
    if tuple(repaint.shape[-2:]) != (h * FLUX.latent.factor, w * FLUX.latent.factor):
        raise ValueError(f"the Fill mask is {list(repaint.shape[-2:])} pixels, the latent {h}x{w} cells of "
                         f"{FLUX.latent.factor} px")
    mask = fold_mask(repaint.to(masked_latents.dtype)).expand(b, -1, -1, -1)
    return torch.cat([pack_latents(masked_latents), pack_latents(mask)], dim=-1)
