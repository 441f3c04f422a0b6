"""Pure-torch attention math (no ComfyUI, no diffusers): mask grids, identifier and style attention."""
from .masks import background_weights, infer_grid, product_coverage
from .identifier import IdentifierSpec, identifier_attention, identifier_attention_mass, identifier_columns
from .style import style_attention

__all__ = [
    "background_weights", "infer_grid", "product_coverage",
    "IdentifierSpec", "identifier_attention", "identifier_attention_mass", "identifier_columns",
    "style_attention",
]
