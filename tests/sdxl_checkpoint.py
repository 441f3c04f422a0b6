"""A random full-size SDXL checkpoint in the original single-file (LDM) layout, built once and cached.

The components are made on the meta device from the shipped ``assets/sdxl`` configs, mapped to the LDM key
names by the package's own writer (:func:`productbg.pipeline.single_file.ldm_state_dict`), and filled with
seeded N(0, 0.02) fp16 values: ≈6.9 GB, no fp32 copy of the UNet is ever made. The file lives in
``~/.cache/productbg/sdxl-random/`` (or ``$PRODUCTBG_SDXL_CACHE``) and is reused while its version marker matches.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

VERSION = "1"
MARKER = "productbg_test_sdxl"
SEED = 0


def cache_dir() -> Path:
    return Path(os.environ.get("PRODUCTBG_SDXL_CACHE") or Path.home() / ".cache" / "productbg" / "sdxl-random")


def _marker(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return (json.loads(f.read(n)).get("__metadata__") or {}).get(MARKER)
    except (OSError, ValueError, struct.error):
        return None


def meta_components(inpaint: bool = False):
    """UNet, VAE, CLIP-L and OpenCLIP-G text models of SDXL on the meta device (shipped configs)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from productbg.pipeline.single_file import config_files

    files = config_files(family="sdxl")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(files["unet_inpaint" if inpaint else "unet"].read_text()))
        vae = AutoencoderKL.from_config(json.loads(files["vae"].read_text()))
        te = CLIPTextModel(CLIPTextConfig.from_json_file(str(files["text_encoder"])))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(str(files["text_encoder_2"])))
    return unet, vae, te, te2


def ensure_sdxl_checkpoint(inpaint: bool = False) -> Path:
    """The cached random full-size SDXL (or SDXL-inpainting) checkpoint, built first if missing or stale."""
    from productbg.pipeline.single_file import ldm_state_dict
    from productbg.weights.safefile import atomic_save

    kind = "inpaint" if inpaint else "base"
    path = cache_dir() / f"random_sdxl_{kind}.safetensors"
    if _marker(path) == f"{VERSION}:{kind}":
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    layout = ldm_state_dict(*meta_components(inpaint))
    g = torch.Generator().manual_seed(SEED)
    tensors = {k: torch.empty(v.shape, dtype=torch.float16).normal_(0.0, 0.02, generator=g)
               for k, v in sorted(layout.items())}
    atomic_save(tensors, path, {"format": "pt", MARKER: f"{VERSION}:{kind}"})
    return path
