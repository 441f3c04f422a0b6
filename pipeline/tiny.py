"""Tiny Stable-Diffusion components built from configs (random weights, no downloads, CPU-fast).

Used by the tests, the foundation demo and benchmarks that need a UNet but not its quality.
"""
from __future__ import annotations

import torch

CROSS_DIM = 32


def tiny_unet(in_channels: int = 4, seed: int = 0):
    """UNet2DConditionModel with SD1.5's block structure in miniature: 7 cross-attention layers."""
    # optional dependency: diffusers
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CROSS_DIM,
        attention_head_dim=8, norm_num_groups=8,
    ).eval()


def tiny_vae(seed: int = 0):
    # optional dependency: diffusers
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                         latent_channels=4, norm_num_groups=4, sample_size=32).eval()


def tiny_text_encoder(seed: int = 0, width: int = CROSS_DIM):
    """CLIPTextModel with the real CLIP vocabulary size (so the shipped tokenizer works) and width 32."""
    # optional dependency: transformers
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModel(config).eval()


def tiny_vision_encoder(seed: int = 0):
    # optional dependency: transformers
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=24)
    return CLIPVisionModelWithProjection(config).eval()


# ---------------------------------------------------------------------------------------------- SDXL-shaped
#: Widths of the tiny SDXL-shaped text encoders (different, as CLIP-L 768 and OpenCLIP-G 1280 are).
TINY_XL_WIDTHS = (32, 48)
TINY_XL_TIME_DIM = 8


def tiny_sdxl_unet(in_channels: int = 4, seed: int = 0):
    """UNet2DConditionModel with SDXL's structure in miniature: no attention at the top level, transformer
    depth 2 below it (8 cross-attention layers), an 80-wide context (32 + 48) and ``text_time`` added
    conditioning (48-wide pooled text embeds + 6 time ids)."""
    # optional dependency: diffusers
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=sum(TINY_XL_WIDTHS),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TINY_XL_TIME_DIM,
        projection_class_embeddings_input_dim=TINY_XL_WIDTHS[1] + 6 * TINY_XL_TIME_DIM,
    ).eval()


def tiny_text_encoder_2(seed: int = 0):
    """CLIPTextModelWithProjection (SDXL's second encoder in miniature): width 48, projection 48."""
    # optional dependency: transformers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed + 1)
    width = TINY_XL_WIDTHS[1]
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=96, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=0, projection_dim=width, hidden_act="gelu")
    return CLIPTextModelWithProjection(config).eval()
