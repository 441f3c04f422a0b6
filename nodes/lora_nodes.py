"""Category LoRA: apply a category's own LoRA (named in the bank, or picked from models/loras)."""
from __future__ import annotations

import os
from collections import OrderedDict

from ..weights.bank import CategoryBank
from ..weights.errors import WeightsError
from .common import BANK, NodeInputError, backbone_of, check_bank_fits

CATEGORY = "productbg/category"
FROM_BANK = "(from bank)"
_CACHE: "OrderedDict[tuple[str, float], dict]" = OrderedDict()
CACHE_SIZE = 4


def load_lora_cached(path: str) -> dict:
    """Read a LoRA state dict (safetensors only), keeping the few most recent in memory for fast switching."""
    import comfy.utils

    if not path.endswith(".safetensors"):
        raise NodeInputError(f"{os.path.basename(path)}: only .safetensors LoRAs are loaded (other formats are "
                             "pickles that can run code); convert it with `productbg weights convert-lora`")
    key = (path, os.path.getmtime(path))
    if key in _CACHE:
        _CACHE.move_to_end(key)
    else:
        _CACHE[key] = comfy.utils.load_torch_file(path, safe_load=True)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return _CACHE[key]


class CategoryLoraNode:
    """Add a per-category LoRA on top of the shared model; switching category only re-patches."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "apply"
    DESCRIPTION = "A stronger look for one category: its LoRA from the bank (or any LoRA file)."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        import folder_paths

        return {"required": {
            "model": ("MODEL", {"tooltip": "The model (left untouched; a patched copy is returned)."}),
            "clip": ("CLIP", {"tooltip": "The CLIP (the LoRA may patch the text encoder too)."}),
            "bank": (BANK, {"tooltip": "From Load Category Bank."}),
            "category": ("STRING", {"default": "", "tooltip": "Category whose LoRA to apply."}),
            "lora_name": ([FROM_BANK] + folder_paths.get_filename_list("loras"), {
                "tooltip": "(from bank) uses the file the bank names for this category (in models/loras)."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05}),
        }}

    def apply(self, model, clip, bank: CategoryBank, category: str, lora_name: str, strength_model: float,
              strength_clip: float):
        if lora_name == FROM_BANK:
            check_bank_fits(bank, backbone_of(model))
            try:
                entry = bank.get(category).lora
            except WeightsError as e:
                raise NodeInputError(str(e)) from None
            if entry is None:
                return (model, clip)  # this category has no LoRA of its own: the shared model serves it
            lora_name, strength_model = entry.file, strength_model * entry.strength
        return _apply_lora_file(model, clip, lora_name, strength_model, strength_clip)


def _apply_lora_file(model, clip, lora_name: str, strength_model: float, strength_clip: float):
    import comfy.sd
    import folder_paths

    path = folder_paths.get_full_path("loras", lora_name)
    if path is None:
        raise NodeInputError(f"LoRA {lora_name!r} not found: put it in ComfyUI/models/loras")
    return comfy.sd.load_lora_for_models(model, clip, load_lora_cached(path), strength_model, strength_clip)
