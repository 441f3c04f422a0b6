"""Stable Diffusion components for training: tiny built-ins, a diffusers folder, or a single-file checkpoint.

``source`` is one of

* ``"tiny"`` / ``"tiny-inpaint"``: the random tiny models of :mod:`productbg.pipeline.tiny` (CPU tests);
* a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``), read with
  ``local_files_only``;
* a single ``.safetensors`` checkpoint in the original (LDM) layout — what ComfyUI users have — loaded by
  :func:`productbg.pipeline.single_file.load_single_file` with the SD1.5 configs shipped in ``assets/sd15``
  (never a hub lookup); a 9-channel ``input_blocks.0.0`` makes it the inpainting UNet.

The tokenizer is always the shipped CLIP tokenizer (:func:`productbg.pipeline.text.clip_tokenizer`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "sd15"


class ModelLoadError(Exception):
    """The base model could not be loaded; the message says what to fix."""


@dataclass
class SDComponents:
    """What the trainers need from a base model.

    Attributes:
        unet, vae, text_encoder, tokenizer: the diffusers / transformers components.
        noise_scheduler: a ``DDPMScheduler`` with the model's training schedule.
        source: where they came from (for provenance).
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    source: str

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

    def freeze(self) -> None:
        """No gradients for any base weight (trainers add their own trainable parts)."""
        for m in (self.unet, self.vae, self.text_encoder):
            m.requires_grad_(False)
            m.eval()


def default_scheduler():
    """SD1.5's DDPM training schedule (shipped config)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(json.loads((ASSETS / "scheduler_config.json").read_text()))


def load_components(source: str | Path, dtype: torch.dtype = torch.float32,
                    config_dir: str | Path | None = None) -> SDComponents:
    """Load a base model (see the module docstring for accepted sources).

    Args:
        source: ``"tiny"``, ``"tiny-inpaint"``, a diffusers folder or a ``.safetensors`` checkpoint.
        dtype: dtype for the frozen weights.
        config_dir: component configs for a single-file checkpoint (default: the shipped SD1.5 set).

    Raises:
        ModelLoadError: unknown source, pickle checkpoint, missing files.
    """
    from ..pipeline.text import clip_tokenizer

    s = str(source)
    if s in ("tiny", "tiny-inpaint"):
        parts = _tiny(inpaint=s == "tiny-inpaint")
    else:
        path = Path(s)
        if path.is_dir():
            parts = _from_folder(path, dtype)
        elif path.is_file() and path.suffix.lower() == ".safetensors":
            parts = _from_single_file(path, dtype, Path(config_dir) if config_dir else None)
        elif path.is_file():
            raise ModelLoadError(f"{path.name}: only .safetensors checkpoints are loaded (pickle files can run code)")
        else:
            raise ModelLoadError(f"{s}: no such model; pass 'tiny', a diffusers folder or a .safetensors checkpoint")
    unet, vae, text_encoder, scheduler = parts
    return SDComponents(unet, vae, text_encoder, clip_tokenizer(), scheduler, s)


def _tiny(inpaint: bool) -> tuple[Any, Any, Any, Any]:
    from ..pipeline.tiny import tiny_text_encoder, tiny_unet, tiny_vae

    return tiny_unet(9 if inpaint else 4), tiny_vae(), tiny_text_encoder(), default_scheduler()


def _from_folder(path: Path, dtype: torch.dtype) -> tuple[Any, Any, Any, Any]:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    missing = [d for d in ("unet", "vae", "text_encoder") if not (path / d).is_dir()]
    if missing:
        raise ModelLoadError(f"{path}: not a diffusers Stable Diffusion folder (missing {', '.join(missing)}/)")
    kw = dict(local_files_only=True, torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True,
                                                 dtype=dtype)
    sched_dir = path / "scheduler"
    scheduler = (DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
                 if (sched_dir / "scheduler_config.json").is_file() else default_scheduler())
    return unet, vae, text_encoder, scheduler


def _from_single_file(path: Path, dtype: torch.dtype, config_dir: Path | None) -> tuple[Any, Any, Any, Any]:
    """Through :func:`productbg.pipeline.single_file.load_single_file` (shipped SD1.5 configs, offline)."""
    from diffusers import DDPMScheduler

    try:
        from ..pipeline.single_file import load_single_file
    except ImportError as e:  # the pipeline package provides the loader
        raise ModelLoadError(f"single-file checkpoints need productbg.pipeline.single_file ({e})") from None
    parts = load_single_file(path, config_dir, dtype)
    return parts.unet, parts.vae, parts.text_encoder, DDPMScheduler.from_config(parts.scheduler_config)
