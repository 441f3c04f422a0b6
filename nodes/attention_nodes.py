"""Nodes that confine prompt tokens to the background (the Category-Wise Generator's attention)."""
from __future__ import annotations

from comfy_api.latest import io

from ..attention import CONFINEMENTS, IdentifierGuidance, IdentifierSpec
from ..attention import comfy_joint, comfy_patch
from .common import (NodeInputError, backbone_of, backbone_of_clip, check_identifier_fits, confined_prompt,
                     product_mask_of, sigma_range, word_positions)
from .schema import Identifier, check_choices

CATEGORY = "productbg/attention"


class BackgroundWords(io.ComfyNode):
    """Encode a prompt and mark some of its words as an identifier to keep on the background (zero-shot)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductBGBackgroundWords", display_name="Background Words (productbg)", category=CATEGORY,
            description="Encodes a prompt; the chosen words' cross-attention can then be confined to the background.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of your SD1.5 or SDXL checkpoint (on SDXL the words must "
                              "tokenize alike for CLIP-L and CLIP-G, which they do for plain words)."),
                io.String.Input("text", multiline=True, default="a product photo on a marble table, soft light",
                                tooltip="The positive prompt. Weighting syntax like (word:1.2) works."),
                io.String.Input("background_words", default="marble table",
                                tooltip="Words of the prompt that describe the background only."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning", tooltip="The encoded prompt: the sampler's "
                                       "positive."),
                Identifier.Output(display_name="identifier", tooltip="Where the background words sit: for "
                                  "Mask-Guided Attention, which keeps them off the product."),
            ])

    @classmethod
    def execute(cls, clip, text: str, background_words: str) -> io.NodeOutput:
        tokens = clip.tokenize(text)
        backbone = backbone_of_clip(tokens)  # SD1.5 or SDXL, else a one-line error naming the family
        positions = word_positions(clip, tokens, background_words)
        if not positions:
            raise NodeInputError(f"{background_words!r} does not occur in the prompt; copy the words exactly "
                                 "as they appear in the text")
        return io.NodeOutput(*confined_prompt(clip, tokens, positions, backbone))


class MaskGuidedAttention(io.ComfyNode):
    """Keep an identifier's cross-attention off the product: the mask-guided attention layer, in every block."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ProductBGMaskGuidedAttention", display_name="Mask-Guided Attention (productbg)",
            category=CATEGORY,
            description="Confines the identifier (category or background words) to the background of the product mask.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (left untouched; a patched copy is "
                               "returned)."),
                Identifier.Input("identifier", tooltip="From Category Prompt or Background Words."),
                io.Mask.Input("product_mask", tooltip="1 = product. From Place Product, Segment Product or any mask."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="1 removes the identifier from the product entirely; 0 does nothing."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress where confinement starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress where confinement ends."),
                io.Combo.Input("confinement", options=list(CONFINEMENTS), default="context", optional=True,
                               tooltip="context: product areas attend to the prompt encoded without the identifier, "
                               "so the product is exactly independent of it. columns: only the identifier's own "
                               "tokens are masked (leaks through the later tokens of CLIP's causal text encoder; "
                               "for ablations)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the identifier confined to the background in every "
                                     "cross-attention layer (a patched copy).")])

    @classmethod
    def validate_inputs(cls, confinement: str | None = None) -> bool | str:
        return check_choices(confinement=(confinement, CONFINEMENTS))

    @classmethod
    def execute(cls, model, identifier: IdentifierSpec, product_mask, strength: float, start_percent: float,
                end_percent: float, confinement: str = "context") -> io.NodeOutput:
        sigma_start, sigma_end = sigma_range(model, start_percent, end_percent)
        backbone = backbone_of(model)
        check_identifier_fits(identifier, backbone)
        product = product_mask_of(product_mask)
        if confinement not in CONFINEMENTS:
            raise NodeInputError(f"confinement must be one of {', '.join(CONFINEMENTS)}, got {confinement!r}")
        if confinement == "context" and identifier.plain_context is None:
            raise NodeInputError("this identifier carries no identifier-free prompt: make it with Category Prompt "
                                 "or Background Words, or set confinement to 'columns'")
        if backbone.kind == "dit" and confinement != "context":
            raise NodeInputError(f"on {backbone.label} confinement must be 'context': T5 is bidirectional, so every "
                                 "text token carries the identifier and masking its own tokens would confine nothing")
        guidance = comfy_patch.current_guidance(model.model_options).with_identifier(IdentifierGuidance(
            identifier, product, strength, sigma_start=sigma_start, sigma_end=sigma_end, confinement=confinement))
        m = model.clone()
        if backbone.kind == "dit":
            comfy_joint.install_joint(m.model_options, guidance)
        else:
            comfy_patch.patch_model(m, guidance, backbone.layer_keys)
        return io.NodeOutput(m)
