"""Category LoRA: apply a category's own LoRA (named in the bank, or picked from models/loras)."""
from __future__ import annotations

import os
from collections import OrderedDict

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..weights.bank import CategoryBank
from ..weights.errors import WeightsError
from .common import NodeInputError, backbone_of, check_bank_fits
from .schema import Bank

CATEGORY = "productbg/category"
FROM_BANK = "(from bank)"
_CACHE: "OrderedDict[tuple[str, float], dict]" = OrderedDict()
CACHE_SIZE = 4


def load_lora_cached(path: str) -> dict:
    """Read a LoRA state dict (safetensors only), keeping the few most recent in memory for fast switching."""
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


class CategoryLoraNode(io.ComfyNode):
    """Add a per-category LoRA on top of the shared model; switching category only re-patches."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductBGCategoryLora", display_name="Category LoRA (productbg)", category=CATEGORY,
            description="A stronger look for one category: its LoRA from the bank (or any LoRA file).",
            inputs=[
                io.Model.Input("model", tooltip="The model (left untouched; a patched copy is returned)."),
                io.Clip.Input("clip", tooltip="The CLIP (the LoRA may patch the text encoder too)."),
                Bank.Input("bank", tooltip="From Load Category Bank."),
                io.String.Input("category", default="", tooltip="Category whose LoRA to apply."),
                io.Combo.Input("lora_name", options=[FROM_BANK] + folder_paths.get_filename_list("loras"),
                               tooltip="(from bank) uses the file the bank names for this category (in "
                               "models/loras)."),
                io.Float.Input("strength_model", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="LoRA strength on the diffusion model (multiplied by the bank's strength "
                               "for this category with (from bank))."),
                io.Float.Input("strength_clip", default=1.0, min=-4.0, max=4.0, step=0.05,
                               tooltip="LoRA strength on the text encoder."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the category's LoRA (unchanged when the category has "
                                     "none)."),
                     io.Clip.Output(tooltip="The CLIP with the category's LoRA.")])

    @classmethod
    def execute(cls, model, clip, bank: CategoryBank, category: str, lora_name: str, strength_model: float,
                strength_clip: float) -> io.NodeOutput:
        if lora_name == FROM_BANK:
            check_bank_fits(bank, backbone_of(model))
            try:
                entry = bank.get(category).lora
            except WeightsError as e:
                raise NodeInputError(str(e)) from None
            if entry is None:
                return io.NodeOutput(model, clip)  # no LoRA of its own: the shared model serves this category
            lora_name, strength_model = entry.file, strength_model * entry.strength
        return io.NodeOutput(*_apply_lora_file(model, clip, lora_name, strength_model, strength_clip))


def _apply_lora_file(model, clip, lora_name: str, strength_model: float, strength_clip: float):
    import comfy.sd  # lazy: it imports comfy.model_management, which picks the device when first imported

    path = folder_paths.get_full_path("loras", lora_name)
    if path is None:
        raise NodeInputError(f"LoRA {lora_name!r} not found: put it in ComfyUI/models/loras")
    return comfy.sd.load_lora_for_models(model, clip, load_lora_cached(path), strength_model, strength_clip)
