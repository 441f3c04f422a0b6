"""Flux.1's models on diffusers: :class:`FluxParts` (what a Flux run is built from) and the tiny random set.

``FluxParts`` holds the diffusers ``FluxTransformer2DModel``, the 16-channel ``AutoencoderKL``, T5-XXL
(``T5EncoderModel``: the text every block attends to) and CLIP-L (``CLIPTextModel``: its pooled output modulates
every token), their tokenizers (the shipped vocabularies), the variant (``dev``, ``fill``, ``schnell``) and where it
came from. :func:`tiny_flux_parts` builds the same set in miniature with random weights (CPU tests; the T5 keeps
the real 32,128-row vocabulary so the shipped tokenizer and T5's sentinel work). Loading the published files is
:mod:`.flux_files`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..backbones import FLUX
from .errors import PipelineError
from .flux_latents import FILL_FEATURES, PLAIN_FEATURES
from .text import clip_tokenizer, t5_tokenizer
from .tiny import tiny_text_encoder

VARIANTS = ("dev", "fill", "schnell")
#: T5-XXL v1.1's embedding rows (the tokenizer has 32,100 tokens; the table is padded to 32,128).
T5_ROWS = 32128
#: T5's tokens per prompt: ComfyUI's Flux T5 tokenizer pads to at least 256 (``min_length=256``).
T5_MIN_LENGTH = 256
#: widths of the tiny set: T5 (the text the blocks attend to), CLIP-L (pooled), transformer heads × head dim
TINY_T5_WIDTH, TINY_CLIP_WIDTH, TINY_HEADS, TINY_HEAD_DIM = 32, 32, 2, 16
TINY_ROPE_AXES = (4, 6, 6)


@dataclass
class FluxParts:
    """Everything a Flux.1 run is built from.

    Attributes:
        transformer: diffusers ``FluxTransformer2DModel`` (dev / schnell: 64 input features; Fill: 384).
        vae: diffusers ``AutoencoderKL`` with 16 latent channels.
        t5: transformers ``T5EncoderModel`` (T5-XXL; its last hidden state is the text the blocks attend to).
        clip_l: transformers ``CLIPTextModel`` (its ``pooler_output`` modulates every token).
        t5_tokenizer, clip_tokenizer: the shipped T5 and CLIP tokenizers.
        variant: ``dev``, ``fill`` or ``schnell`` (from the transformer's keys).
        source: where the transformer came from (for reports).
        redux: a Flux Redux reference encoder (:class:`~.flux_redux.ReduxEncoder`), or None.
        identifiers: a ``flux`` category bank (or ``SeededIdentifiers`` with ``t5xxl`` vectors), or None.
    """

    transformer: Any
    vae: Any
    t5: Any
    clip_l: Any
    t5_tokenizer: Any
    clip_tokenizer: Any
    variant: str = "dev"
    source: str = ""
    redux: Any = None
    identifiers: Any = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise PipelineError(f"Flux variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")

    @property
    def backbone(self):
        """The Flux :class:`~productbg.backbones.Backbone`."""
        return FLUX

    @property
    def fill(self) -> bool:
        """Whether the transformer is Flux Fill (reads the masked image and mask)."""
        return self.variant == "fill"

    @property
    def guidance_embeds(self) -> bool:
        """Whether the transformer takes distilled guidance (dev, Fill; schnell does not)."""
        return bool(self.transformer.config.guidance_embeds)

    @property
    def family(self) -> str:
        return FLUX.family

    @property
    def style_encoder(self) -> None:
        """None: Flux.1 has no IP-Adapter style encoder (its reference style is Redux, :attr:`redux`)."""
        return None

    @property
    def image_encoder(self) -> None:
        """None: no CLIP vision model beside an IP-Adapter (Redux brings its own SigLIP)."""
        return None

    @property
    def takes_reference(self) -> bool:
        """Whether a reference image can style the background: a Redux encoder is loaded."""
        return self.redux is not None

    @property
    def models(self) -> tuple:
        """The torch modules, transformer first."""
        return tuple(m for m in (self.transformer, self.vae, self.t5, self.clip_l) if m is not None)


def tiny_flux_transformer(variant: str = "fill", seed: int = 0, double: int = 1, single: int = 1,
                          t5_width: int = TINY_T5_WIDTH):
    """A tiny diffusers ``FluxTransformer2DModel`` (32 wide, 2 heads of 16) with the variant's inputs: Fill reads
    384 features, dev and schnell 64; schnell has no guidance embedder; it reads ``t5_width``-wide text."""
    # optional dependency: diffusers
    from diffusers import FluxTransformer2DModel

    if variant not in VARIANTS:
        raise PipelineError(f"Flux variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=FILL_FEATURES if variant == "fill" else PLAIN_FEATURES,
        out_channels=PLAIN_FEATURES, num_layers=double, num_single_layers=single, attention_head_dim=TINY_HEAD_DIM,
        num_attention_heads=TINY_HEADS, joint_attention_dim=t5_width, pooled_projection_dim=TINY_CLIP_WIDTH,
        guidance_embeds=variant != "schnell", axes_dims_rope=TINY_ROPE_AXES).eval()


def tiny_flux_vae(seed: int = 0):
    """A tiny ``AutoencoderKL`` with Flux's latent format: 16 channels, 8× downsampling, no quant convs, scale
    0.3611 and shift 0.1159 in its config."""
    # optional dependency: diffusers
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                         latent_channels=FLUX.latent.channels, norm_num_groups=4, sample_size=32,
                         scaling_factor=FLUX.latent.scale, shift_factor=FLUX.latent.shift,
                         use_quant_conv=False, use_post_quant_conv=False).eval()


def tiny_t5(seed: int = 0, width: int = TINY_T5_WIDTH):
    """A tiny ``T5EncoderModel`` (2 layers, ``width`` wide, gated GELU as T5 v1.1) with T5-XXL's 32,128-row
    vocabulary (``width=4096``: T5-XXL's width, so a real ``flux`` bank fits)."""
    # optional dependency: transformers
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=T5_ROWS, d_model=width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=32, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False,
                      use_cache=False, tie_word_embeddings=False)
    return T5EncoderModel(config).eval()


def tiny_flux_parts(variant: str = "fill", seed: int = 0, t5_width: int = TINY_T5_WIDTH) -> FluxParts:
    """The tiny random Flux set (CPU-fast; outputs are noise, the data flow is the real one).

    Args:
        variant: ``fill`` (384 input features), ``dev`` or ``schnell`` (no guidance embedder).
        seed: weight seed.
        t5_width: T5's width (4096 to take a real ``flux`` bank; its embedding table is then 0.5 GB).
    """
    return FluxParts(tiny_flux_transformer(variant, seed, t5_width=t5_width), tiny_flux_vae(seed),
                     tiny_t5(seed, t5_width),
                     tiny_text_encoder(seed, TINY_CLIP_WIDTH), t5_tokenizer(), clip_tokenizer(), variant,
                     f"tiny-flux-{variant}")
