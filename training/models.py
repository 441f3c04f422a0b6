"""Stable Diffusion components for training: tiny built-ins, a diffusers folder, or a single-file checkpoint.

``source`` is one of

* ``"tiny"`` / ``"tiny-inpaint"``: the random tiny SD1.5-shaped models of :mod:`productbg.pipeline.tiny`;
* ``"tiny-sdxl"`` / ``"tiny-sdxl-inpaint"``: the tiny SDXL-shaped ones (two text encoders, pooled text
  embedding and added time ids) — CPU tests;
* a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``; SDXL also ``text_encoder_2/``), read with
  ``local_files_only``;
* a single ``.safetensors`` checkpoint in the original (LDM) layout — what ComfyUI users have — SD1.5 or SDXL
  (the backbone is told from the keys), loaded with the configs shipped in ``assets/`` (never a hub lookup);
  a 9-channel ``input_blocks.0.0`` makes it the inpainting UNet.

Every kind goes through the pipeline's one loader (:mod:`productbg.pipeline.components`), so training and
inference read a model the same way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..pipeline.components import Components, load_base, tiny_components
from ..pipeline.errors import PipelineError

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "sd15"
TINY_SOURCES = {"tiny": ("sd15", False), "tiny-inpaint": ("sd15", True),
                "tiny-sdxl": ("sdxl", False), "tiny-sdxl-inpaint": ("sdxl", True)}


@dataclass
class SDComponents:
    """What the trainers need from a base model.

    Attributes:
        unet, vae, text_encoder, tokenizer: the diffusers / transformers components.
        noise_scheduler: a ``DDPMScheduler`` with the model's training schedule.
        source: where they came from (for provenance).
        text_encoder_2, tokenizer_2: SDXL's second text encoder (``CLIPTextModelWithProjection``) and its
            tokenizer; None on SD1.5.
        family: the backbone family (``sd15``, ``sdxl``).
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    source: str
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    family: str = "sd15"

    @property
    def inpaint(self) -> bool:
        """True for a 9-channel (inpainting) UNet."""
        return int(self.unet.config.in_channels) == 9

    @property
    def vae_scale(self) -> float:
        """Latent scaling factor."""
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def vae_factor(self) -> int:
        """Pixels per latent cell."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def text_encoders(self) -> tuple:
        """The text encoders, in context order (SDXL: CLIP-L, then OpenCLIP-G)."""
        return tuple(e for e in (self.text_encoder, self.text_encoder_2) if e is not None)

    @property
    def tokenizers(self) -> tuple:
        """The tokenizers, one per text encoder."""
        return tuple(t for t in (self.tokenizer, self.tokenizer_2) if t is not None)

    def freeze(self) -> None:
        """No gradients for any base weight (trainers add their own trainable parts)."""
        for m in (self.unet, self.vae, *self.text_encoders):
            m.requires_grad_(False)
            m.eval()


def default_scheduler():
    """SD1.5's DDPM training schedule (shipped config)."""
    # optional dependency: diffusers
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(json.loads((ASSETS / "scheduler_config.json").read_text()))


def load_components(source: str | Path, dtype: torch.dtype = torch.float32,
                    config_dir: str | Path | None = None) -> SDComponents:
    """Load a base model (see the module docstring for accepted sources).

    Args:
        source: a tiny model's name, a diffusers folder or a ``.safetensors`` checkpoint.
        dtype: dtype for the frozen weights.
        config_dir: component configs for a single-file checkpoint (default: the shipped set of its backbone).

    Raises:
        PipelineError: unknown source, pickle checkpoint, missing files, an unsupported backbone.
    """
    s = str(source)
    if s in TINY_SOURCES:
        family, inpaint = TINY_SOURCES[s]
        return from_pipeline(tiny_components(inpaint=inpaint, style=False, family=family), s)
    path = Path(s)
    if path.is_file() and path.suffix.lower() != ".safetensors":
        raise PipelineError(f"{path.name}: only .safetensors checkpoints are loaded (pickle files can run code)")
    if not path.exists():
        raise PipelineError(f"{s}: no such model; pass {', '.join(TINY_SOURCES)}, a diffusers folder or a "
                            ".safetensors checkpoint")
    return from_pipeline(load_base(path, config_dir, dtype), s)


def from_pipeline(parts: Components, source: str) -> SDComponents:
    """Training components from the pipeline's :class:`~productbg.pipeline.components.Components`."""
    # optional dependency: diffusers
    from diffusers import DDPMScheduler

    return SDComponents(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer,
                        DDPMScheduler.from_config(parts.scheduler_config), source, parts.text_encoder_2,
                        parts.tokenizer_2, parts.family)
