"""Reference-style nodes (the Personality-Wise Generator): load a style encoder, apply a reference image."""
from __future__ import annotations

import copy
import weakref
from typing import Any

import torch
from comfy_api.latest import io

from ..attention import STYLE_LAYER_PRESETS, ProductMask, StyleGuidance
from ..backbones import BACKBONES
from ..attention import comfy_patch
from ..imaging.fill import fill_product_hwc
from ..weights.errors import WeightsError
from ..backbones import targets
from ..weights.style_encoder import StyleEncoder, load_style_encoder, read_style_encoder_info, reference_tokens
from .common import NodeInputError, as_mask_batch, backbone_of, sigma_range
from .folders import full_path, list_files
from .schema import Style, check_choices

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
    # lazy: comfy.model_management picks ComfyUI's device when first imported (after ComfyUI has set its args)
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
    import comfy.model_management as mm  # lazy, as in managed_encoder

    mm.load_models_gpu([patcher], force_full_load=True)
    cond, uncond = style_tokens(patcher.model, clip_vision, reference)
    device = mm.intermediate_device()
    return cond.to(device), uncond.to(device)


class LoadStyleEncoder(io.ComfyNode):
    """Load a productbg style encoder or an IP-Adapter SD1.5 / SDXL file (.safetensors); its backbone is
    told from its shapes and checked against the MODEL by Reference Style."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductBGLoadStyleEncoder", display_name="Load Style Encoder (productbg)", category=CATEGORY,
            description=("Style encoders from models/productbg/style_encoders; IP-Adapter SD1.5 and SDXL files from "
                         "models/ipadapter."),
            inputs=[io.Combo.Input("encoder_name", options=list_files("productbg_style_encoders", "ipadapter"),
                                   tooltip="ip-adapter_sd15 / ip-adapter-plus_sd15, ip-adapter_sdxl_vit-h / "
                                   "ip-adapter-plus_sdxl_vit-h / ip-adapter_sdxl (.safetensors) or a file trained by "
                                   "productbg.")],
            outputs=[Style.Output(display_name="style_encoder", tooltip="The style encoder, for Reference Style "
                                  "(its backbone is checked against the MODEL there).")])

    @classmethod
    def execute(cls, encoder_name: str) -> io.NodeOutput:
        path = full_path("productbg_style_encoders", encoder_name, "ipadapter")
        try:
            family = read_style_encoder_info(path).config.family
            target = targets.TARGETS.get(family)
            if family not in BACKBONES or target is None:
                raise NodeInputError(f"{encoder_name}: a style encoder for {family}; productbg supports SD1.5 "
                                     "and SDXL IP-Adapter files")
            return io.NodeOutput(load_style_encoder(path, target=target))
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


class ReferenceStyle(io.ComfyNode):
    """Take the background style of a reference image and apply it to the background of the product."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductBGReferenceStyle", display_name="Reference Style (productbg)", category=CATEGORY,
            description="Personality-Wise Generator: style tokens from one reference image, confined to the background.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (left untouched; a patched copy is returned)."),
                Style.Input("style_encoder", tooltip="From Load Style Encoder."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model of the style encoder: ViT-H for the "
                                    "SD1.5 and *_sdxl_vit-h IP-Adapters, ViT-bigG for ip-adapter_sdxl."),
                io.Image.Input("reference", tooltip="An image whose background style you want."),
                io.Float.Input("weight", default=0.8, min=0.0, max=2.0, step=0.05, tooltip="Style strength."),
                io.Combo.Input("layer_preset", options=list(LAYER_PRESETS), tooltip="all; style = SD1.5 output "
                               "blocks / SDXL up_blocks.0.attentions.1 (texture, colour); composition = SD1.5 input "
                               "+ middle blocks / SDXL down_blocks.2.attentions.1 (layout)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress where the style starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress where the style ends."),
                io.Mask.Input("reference_mask", optional=True, tooltip="The reference's own product (1 = product): "
                              "removed before encoding."),
                io.Mask.Input("product_mask", optional=True, tooltip="Your product (1 = product): the style stays "
                              "off it."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the reference's style tokens in its cross-attention "
                                     "(a patched copy).")])

    @classmethod
    def validate_inputs(cls, layer_preset: str | None = None) -> bool | str:
        return check_choices(layer_preset=(layer_preset, LAYER_PRESETS))

    @classmethod
    def execute(cls, model, style_encoder: StyleEncoder, clip_vision, reference, weight: float, layer_preset: str,
                start_percent: float, end_percent: float, reference_mask=None, product_mask=None) -> io.NodeOutput:
        backbone = backbone_of(model)
        if backbone.style == "redux":
            raise NodeInputError(f"on {backbone.label} the reference style comes from Flux Redux: use Reference "
                                 "Style Redux (productbg)")
        check_encoder_fits(style_encoder, backbone)
        if clip_vision is None:
            raise NodeInputError("connect a CLIP_VISION model (Load CLIP Vision)")
        sigma_start, sigma_end = sigma_range(model, start_percent, end_percent)
        if reference_mask is not None:
            reference = fill_product_hwc(reference, as_mask_batch(reference_mask, reference, "reference_mask"))
        patcher = managed_encoder(style_encoder, compute_dtype(model))
        cond, uncond = managed_style_tokens(patcher, clip_vision, reference)
        style = StyleGuidance(cond, uncond, patcher.model.layer_kv, weight, backbone.layer_weights(layer_preset),
                              product=ProductMask(product_mask) if product_mask is not None else None,
                              sigma_start=sigma_start, sigma_end=sigma_end, models=(patcher,))
        m = model.clone()
        guidance = comfy_patch.current_guidance(m.model_options).with_style(style)
        comfy_patch.patch_model(m, guidance, backbone.layer_keys)
        m.set_additional_models(ADDITIONAL_MODELS_KEY, [p for s in guidance.styles for p in s.models])
        return io.NodeOutput(m)
