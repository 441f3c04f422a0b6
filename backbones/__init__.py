"""The backbone registry: every base-model family productbg knows, UNets and diffusion transformers, as data.

The ground floor of the package (beside ``fileio``): it imports nothing of productbg, and the attention
adapters, weight formats, nodes, pipeline, trainers and CLI read every model-dependent fact from here — layers
and how they are addressed, text encoders, latent format, default canvas and sampler, style mechanism, how a
single file or a ComfyUI model is recognised, and the one canvas table. ``targets`` is the style-encoder view
(what an IP-Adapter file must fit).
"""
from .table import (BACKBONES, FLUX, RATIOS, SD15, SDXL, SUPPORTED, Backbone, BackboneError, ComfyKey, CrossAttnLayer,
                    DitBlock, LatentFormat, SamplerDefaults, TextEncoder, backbone, canvas, canvas_multiple_for,
                    family_by_context_width, from_checkpoint_keys, from_comfy_config, from_context, from_token_keys,
                    require, supported, unsupported)

__all__ = [
    "BACKBONES", "FLUX", "RATIOS", "SD15", "SDXL", "SUPPORTED", "Backbone", "BackboneError", "ComfyKey",
    "CrossAttnLayer", "DitBlock", "LatentFormat", "SamplerDefaults", "TextEncoder", "backbone", "canvas",
    "canvas_multiple_for", "family_by_context_width", "from_checkpoint_keys", "from_comfy_config", "from_context",
    "from_token_keys", "require", "supported", "unsupported",
]
