"""Pure-torch attention math (no ComfyUI, no diffusers import): mask grids, identifier and style attention,
and the one guided cross-attention call both adapters run."""
from ..backbones import BACKBONES, SD15, SDXL, Backbone, BackboneError, CrossAttnLayer
from .guided import (CONFINEMENTS, NUM_SD15_LAYERS, SD15_LAYER_KEYS, STYLE_LAYER_PRESETS, CallPlan, Guidance,
                     IdentifierGuidance, LayerContext, ProductMask, StyleGuidance, extend_context,
                     guided_cross_attention, plan_call, positive_rows_from)
from .identifier import (IdentifierSpec, context_attention, context_blend, identifier_attention,
                         identifier_attention_mass, identifier_bias, identifier_columns, identifier_mass_map,
                         pad_to_length, plain_attention)
from .masks import background_weights, infer_grid, product_coverage, rows_for_batch
from .style import style_attention

__all__ = [
    "BACKBONES", "SD15", "SDXL", "Backbone", "BackboneError", "CrossAttnLayer",
    "CONFINEMENTS", "NUM_SD15_LAYERS", "SD15_LAYER_KEYS", "STYLE_LAYER_PRESETS", "CallPlan", "Guidance",
    "IdentifierGuidance", "LayerContext", "ProductMask", "StyleGuidance", "extend_context",
    "guided_cross_attention", "plan_call", "positive_rows_from",
    "IdentifierSpec", "context_attention", "context_blend", "identifier_attention", "identifier_attention_mass",
    "identifier_bias", "identifier_columns", "identifier_mass_map", "pad_to_length", "plain_attention",
    "background_weights", "infer_grid", "product_coverage", "rows_for_batch",
    "style_attention",
]
