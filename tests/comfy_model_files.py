"""Tiny productbg model files for real-ComfyUI tests: bank, style encoder, LoRA, random CLIP ViT-L vision.

Real key names and shapes with random values, written into temp folders registered with ``folder_paths``.
"""
from __future__ import annotations

from pathlib import Path

import torch

BANK_FILE = "test_bank.safetensors"
STYLE_FILE = "test_style.safetensors"
VISION_FILE = "random_vitl.safetensors"
LORA_FILE = "mug_lora.safetensors"
CATEGORIES = ("运动鞋", "Coffee Mug", "Leather Bag", "shoes")
SDXL_BANK = "test_bank_sdxl.safetensors"
SDXL_STYLE = "test_style_sdxl.safetensors"                  # expects 768-wide embeds (the random CLIP ViT-L)
SDXL_STYLE_VIT_H = "test_style_sdxl_vit_h_width.safetensors"   # expects 1024-wide embeds (CLIP ViT-H)
SDXL_CATEGORIES = ("Coffee Mug", "Leather Bag", "shoes")


def write_model_files(comfy, root: Path) -> Path:
    import comfy_harness
    from safetensors.torch import save_file

    from comfy.clip_vision import ClipVisionModel
    from productbg.weights.bank import CategoryLora
    from productbg.weights.lora import to_kohya
    from weight_samples import example_bank, example_style_encoder, sd15_lora_modules
    from productbg.weights.style_encoder import save_style_encoder

    fp = comfy.folder_paths
    for folder in ("productbg_banks", "productbg_style_encoders", "clip_vision", "loras"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        fp.add_model_folder_path(folder, str(root / folder))
    comfy.pack_module("nodes.folders").register_model_folders()

    bank = example_bank(CATEGORIES, vectors_per_id=2)
    for name in ("Coffee Mug", "shoes"):
        bank.set_lora(name, CategoryLora(LORA_FILE, 1.0))
    bank.save(root / "productbg_banks" / BANK_FILE)
    save_style_encoder(example_style_encoder("ip-adapter_sd15", clip_width=768),
                       root / "productbg_style_encoders" / STYLE_FILE)
    tensors, meta = to_kohya(sd15_lora_modules(rank=2, text_encoder=True, conv=False))
    save_file(tensors, str(root / "loras" / LORA_FILE), metadata=meta)
    torch.manual_seed(0)
    vision = ClipVisionModel(comfy.comfyui_dir + "/comfy/clip_vision_config_vitl.json")
    with torch.no_grad():
        for p in vision.model.parameters():  # ComfyUI leaves loose parameters (class embedding) uninitialised
            p.normal_(0, 0.02)
    comfy_harness._random_init(vision.model)
    save_file({k: v.half().contiguous() for k, v in vision.model.state_dict().items()},
              str(root / "clip_vision" / VISION_FILE))
    return root


def write_sdxl_model_files(comfy, root: Path) -> Path:
    """An SDXL bank (clip_l + clip_g vectors) and SDXL-shaped linear IP-Adapters (ViT-L- and ViT-H-wide embeds),
    registered with ``folder_paths`` (the SD1.5 files of :func:`write_model_files` give the CLIP vision)."""
    from productbg.weights.bank import CategoryBank
    from weight_samples import example_style_encoder
    from productbg.weights.style_encoder import save_style_encoder
    from productbg.backbones.targets import SDXL

    for folder in ("productbg_banks", "productbg_style_encoders"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        comfy.folder_paths.add_model_folder_path(folder, str(root / folder))
    gen = torch.Generator().manual_seed(1)
    bank = CategoryBank("sdxl", vectors_per_id=2)
    for name in SDXL_CATEGORIES:
        bank.add(name, {"clip_l": torch.randn(2, 768, generator=gen) * 0.02,
                        "clip_g": torch.randn(2, 1280, generator=gen) * 0.02})
    bank.save(root / "productbg_banks" / SDXL_BANK)
    for name, width in ((SDXL_STYLE, 768), (SDXL_STYLE_VIT_H, 1024)):
        save_style_encoder(example_style_encoder("ip-adapter_sd15", target=SDXL, clip_width=width, dtype=torch.float16),
                           root / "productbg_style_encoders" / name)
    return root

