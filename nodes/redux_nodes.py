"""Reference style on Flux.1: a Flux Redux style model's tokens appended to the prompt, kept off the product."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..attention import comfy_joint, comfy_patch
from ..attention.joint import ReduxStyle
from ..imaging.fill import fill_product_hwc
from .common import NodeInputError, as_mask_batch, backbone_of, product_mask_of, sigma_range

CATEGORY = "productbg/style"


class ReferenceStyleRedux(io.ComfyNode):
    """Flux Redux, confined: the reference's style tokens reach the background only."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductBGReferenceStyleRedux", display_name="Reference Style Redux (productbg)",
            category=CATEGORY,
            description="Personality-Wise Generator on Flux.1: a Redux style model's tokens from one reference "
                        "image, appended to the prompt and confined to the background.",
            inputs=[
                io.Model.Input("model", tooltip="A Flux.1 model (Fill, dev or schnell); left untouched, a patched "
                               "copy is returned."),
                io.Conditioning.Input("conditioning", tooltip="The positive prompt (Category Prompt, Background "
                                      "Words, CLIP Text Encode, after FluxGuidance or before)."),
                io.StyleModel.Input("style_model", tooltip="Flux Redux (flux1-redux-dev.safetensors in "
                                    "models/style_models, loaded with Load Style Model)."),
                io.ClipVision.Input("clip_vision", tooltip="Redux's SigLIP (sigclip_vision_patch14_384.safetensors "
                                    "in models/clip_vision, loaded with Load CLIP Vision)."),
                io.Image.Input("reference", tooltip="An image whose background style you want (a batch: every "
                               "image's tokens)."),
                io.Mask.Input("product_mask", tooltip="Your product (1 = product): the style stays off it."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Style strength: the Redux tokens are scaled by it (StyleModelApply's "
                               "multiply)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress where confinement starts (the tokens act throughout)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress where confinement ends."),
                io.Mask.Input("reference_mask", optional=True, tooltip="The reference's own product (1 = "
                              "product): removed before encoding."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the Redux tokens kept off the product (a patched copy)."),
                io.Conditioning.Output(display_name="conditioning", tooltip="The prompt with the reference's "
                                       "Redux tokens appended: the sampler's positive."),
            ])

    @classmethod
    def execute(cls, model, conditioning, style_model, clip_vision, reference, product_mask, strength: float,
                start_percent: float, end_percent: float, reference_mask=None) -> io.NodeOutput:
        backbone = backbone_of(model)
        if backbone.style != "redux":
            raise NodeInputError(f"Reference Style Redux is for Flux.1; this MODEL is {backbone.label}: use "
                                 "Reference Style (productbg) with an IP-Adapter there")
        sigma_start, sigma_end = sigma_range(model, start_percent, end_percent)
        if model.model_options.get("transformer_options", {}).get(comfy_joint.REDUX_KEY):
            raise NodeInputError("this MODEL already has a Reference Style Redux: give one node a batch of "
                                 "reference images instead of chaining two")
        product = product_mask_of(product_mask)
        if reference_mask is not None:
            reference = fill_product_hwc(reference, as_mask_batch(reference_mask, reference, "reference_mask"))
        tokens = style_model.get_cond(clip_vision.encode_image(reference, crop="center"))
        tokens = tokens.flatten(start_dim=0, end_dim=1).unsqueeze(0) * strength
        if tokens.shape[-1] != backbone.context_dim:
            raise NodeInputError(f"this style model gives {tokens.shape[-1]}-wide tokens; Flux.1 reads "
                                 f"{backbone.context_dim}: load Flux Redux (flux1-redux-dev.safetensors)")
        count = tokens.shape[1]
        out = [[torch.cat([c, tokens.to(c)], dim=1), {**extra, comfy_patch.REDUX_TAG: count}]
               for c, extra in conditioning]
        style = ReduxStyle(count, 1.0, product, sigma_start=sigma_start, sigma_end=sigma_end)
        m = model.clone()
        comfy_joint.install_joint(m.model_options, comfy_patch.current_guidance(m.model_options), style)
        return io.NodeOutput(m, out)
