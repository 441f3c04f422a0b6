"""Nodes that confine prompt tokens to the background (the Category-Wise Generator's attention)."""
from __future__ import annotations

import math

from ..attention import CONFINEMENTS, IdentifierGuidance, IdentifierSpec, ProductMask
from ..attention import comfy_patch
from .common import (IDENTIFIER, NodeInputError, backbone_of, backbone_of_clip, check_identifier_fits, confined_prompt,
                     word_positions)

CATEGORY = "productbg/attention"


class BackgroundWords:
    """Encode a prompt and mark some of its words as an identifier to keep on the background (zero-shot)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", IDENTIFIER)
    RETURN_NAMES = ("conditioning", "identifier")
    FUNCTION = "encode"
    DESCRIPTION = "Encodes a prompt; the chosen words' cross-attention can then be confined to the background."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The CLIP of your SD1.5 or SDXL checkpoint (on SDXL the words must "
                                "tokenize alike for CLIP-L and CLIP-G, which they do for plain words)."}),
            "text": ("STRING", {"multiline": True, "default": "a product photo on a marble table, soft light",
                                "tooltip": "The positive prompt. Weighting syntax like (word:1.2) works."}),
            "background_words": ("STRING", {"default": "marble table",
                                            "tooltip": "Words of the prompt that describe the background only."}),
        }}

    def encode(self, clip, text: str, background_words: str):
        tokens = clip.tokenize(text)
        backbone = backbone_of_clip(tokens)  # SD1.5 or SDXL, else a one-line error naming the family
        positions = word_positions(clip, tokens, background_words)
        if not positions:
            raise NodeInputError(f"{background_words!r} does not occur in the prompt; copy the words exactly "
                                 "as they appear in the text")
        return confined_prompt(clip, tokens, positions, backbone)


class MaskGuidedAttention:
    """Keep an identifier's cross-attention off the product: the mask-guided attention layer, in every block."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    DESCRIPTION = "Confines the identifier (category or background words) to the background of the product mask."

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to patch (left untouched; a patched copy is returned)."}),
            "identifier": (IDENTIFIER, {"tooltip": "From Category Prompt or Background Words."}),
            "product_mask": ("MASK", {"tooltip": "1 = product. From Place Product, Segment Product or any mask."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                   "tooltip": "1 removes the identifier from the product entirely; 0 does nothing."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Sampling progress where confinement starts."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Sampling progress where confinement ends."}),
        }, "optional": {
            "confinement": (list(CONFINEMENTS), {
                "default": "context",
                "tooltip": "context: product areas attend to the prompt encoded without the identifier, so the "
                           "product is exactly independent of it. columns: only the identifier's own tokens are "
                           "masked (leaks through the later tokens of CLIP's causal text encoder; for ablations)."}),
        }}

    def patch(self, model, identifier: IdentifierSpec, product_mask, strength: float, start_percent: float,
              end_percent: float, confinement: str = "context"):
        if start_percent > end_percent:
            raise NodeInputError(f"start_percent {start_percent} is after end_percent {end_percent}")
        backbone = backbone_of(model)
        check_identifier_fits(identifier, backbone)
        product = ProductMask(product_mask)
        if not product.mask.any():
            raise NodeInputError("the product mask is empty (all 0): connect the product's mask (1 = product)")
        if confinement not in CONFINEMENTS:
            raise NodeInputError(f"confinement must be one of {', '.join(CONFINEMENTS)}, got {confinement!r}")
        if confinement == "context" and identifier.plain_context is None:
            raise NodeInputError("this identifier carries no identifier-free prompt: make it with Category Prompt "
                                 "or Background Words, or set confinement to 'columns'")
        sampling = model.get_model_object("model_sampling")
        # The full range is left ungated (no per-step sigma test in the attention).
        sigma_start = math.inf if start_percent <= 0 else float(sampling.percent_to_sigma(start_percent))
        sigma_end = 0.0 if end_percent >= 1 else float(sampling.percent_to_sigma(end_percent))
        guidance = comfy_patch.current_guidance(model.model_options).with_identifier(IdentifierGuidance(
            identifier, product, strength, sigma_start=sigma_start, sigma_end=sigma_end, confinement=confinement))
        m = model.clone()
        comfy_patch.patch_model(m, guidance, backbone.layer_keys)
        return (m,)
