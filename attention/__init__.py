"""Pure-torch attention math (no ComfyUI, no diffusers import): mask grids, identifier and style attention,
and the one guided cross-attention call both adapters run."""
from .guided import (NUM_SD15_LAYERS, SD15_LAYER_KEYS, STYLE_LAYER_PRESETS, Guidance, IdentifierGuidance,
                     LayerContext, ProductMask, StyleGuidance,
                     guided_cross_attention, positive_rows_from)
from .identifier import (IdentifierSpec, identifier_attention, identifier_attention_mass, identifier_bias,
                         identifier_columns, identifier_mass_map, plain_attention)
from .masks import background_weights, infer_grid, product_coverage, rows_for_batch
from .style import style_attention

__all__ = [
    "NUM_SD15_LAYERS", "SD15_LAYER_KEYS", "STYLE_LAYER_PRESETS", "Guidance", "IdentifierGuidance", "LayerContext",
    "ProductMask", "StyleGuidance",
    "guided_cross_attention", "positive_rows_from",
    "IdentifierSpec", "identifier_attention", "identifier_attention_mass", "identifier_bias",
    "identifier_columns", "identifier_mass_map", "plain_attention",
    "background_weights", "infer_grid", "product_coverage", "rows_for_batch",
    "style_attention",
]
