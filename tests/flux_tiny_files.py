"""Tiny Flux.1 model files in the layouts ComfyUI users have (the loader's test inputs).

- :func:`write_configs`: the tiny models' configs (``transformer_config.json``, ``vae_config.json``,
  ``t5xxl_config.json``, ``clip_l_config.json``), the ``config_dir`` that loads them;
- :func:`write_bundled`: one ComfyUI "checkpoint" file (``model.diffusion_model.*`` BFL, ``text_encoders.t5xxl.
  transformer.*``, ``text_encoders.clip_l.transformer.*``, ``vae.*``);
- :func:`write_comfy_tree`: ``models/diffusion_models/<name>`` (BFL, no prefix), ``models/text_encoders/
  t5xxl_fp8_e4m3fn.safetensors`` (every encoder tensor fp8 e4m3fn, ``shared.weight`` fp16, as published),
  ``models/text_encoders/clip_l.safetensors`` and ``models/vae/ae.safetensors``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from productbg.pipeline.flux_keys import (CLIP_L_PREFIX, DIFFUSION_PREFIX, T5_PREFIX, VAE_PREFIX,
                                          diffusers_to_bfl)
from productbg.pipeline.flux_models import FluxParts
from productbg.pipeline.single_file import ldm_vae_state_dict
from productbg.weights.safefile import atomic_save

FILE_NAMES = {"fill": "flux1-fill-dev.safetensors", "dev": "flux1-dev.safetensors",
              "schnell": "flux1-schnell.safetensors"}


def write_configs(parts: FluxParts, folder: Path) -> Path:
    """The tiny parts' configs in ``folder`` (the layout of ``assets/flux`` plus CLIP-L's)."""
    folder.mkdir(parents=True, exist_ok=True)
    configs = {"transformer_config.json": dict(parts.transformer.config), "vae_config.json": dict(parts.vae.config),
               "t5xxl_config.json": parts.t5.config.to_dict(), "clip_l_config.json": parts.clip_l.config.to_dict()}
    for name, cfg in configs.items():
        (folder / name).write_text(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")}, indent=1,
                                              default=list), encoding="utf-8")
    return folder


def _t5_state(parts: FluxParts, fp8: bool) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in parts.t5.state_dict().items() if not k.startswith("encoder.embed_tokens")}
    if fp8:
        state = {k: v.to(torch.float16 if k == "shared.weight" else torch.float8_e4m3fn) for k, v in state.items()}
    return state


def _clip_state(parts: FluxParts) -> dict[str, torch.Tensor]:
    state = parts.clip_l.state_dict()
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()
            if not k.endswith("position_ids")}


def write_bundled(parts: FluxParts, path: Path, fp8_t5: bool = False) -> Path:
    """Everything in one file, ComfyUI's checkpoint layout."""
    tensors = diffusers_to_bfl(parts.transformer.state_dict(), DIFFUSION_PREFIX)
    tensors.update({T5_PREFIX + k: v for k, v in _t5_state(parts, fp8_t5).items()})
    tensors.update({CLIP_L_PREFIX + k: v for k, v in _clip_state(parts).items()})
    tensors.update({VAE_PREFIX + k: v for k, v in ldm_vae_state_dict(parts.vae).items()})
    return atomic_save({k: v.detach().contiguous() for k, v in tensors.items()}, path)


def write_comfy_tree(parts: FluxParts, root: Path, fp8_t5: bool = True, prefix: str = "") -> Path:
    """A ComfyUI models tree under ``root`` holding the transformer alone and its companions; the transformer's
    path."""
    models = root / "models"
    transformer = models / "diffusion_models" / FILE_NAMES[parts.variant]
    t5_name = "t5xxl_fp8_e4m3fn.safetensors" if fp8_t5 else "t5xxl_fp16.safetensors"
    files = {transformer: diffusers_to_bfl(parts.transformer.state_dict(), prefix),
             models / "text_encoders" / t5_name: _t5_state(parts, fp8_t5),
             models / "text_encoders" / "clip_l.safetensors": _clip_state(parts),
             models / "vae" / "ae.safetensors": ldm_vae_state_dict(parts.vae)}
    for path, tensors in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({k: v.detach().contiguous() for k, v in tensors.items()}, path)
    return transformer
