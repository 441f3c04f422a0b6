"""The models a generation run needs, and where they come from.

* base model: the tiny random built-ins (:func:`tiny_components`), a diffusers folder (:func:`load_folder`) or a
  single-file checkpoint (:mod:`.single_file`);
* category identifiers: a :class:`~productbg.weights.CategoryBank` file, or :class:`SeededIdentifiers`
  (deterministic random vectors per name, for the tiny model whose text width no bank file has);
* reference style: a style encoder file (IP-Adapter SD1.5 layout) and the CLIP vision model it reads, wrapped
  in :class:`ClipVision` so the style-token code of the ComfyUI node runs unchanged;
* LoRA files merged into the UNet / text encoder weights (:func:`merge_lora`).

Nothing here downloads: folders are read with ``local_files_only`` and configs come from ``assets/sd15``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .. import backbones
from ..weights.errors import WeightsError
from ..weights.lora import read_lora
from ..weights.safefile import read_header
from ..weights.style_encoder import StyleEncoder, StyleEncoderConfig
from .errors import PipelineError
from .flux_lora import is_flux_lora
from .quiet import quiet_loading
from .single_file import SD15_CONFIGS, SDXL_CONFIGS, read_checkpoint, load_single_file
from .text import clip_tokenizer, open_clip_tokenizer
from .tiny import (TINY_XL_WIDTHS, tiny_sdxl_unet, tiny_text_encoder, tiny_text_encoder_2, tiny_unet, tiny_vae,
                   tiny_vision_encoder)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VIT_H_CONFIG = "clip_vision_vit_h14_config.json"
VIT_BIGG_CONFIG = "clip_vision_vit_bigg14_config.json"


class Identifiers(Protocol):
    """What the pipeline needs from a category bank (``CategoryBank`` satisfies it)."""

    template: str
    vectors_per_id: int

    def vectors(self, name: str, encoder: str = "clip_l") -> torch.Tensor: ...

    def resolve(self, name: str) -> str: ...


@dataclass
class Components:
    """Everything a :class:`~productbg.pipeline.ProductBGPipeline` is built from.

    Attributes:
        unet, vae, text_encoder, tokenizer: the Stable Diffusion parts.
        scheduler_config: config dict of the sampling schedule (a DDIM scheduler is built from it).
        image_encoder: optional :class:`ClipVision` for reference style and evaluation.
        style_encoder: optional :class:`~productbg.weights.StyleEncoder`.
        identifiers: optional category bank (or :class:`SeededIdentifiers`).
        source: where the base model came from (for reports).
        text_encoder_2, tokenizer_2: SDXL's second text encoder (``CLIPTextModelWithProjection``) and its
            tokenizer; None on SD1.5.
        family: the backbone family (``sd15``, ``sdxl``; see :mod:`productbg.backbones`).
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict
    image_encoder: "ClipVision | None" = None
    style_encoder: Any = None
    identifiers: Identifiers | None = None
    source: str = ""
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    family: str = "sd15"

    @property
    def backbone(self):
        """The :class:`~productbg.backbones.Backbone` of these components."""
        return backbones.backbone(self.family)

    @property
    def text_encoders(self) -> tuple:
        """The text encoders, in context order."""
        return tuple(e for e in (self.text_encoder, self.text_encoder_2) if e is not None)

    @property
    def takes_reference(self) -> bool:
        """Whether a reference image can style the background: a style encoder and its CLIP vision are loaded."""
        return self.style_encoder is not None and self.image_encoder is not None


def shipped_scheduler_config() -> dict:
    """SD1.5's noise schedule (``assets/sd15/scheduler_config.json``)."""
    return json.loads((SD15_CONFIGS / "scheduler_config.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- identifiers
class SeededIdentifiers:
    """Identifier vectors made up from each category name (sha256-seeded normal vectors).

    Any name is a category. For the tiny random model (no bank file fits its 32-wide text encoder) and for
    plumbing tests; real runs use a trained bank.
    """

    def __init__(self, width: int, vectors_per_id: int = 2,
                 template: str = "a product photo on a {id} background",
                 widths: dict[str, int] | None = None) -> None:
        self.width, self.vectors_per_id, self.template = width, vectors_per_id, template
        self.widths = dict(widths or {"clip_l": width})  # per text encoder (SDXL-shaped: clip_l and clip_g)

    def resolve(self, name: str) -> str:
        """Names are used as given (stripped)."""
        if not name.strip():
            raise PipelineError("the category name is empty")
        return name.strip()

    def vectors(self, name: str, encoder: str = "clip_l") -> torch.Tensor:
        """``[vectors_per_id, width]`` vectors derived from the name (and the encoder, beyond ``clip_l``)."""
        if encoder not in self.widths:
            raise PipelineError(f"these identifiers have no '{encoder}' vectors")
        key = self.resolve(name) if encoder == "clip_l" else f"{self.resolve(name)}\0{encoder}"
        seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.vectors_per_id, self.widths[encoder], generator=g) * 0.5


# ---------------------------------------------------------------------------------------------- CLIP vision
class ClipVision:
    """A transformers ``CLIPVisionModelWithProjection`` behind ComfyUI's ``encode_image`` interface.

    Args:
        model: the vision model (its config gives the input size).
    """

    def __init__(self, model: Any) -> None:
        self.model = model.eval()
        self.size = int(model.config.image_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, 3]`` 0..1 → normalised ``[B, 3, size, size]`` (shorter side resized, centre crop)."""
        x = images[..., :3].permute(0, 3, 1, 2).float()
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        x = F.interpolate(x, size=(max(self.size, round(h * scale)), max(self.size, round(w * scale))),
                          mode="bicubic", align_corners=False, antialias=True)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size].clamp(0, 1)
        mean = torch.tensor(CLIP_MEAN, device=x.device)[:, None, None]
        std = torch.tensor(CLIP_STD, device=x.device)[:, None, None]
        return (x - mean) / std

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Image embeds ``[B, D]`` and penultimate hidden states ``[B, N, W]`` of ``[B, H, W, 3]`` images."""
        p = next(self.model.parameters())
        out = self.model(pixel_values=self.preprocess(images).to(p), output_hidden_states=True)
        return {"image_embeds": out.image_embeds.float(), "penultimate_hidden_states": out.hidden_states[-2].float()}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeds ``[B, D]`` (for similarity metrics)."""
        return F.normalize(self.encode_image(images)["image_embeds"], dim=-1)


#: CLIP vision models a single file may hold, by hidden width (patch-embedding rows): the shipped config and name.
CLIP_VISION_CONFIGS: dict[int, tuple[Path, str]] = {
    1280: (SD15_CONFIGS / VIT_H_CONFIG, "ViT-H/14 (IP-Adapter SD1.5 and the SDXL _vit-h files)"),
    1664: (SDXL_CONFIGS / VIT_BIGG_CONFIG, "ViT-bigG/14 (ip-adapter_sdxl)"),
}


def load_clip_vision(path: str | os.PathLike) -> ClipVision:
    """Load a CLIP vision model: a transformers folder, or one ``.safetensors`` file (ViT-H/14 or ViT-bigG/14,
    told apart by width; shipped configs).

    Raises:
        PipelineError: missing, pickle, or a file whose shapes fit neither (pass its folder then).
    """
    # optional dependency: transformers
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    p = Path(path)
    if p.is_dir():
        try:
            with quiet_loading():
                return ClipVision(CLIPVisionModelWithProjection.from_pretrained(p, local_files_only=True,
                                                                                use_safetensors=True))
        except (OSError, ValueError) as e:
            raise PipelineError(f"{p}: not a CLIP vision folder with config.json and model.safetensors ({e})") from None

    tensors = {k.removeprefix("clip_vision."): v for k, v in read_checkpoint(p).items()}
    patch = tensors.get("vision_model.embeddings.patch_embedding.weight")
    config_file, name = CLIP_VISION_CONFIGS.get(int(patch.shape[0]) if patch is not None else 1280,
                                                CLIP_VISION_CONFIGS[1280])
    config = CLIPVisionConfig.from_json_file(str(config_file))
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise PipelineError(f"{p.name}: not a {name} CLIP vision file in the transformers layout; pass a folder "
                            f"with its config.json instead ({str(e).splitlines()[0][:200]})") from None
    return ClipVision(model)


# ---------------------------------------------------------------------------------------------- style encoder
def cross_attention_widths(unet: torch.nn.Module) -> tuple[int, ...]:
    """Query widths of the UNet's cross-attention layers in ``attn_processors`` (IP-Adapter) order."""
    names = [n.removesuffix(".processor") for n in unet.attn_processors if n.endswith("attn2.processor")]
    return tuple(int(unet.get_submodule(n).to_k.out_features) for n in names)


def check_style_fit(style_encoder: Any, unet: torch.nn.Module, image_encoder: ClipVision | None) -> None:
    """PipelineError unless the style encoder's layers and widths fit the UNet and the CLIP vision model."""
    cfg = style_encoder.config
    widths = cross_attention_widths(unet)
    if tuple(cfg.hidden_sizes) != widths or cfg.context_dim != int(unet.config.cross_attention_dim):
        raise PipelineError(f"the style encoder has {len(cfg.hidden_sizes)} layers of widths {cfg.hidden_sizes[:4]}... "
                            f"(context {cfg.context_dim}); this UNet has {len(widths)} cross-attention layers of "
                            f"{widths[:4]}... (context {unet.config.cross_attention_dim}): use a style encoder "
                            "made for this base model")
    if image_encoder is None:
        raise PipelineError("a style encoder needs its CLIP vision model: pass --clip-vision")


def tiny_style_encoder(unet: torch.nn.Module, image_encoder: ClipVision, seed: int = 0):
    """A random linear style encoder that fits ``unet`` and ``image_encoder`` (tiny-model runs and tests)."""
    torch.manual_seed(seed)
    cfg = StyleEncoderConfig(variant="linear", tokens=4, clip_width=int(image_encoder.model.config.projection_dim),
                             context_dim=int(unet.config.cross_attention_dim),
                             hidden_sizes=cross_attention_widths(unet), family="tiny")
    return StyleEncoder(cfg).eval()


# ---------------------------------------------------------------------------------------------- base models
def tiny_components(inpaint: bool = True, style: bool = True, seed: int = 0, family: str = "sd15") -> Components:
    """The tiny random model set (CPU-fast; outputs are noise, the data flow is the real one).

    Args:
        inpaint: 9-channel inpainting UNet (default) or 4-channel.
        style: include a tiny CLIP vision model and a matching random style encoder.
        seed: weight seed.
        family: ``sd15`` (one text encoder) or ``sdxl`` (SDXL-shaped: two text encoders of different widths,
            transformer depth 2, pooled text embeds and added time ids).
    """
    if family == "sdxl":
        unet = tiny_sdxl_unet(9 if inpaint else 4, seed)
        image_encoder = ClipVision(tiny_vision_encoder(seed)) if style else None
        style_encoder = tiny_style_encoder(unet, image_encoder, seed) if image_encoder is not None else None
        ids = SeededIdentifiers(TINY_XL_WIDTHS[0], widths=dict(zip(("clip_l", "clip_g"), TINY_XL_WIDTHS)))
        return Components(unet, tiny_vae(seed), tiny_text_encoder(seed, TINY_XL_WIDTHS[0]), clip_tokenizer(),
                          shipped_scheduler_config(), image_encoder, style_encoder, ids,
                          "tiny-sdxl-inpaint" if inpaint else "tiny-sdxl", tiny_text_encoder_2(seed),
                          open_clip_tokenizer(), "sdxl")
    if family != "sd15":
        raise PipelineError(f"no tiny model of family {family!r} (sd15, sdxl)")

    unet, text_encoder = tiny_unet(9 if inpaint else 4, seed), tiny_text_encoder(seed)
    image_encoder = ClipVision(tiny_vision_encoder(seed)) if style else None
    style_encoder = tiny_style_encoder(unet, image_encoder, seed) if image_encoder is not None else None
    return Components(unet, tiny_vae(seed), text_encoder, clip_tokenizer(), shipped_scheduler_config(),
                      image_encoder, style_encoder, SeededIdentifiers(int(text_encoder.config.hidden_size)),
                      "tiny-inpaint" if inpaint else "tiny")


def load_folder(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Components:
    """A diffusers Stable Diffusion folder (``unet/``, ``vae/``, ``text_encoder/``; ``scheduler/`` optional;
    SDXL: also ``text_encoder_2/``)."""
    # optional dependency: diffusers, transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection


    root = Path(path)
    missing = [d for d in ("unet", "vae", "text_encoder") if not (root / d / "config.json").is_file()]
    if missing:
        raise PipelineError(f"{root}: not a diffusers Stable Diffusion folder (missing "
                            f"{', '.join(d + '/config.json' for d in missing)})")
    kw: dict[str, Any] = dict(local_files_only=True, torch_dtype=dtype)
    try:
        with quiet_loading():
            unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw)
            vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **kw)
            text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True, dtype=dtype)
            text_encoder_2 = None
            if (root / "text_encoder_2" / "config.json").is_file():
                text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                    root / "text_encoder_2", local_files_only=True, dtype=dtype).eval()
    except (OSError, ValueError) as e:
        raise PipelineError(f"{root}: could not load ({str(e).splitlines()[0][:300]})") from None
    sched = root / "scheduler" / "scheduler_config.json"
    config = json.loads(sched.read_text(encoding="utf-8")) if sched.is_file() else shipped_scheduler_config()
    # The folder's own configs decide the shapes (tiny and custom folders load too): a second text encoder
    # makes it SDXL-style, as diffusers' SDXL folders are.
    family = "sdxl" if text_encoder_2 is not None else "sd15"
    return Components(unet.eval(), vae.eval(), text_encoder.eval(), clip_tokenizer(), config, source=str(root),
                      text_encoder_2=text_encoder_2,
                      tokenizer_2=open_clip_tokenizer() if text_encoder_2 is not None else None, family=family)


def load_base(source: str | os.PathLike, config_dir: str | os.PathLike | None = None,
              dtype: torch.dtype = torch.float32) -> Components:
    """A base model from a single-file checkpoint or a diffusers folder (no style, no identifiers yet)."""
    p = Path(source)
    if p.is_dir():
        return load_folder(p, dtype)
    parts = load_single_file(p, config_dir, dtype)
    second = parts.text_encoder_2 is not None
    return Components(parts.unet, parts.vae, parts.text_encoder, clip_tokenizer(), parts.scheduler_config,
                      source=str(p), text_encoder_2=parts.text_encoder_2,
                      tokenizer_2=open_clip_tokenizer() if second else None, family=parts.family)


# ---------------------------------------------------------------------------------------------- LoRA
def merge_lora(components: Components, path: str | os.PathLike, strength: float = 1.0) -> int:
    """Add a LoRA file's low-rank updates into the UNet / text-encoder weights (either key layout).

    Args:
        components: the models to change in place.
        path: ``.safetensors`` LoRA (kohya or peft/diffusers layout).
        strength: multiplier of every update.

    Returns:
        The number of modules changed.

    Raises:
        PipelineError: unreadable file, or a module that does not exist / does not match in shape.
    """
    try:
        if is_flux_lora(read_header(path).tensors):
            raise PipelineError(f"{Path(path).name} is a Flux.1 LoRA; this model is {components.backbone.label} "
                                "(it takes SD1.5 / SDXL LoRAs)")
        lora = read_lora(path)
    except WeightsError as e:
        raise PipelineError(str(e)) from None
    targets = {"unet": components.unet, "text_encoder": components.text_encoder}
    if components.text_encoder_2 is not None:
        targets["text_encoder_2"] = components.text_encoder_2
    for m in lora.modules:
        if m.component not in targets:
            raise PipelineError(f"{Path(path).name}: LoRA for {m.component}, which {components.backbone.label} "
                                "does not have (a LoRA for SDXL?)")
        weight = _lora_target(targets[m.component], m.path, Path(path).name)
        delta = (m.up.flatten(1).float() @ m.down.flatten(1).float()) * (m.scale * strength)
        if delta.numel() != weight.numel():
            raise PipelineError(f"{Path(path).name}: {m.component}.{m.path} update has {delta.shape[0]}x"
                                f"{delta.shape[1]} values, the layer {tuple(weight.shape)}")
        with torch.no_grad():
            weight += delta.reshape(weight.shape).to(weight)
    return len(lora.modules)


def _lora_target(root: torch.nn.Module, path: str, fname: str) -> torch.Tensor:
    # transformers >= 5.6 flattened CLIPTextModel: "text_model.encoder..." became "encoder...".
    for candidate in dict.fromkeys((path, path.removeprefix("text_model."))):
        try:
            return root.get_submodule(candidate).weight
        except AttributeError:
            continue
    raise PipelineError(f"{fname}: the LoRA changes '{path}', which this model does not have "
                        "(a LoRA for another base model?)")
