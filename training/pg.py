"""Personality-Wise Generator trainer (``productbg train-pg``): the reference-style encoder, self-supervised.

Pairs come from single images (PAPER.md): the target is a training image; its reference is the same image with
the product removed (filled from the surrounding background), then a random resized crop (area 0.5–1) and a
horizontal flip — no colour jitter, colour is style. The frozen CLIP vision model encodes the reference; the
trainable :class:`~productbg.weights.style_encoder.StyleEncoder` (projection + per-layer K/V, IP-Adapter layout)
turns it into style tokens that enter every cross-attention layer through the same guided processors used at
inference, confined to the target's background. UNet, VAE, text encoder and CLIP vision stay frozen.

Output: ``style_encoder.safetensors`` (IP-Adapter layout + productbg metadata). ``init_from`` starts from an
IP-Adapter SD1.5 file or an earlier style encoder.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import Guidance, ProductMask, StyleGuidance
from ..attention.diffusers_processor import DiffusersCall, install_processors
from ..backbones.targets import TargetModel, guess_target
from ..imaging.fill import fill_product
from ..pipeline.components import load_clip_vision
from ..pipeline.sampling import upcast_vae
from ..pipeline.tiny import tiny_vision_encoder
from ..weights.style_encoder import CLIP_MEAN, NULL_REFERENCE_RGB, StyleEncoder, StyleEncoderConfig, load_style_encoder
from .datasets import ImageMaskDataset, open_bg60k
from .diffusion import DiffusionModule
from .identifiers import encode_prompt
from .models import SDComponents, load_components
from .preview import pg_preview

STYLE_FILE = "style_encoder.safetensors"
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class PGConfig:
    """Personality-Wise training settings.

    Attributes:
        data: BG60k-layout folder.
        model: base model (as for ``train-cg``).
        vision_model: ``"tiny"``, a transformers CLIP-vision folder, or a ViT-H/14 ``.safetensors``.
        resolution: training image side.
        variant: ``"linear"`` (image embeds) or ``"plus"`` (Resampler over penultimate hidden states).
        tokens: style tokens.
        resampler: ``plus`` only — the Resampler's ``(width, depth, heads, head width)``; ``None`` keeps
            IP-Adapter Plus's release shape (768, 4, 12, 64); small models want a small one.
        init_from: IP-Adapter / style-encoder file to start from.
        prompt: the text prompt of every sample.
        crop_scale: area range of the reference's random resized crop.
        drop_reference: probability of training a sample with an empty (zero) reference.
        confine: confine style attention to the target's background.
        mask_jitter, background_loss_weight: as for ``train-cg``.
        skip_bad, gradient_checkpointing, weights_dtype: as for ``train-cg``.
        model_configs: component configs for a single-file ``model``.
    """

    data: Path
    model: str = "tiny-inpaint"
    vision_model: str = "tiny"
    resolution: int = 512
    variant: str = "linear"
    tokens: int = 4
    resampler: tuple[int, int, int, int] | None = None
    init_from: Path | None = None
    prompt: str = "a product photo"
    crop_scale: tuple[float, float] = (0.5, 1.0)
    drop_reference: float = 0.05
    confine: bool = True
    mask_jitter: tuple[float, float] = (-0.04, 0.02)
    background_loss_weight: float = 1.0
    skip_bad: bool = False
    gradient_checkpointing: bool = False
    weights_dtype: str = "float32"
    model_configs: Path | None = None
    buckets: bool = False  # aspect-ratio buckets (multiple-of-64 sides, one bucket per batch): see docs/training.md

    def __post_init__(self) -> None:
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0 <= self.drop_reference < 1:
            raise ValueError(f"drop_reference must be in [0, 1), got {self.drop_reference}")


# ---------------------------------------------------------------------------------------------- pairs
def remove_product(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference of a self-supervised pair: the product region filled from the background (-1..1 image)."""
    return fill_product(image, mask).clamp(-1, 1)


def random_resized_crop(image: torch.Tensor, rng: np.random.Generator, scale: tuple[float, float],
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """A crop of area fraction ``scale`` and aspect ``ratio`` (log-uniform), resized back to the input size."""
    _, h, w = image.shape
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        cw, ch = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            crop = image[:, top:top + ch, left:left + cw]
            return F.interpolate(crop[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
    return image


class PairDataset(torch.utils.data.Dataset):
    """Target (image, mask) + self-supervised reference, from an :class:`ImageMaskDataset`."""

    def __init__(self, base: ImageMaskDataset, crop_scale: tuple[float, float]) -> None:
        self.base, self.crop_scale = base, crop_scale

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        i, seed = item if isinstance(item, tuple) else (item, 0)
        out = self.base[(i, seed)]
        rng = np.random.default_rng([seed, 0xC0FFEE])
        ref = random_resized_crop(remove_product(out["image"], out["mask"]), rng, self.crop_scale)
        if rng.random() < 0.5:
            ref = ref.flip(-1)
        out["reference"] = ref.contiguous()
        return out


# ---------------------------------------------------------------------------------------------- model
def clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B,3,H,W] in [-1,1] → CLIP-normalised [B,3,size,size]: the centre square (a bucket's non-square reference
    is cropped as CLIP preprocessing crops at inference, never squashed), resized."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = images[..., top:top + side, left:left + side]
    x = F.interpolate((square.float() + 1) / 2, size=(size, size), mode="bicubic", align_corners=False,
                      antialias=True).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=x.device)[:, None, None]
    return (x - mean) / std


class PGModule(DiffusionModule):
    """Frozen base model + CLIP vision; trainable style encoder; forward = denoising loss with style tokens."""

    def __init__(self, comps: SDComponents, vision: torch.nn.Module, encoder: torch.nn.Module, context: torch.Tensor,
                 cfg: PGConfig, pooled: torch.Tensor | None = None) -> None:
        super().__init__(comps)
        self.vision, self.encoder, self.cfg = vision, encoder, cfg
        self.register_buffer("context", context, persistent=False)
        self.register_buffer("pooled", pooled, persistent=False)  # SDXL's pooled text embedding, else None

    def clip_features(self, reference: torch.Tensor) -> torch.Tensor:
        """Frozen CLIP-vision features of [B,3,H,W] references: image embeds (linear) or penultimate states."""
        with torch.no_grad():
            px = clip_pixels(reference, int(self.vision.config.image_size)).to(self.vision.dtype)
            out = self.vision(pixel_values=px, output_hidden_states=True)
            return (out.image_embeds if self.encoder.config.variant == "linear" else out.hidden_states[-2]).float()

    def style_tokens(self, reference: torch.Tensor, generator: torch.Generator,
                     drop: float | None = None) -> torch.Tensor:
        """Style tokens; each reference becomes the null reference with probability ``drop`` (default: the config's).

        The null reference is the one inference uses (``weights.style_encoder.reference_tokens``): zero image
        embeds for ``linear``, the CLIP features of the empty image for ``plus``.
        """
        p = self.cfg.drop_reference if drop is None else drop
        keep = (torch.rand(reference.shape[0], generator=generator) >= p).to(reference.device)
        if self.encoder.config.variant == "plus":
            null = reference.new_tensor(NULL_REFERENCE_RGB).view(1, 3, 1, 1) * 2 - 1  # 0..1 → the batch's -1..1
            return self.encoder(self.clip_features(torch.where(keep.view(-1, 1, 1, 1), reference, null)))
        feats = self.clip_features(reference)
        return self.encoder(feats * keep.view(-1, 1).to(feats.dtype))

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
        mask = batch["mask"].float()
        tokens = self.style_tokens(batch["reference"], generator)
        product = ProductMask(mask[:, 0]) if self.cfg.confine else None
        style = StyleGuidance(tokens, torch.zeros_like(tokens), self.encoder.layer_kv, product=product, cache_kv=False)
        call = DiffusersCall(Guidance().with_style(style), latent_hw=self.latent_hw(mask), cond_or_uncond=(0,))
        context = self.context.expand(mask.shape[0], -1, -1)
        mse = self.denoising_loss(batch["image"], mask, generator, context, call, self.cfg.mask_jitter,
                                  self.cfg.background_loss_weight, self.added_conditions(batch, self.pooled))
        return {"loss": mse, "mse": mse.detach()}


# ---------------------------------------------------------------------------------------------- task
def load_vision(source: str) -> torch.nn.Module:
    """CLIP vision with projection: ``"tiny"``, a transformers folder, or a ViT-H/14 ``.safetensors``."""
    # optional dependency: transformers
    from transformers import CLIPVisionModelWithProjection

    if source == "tiny":
        return tiny_vision_encoder()
    p = Path(source)
    if p.is_dir():
        return CLIPVisionModelWithProjection.from_pretrained(p, local_files_only=True, use_safetensors=True)

    return load_clip_vision(p).model


def cross_attention_widths(unet: torch.nn.Module) -> tuple[int, ...]:
    """Query widths of the UNet's cross-attention layers in ``attn_processors`` (IP-Adapter) order."""
    names = [n.removesuffix(".processor") for n in unet.attn_processors if n.endswith("attn2.processor")]
    return tuple(int(unet.get_submodule(n).to_q.out_features) for n in names)


def target_for(unet: torch.nn.Module):
    """The :class:`~productbg.backbones.targets.TargetModel` a style encoder for ``unet`` must fit."""
    widths, ctx = cross_attention_widths(unet), int(unet.config.cross_attention_dim)
    known = guess_target(ctx, len(widths))
    if known is not None and known.hidden_sizes == widths:
        return known
    return TargetModel("custom", f"custom UNet ({len(widths)} layers)", ctx, widths)


class PGTask:
    """The :class:`~.engine.TrainTask` of the Personality-Wise Generator."""

    def __init__(self, cfg: PGConfig) -> None:
        self.cfg = cfg
        index = open_bg60k(cfg.data, skip_bad=cfg.skip_bad)
        self._dataset = PairDataset(ImageMaskDataset(index, cfg.resolution, flip=True, buckets=cfg.buckets), cfg.crop_scale)

    def dataset(self) -> PairDataset:
        return self._dataset

    def fingerprint(self) -> dict[str, Any]:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.cfg).items() if k != "data"}
        d.update(crop_scale=list(self.cfg.crop_scale), mask_jitter=list(self.cfg.mask_jitter),
                 resampler=list(self.cfg.resampler) if self.cfg.resampler else None, dataset_size=len(self._dataset))
        return d

    def build(self, device: torch.device) -> PGModule:
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(self.cfg.weights_dtype, torch.float32)
        comps = load_components(self.cfg.model, dtype, config_dir=self.cfg.model_configs)
        comps.freeze()
        vision = load_vision(self.cfg.vision_model).requires_grad_(False).eval()
        for m in (comps.unet, comps.vae, *comps.text_encoders, vision):
            if m.dtype != dtype:
                m.to(dtype)
        if comps.vae.dtype == torch.float16:
            upcast_vae(comps.vae)  # SDXL's VAE overflows in float16 (as at inference)
        install_processors(comps.unet)
        if self.cfg.gradient_checkpointing:
            comps.unet.enable_gradient_checkpointing()
        target = target_for(comps.unet)
        if self.cfg.init_from is not None:
            encoder = load_style_encoder(self.cfg.init_from, target, dtype=torch.float32)
        else:
            width = vision.config.projection_dim if self.cfg.variant == "linear" else vision.config.hidden_size
            shape = {}
            if self.cfg.resampler is not None:
                shape = dict(zip(("resampler_dim", "depth", "heads", "dim_head"), self.cfg.resampler))
            encoder = StyleEncoder(StyleEncoderConfig.for_target(target, variant=self.cfg.variant, tokens=self.cfg.tokens,
                                                                 clip_width=int(width), **shape))
        encoder.train().requires_grad_(True)
        context, pooled = _prompt_context(comps, self.cfg.prompt)
        return PGModule(comps, vision, encoder, context, self.cfg, pooled)

    def param_groups(self, module: PGModule, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(module.encoder.parameters()), "lr": lr}]

    def trainable_state(self, module: PGModule) -> dict[str, torch.Tensor]:
        return {f"style.{k}": v for k, v in module.encoder.state_dict().items()}

    def load_trainable_state(self, module: PGModule, tensors: dict[str, torch.Tensor]) -> None:
        own = self.trainable_state(module)
        if set(own) != set(tensors):
            raise ValueError("checkpoint tensors do not match this style encoder (variant or tokens changed?)")
        module.encoder.load_state_dict({k.removeprefix("style."): v for k, v in tensors.items()})

    def save_outputs(self, module: PGModule, out_dir: Path, step: int) -> list[Path]:
        training = {"trainer": "train-pg", "steps": step, "dataset": str(self.cfg.data), "model": self.cfg.model,
                    "vision_model": self.cfg.vision_model}
        return [module.encoder.save(out_dir / STYLE_FILE, training)]

    def preview(self, module: PGModule, out_dir: Path, step: int) -> Path | None:
        return pg_preview(module, self._dataset, out_dir, step)


@torch.no_grad()
def _prompt_context(comps: SDComponents, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompt's context (SD1.5: CLIP-L's last hidden state; SDXL: both penultimate states concatenated) and
    SDXL's pooled embedding (else None), encoded as inference encodes them."""
    ids = [tok(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
           for tok in comps.tokenizers]
    context, pooled = encode_prompt(comps.text_encoders, ids)
    return context.float(), None if pooled is None else pooled.float()
