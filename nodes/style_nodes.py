"""Reference-style nodes (the Personality-Wise Generator): load a style encoder, apply a reference image."""
from __future__ import annotations

import copy
import math
import weakref
from typing import Any

import torch

from ..attention import STYLE_LAYER_PRESETS, ProductMask, StyleGuidance
from ..backbones import BACKBONES
from ..attention import comfy_patch
from ..imaging.fill import fill_product_hwc
from ..weights.errors import WeightsError
from ..backbones import targets
from ..weights.style_encoder import StyleEncoder, load_style_encoder, read_style_encoder_info, reference_tokens
from .common import STYLE, NodeInputError, backbone_of, check_mask_batch
from .folders import full_path, list_files

CATEGORY = "productbg/style"
LAYER_PRESETS = STYLE_LAYER_PRESETS  # names (all / style / composition); the weights come from the backbone
#: CLIP vision models by (style-encoder variant, feature width): what to load for an IP-Adapter file.
CLIP_VISION_NAMES = {("linear", 1024): "CLIP ViT-H (CLIP-ViT-H-14-laion2B-s32B-b79K)",
                     ("plus", 1280): "CLIP ViT-H (CLIP-ViT-H-14-laion2B-s32B-b79K)",
                     ("linear", 1280): "CLIP ViT-bigG (CLIP-ViT-bigG-14-laion2B-39B-b160k)",
                     ("plus", 1664): "CLIP ViT-bigG (CLIP-ViT-bigG-14-laion2B-39B-b160k)"}
#: ``ModelPatcher.additional_models`` key: the style encoders ComfyUI loads, accounts and offloads with the UNet.
ADDITIONAL_MODELS_KEY = "productbg_style"
#: encoder -> dtype -> a *weak* reference to its ModelPatcher: reused while some patched MODEL holds it, never
#: kept alive from here (the patcher holds the encoder, so a strong value would keep its own key alive forever).
_MANAGED: "weakref.WeakKeyDictionary[StyleEncoder, dict[torch.dtype, weakref.ref]]" = weakref.WeakKeyDictionary()
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def compute_dtype(model) -> torch.dtype:
    """The dtype a ComfyUI MODEL computes in: its ``manual_cast_dtype`` when it stores weights in another dtype
    (fp8 UNets compute in fp16 / bf16 / fp32), else its storage dtype when that is a compute dtype, else fp32."""
    cast = getattr(model.model, "manual_cast_dtype", None)
    if cast is not None:
        return cast
    stored = model.model_dtype()
    return stored if stored in COMPUTE_DTYPES else torch.float32


def managed_encoder(encoder: StyleEncoder, dtype: torch.dtype) -> Any:
    """The ComfyUI ModelPatcher of ``encoder`` in the compute ``dtype`` (one per encoder and dtype while in use).

    Its load device is ComfyUI's torch device: sampling loads it with the UNet (memory accounted, offloaded like
    a ControlNet), so the style K/V run on the UNet's device.
    """
    import comfy.model_management as mm
    import comfy.model_patcher

    per_dtype = _MANAGED.setdefault(encoder, {})
    patcher = per_dtype[dtype]() if dtype in per_dtype else None
    if patcher is None:
        module = encoder if next(encoder.parameters()).dtype == dtype else copy.deepcopy(encoder).to(dtype)
        patcher = comfy.model_patcher.ModelPatcher(module.eval(), load_device=mm.get_torch_device(),
                                                   offload_device=mm.unet_offload_device())
        per_dtype[dtype] = weakref.ref(patcher)
    return patcher


def managed_style_tokens(patcher, clip_vision, reference) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) style tokens, the image projection run where ComfyUI loads the encoder — whole, on its load
    device (a low-VRAM partial load would split the projection across devices) — kept on the intermediate device."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    cond, uncond = style_tokens(patcher.model, clip_vision, reference)
    device = mm.intermediate_device()
    return cond.to(device), uncond.to(device)


class LoadStyleEncoder:
    """Load a productbg style encoder or an IP-Adapter SD1.5 / SDXL file (.safetensors); its backbone is
    told from its shapes and checked against the MODEL by Reference Style."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (STYLE,)
    RETURN_NAMES = ("style_encoder",)
    FUNCTION = "load"
    DESCRIPTION = ("Style encoders from models/productbg/style_encoders; IP-Adapter SD1.5 and SDXL files from "
                   "models/ipadapter.")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"encoder_name": (list_files("productbg_style_encoders", "ipadapter"), {
            "tooltip": "ip-adapter_sd15 / ip-adapter-plus_sd15, ip-adapter_sdxl_vit-h / "
            "ip-adapter-plus_sdxl_vit-h / ip-adapter_sdxl (.safetensors) or a file trained by productbg."})}}

    def load(self, encoder_name: str):
        path = full_path("productbg_style_encoders", encoder_name, "ipadapter")
        try:
            family = read_style_encoder_info(path).config.family
            target = targets.TARGETS.get(family)
            if family not in BACKBONES or target is None:
                raise NodeInputError(f"{encoder_name}: a style encoder for {family}; productbg supports SD1.5 "
                                     "and SDXL IP-Adapter files")
            return (load_style_encoder(path, target=target),)
        except WeightsError as e:
            raise NodeInputError(f"{encoder_name}: {e}") from None


def check_encoder_fits(encoder: StyleEncoder, backbone) -> None:
    """Refuse a style encoder made for another backbone (an SD1.5 IP-Adapter on SDXL and the reverse)."""
    c = encoder.config
    if (c.context_dim, c.num_layers) != (backbone.context_dim, backbone.num_layers):
        made = next((b for b in BACKBONES.values() if (b.context_dim, b.num_layers) == (c.context_dim, c.num_layers)),
                    None)
        use = ("ip-adapter_sdxl_vit-h / ip-adapter-plus_sdxl_vit-h / ip-adapter_sdxl" if backbone.family == "sdxl"
               else "ip-adapter_sd15 / ip-adapter-plus_sd15")
        raise NodeInputError(f"this style encoder is for {made.label if made else c.family} but the MODEL is "
                             f"{backbone.label}: use {use} (or one trained for {backbone.label})")


def style_tokens(encoder: StyleEncoder, clip_vision, reference):
    """(cond, uncond) style tokens; a CLIP vision of the wrong width is a one-line error naming the right one."""
    try:
        return reference_tokens(encoder, clip_vision, reference)
    except ValueError as e:
        want = CLIP_VISION_NAMES.get((encoder.config.variant, encoder.config.clip_width))
        raise NodeInputError(f"{e}" + (f"; this encoder needs {want}" if want else "")) from None


class ReferenceStyle:
    """Take the background style of a reference image and apply it to the background of the product."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    DESCRIPTION = "Personality-Wise Generator: style tokens from one reference image, confined to the background."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to patch (left untouched; a patched copy is returned)."}),
            "style_encoder": (STYLE, {"tooltip": "From Load Style Encoder."}),
            "clip_vision": ("CLIP_VISION", {"tooltip": "The CLIP vision model of the style encoder: ViT-H for the SD1.5 and *_sdxl_vit-h IP-Adapters, ViT-bigG for ip-adapter_sdxl."}),
            "reference": ("IMAGE", {"tooltip": "An image whose background style you want."}),
            "weight": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 2.0, "step": 0.05, "tooltip": "Style strength."}),
            "layer_preset": (list(LAYER_PRESETS), {"tooltip": "all; style = SD1.5 output blocks / SDXL up_blocks.0.attentions.1 "
                                                   "(texture, colour); composition = SD1.5 input + middle blocks / SDXL "
                                                   "down_blocks.2.attentions.1 (layout)."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }, "optional": {
            "reference_mask": ("MASK", {"tooltip": "The reference's own product (1 = product): removed before encoding."}),
            "product_mask": ("MASK", {"tooltip": "Your product (1 = product): the style stays off it."}),
        }}

    def apply(self, model, style_encoder: StyleEncoder, clip_vision, reference, weight: float, layer_preset: str,
              start_percent: float, end_percent: float, reference_mask=None, product_mask=None):
        backbone = backbone_of(model)
        check_encoder_fits(style_encoder, backbone)
        if clip_vision is None:
            raise NodeInputError("connect a CLIP_VISION model (Load CLIP Vision)")
        if start_percent > end_percent:
            raise NodeInputError(f"start_percent {start_percent} is after end_percent {end_percent}")
        if reference_mask is not None:
            reference = fill_product_hwc(reference, check_mask_batch(reference_mask, reference, "reference_mask"))
        patcher = managed_encoder(style_encoder, compute_dtype(model))
        cond, uncond = managed_style_tokens(patcher, clip_vision, reference)
        sampling = model.get_model_object("model_sampling")
        style = StyleGuidance(cond, uncond, patcher.model.layer_kv, weight, backbone.layer_weights(layer_preset),
                              product=ProductMask(product_mask) if product_mask is not None else None,
                              sigma_start=math.inf if start_percent <= 0 else float(sampling.percent_to_sigma(start_percent)),
                              sigma_end=0.0 if end_percent >= 1 else float(sampling.percent_to_sigma(end_percent)),
                              models=(patcher,))  # the full range is ungated: no per-step sigma test
        m = model.clone()
        guidance = comfy_patch.current_guidance(m.model_options).with_style(style)
        comfy_patch.patch_model(m, guidance, backbone.layer_keys)
        m.set_additional_models(ADDITIONAL_MODELS_KEY, [p for s in guidance.styles for p in s.models])
        return (m,)
