"""Flux Redux outside ComfyUI: a reference image's style tokens, as ComfyUI's Redux path computes them.

ComfyUI (``CLIPVisionLoader`` + ``StyleModelLoader`` + ``StyleModelApply``, or productbg's Reference Style Redux
node) turns a reference into Flux text-space tokens in three steps, mirrored here:

1. ``clip_vision.clip_preprocess(image, 384, mean=std=0.5, crop=True)``: shorter side resized to 384 (bicubic,
   antialiased), centre crop, **rounded to 8 bits**, normalised;
2. SigLIP so400m patch14-384 (``sigclip_vision_patch14_384.safetensors``): ``last_hidden_state`` is the encoder's
   output after ``post_layernorm`` — 729 tokens, 1152 wide (the attention-pooling head is not used);
3. the Redux projector (``flux1-redux-dev.safetensors``): ``redux_down(silu(redux_up(x)))`` → [B, 729, 4096].

The tokens of a batch of references are concatenated into one row (``[1, B·729, 4096]``) and scaled by the
strength, as the node does; :class:`~productbg.attention.joint.ReduxStyle` then keeps them off the product.

The SigLIP config is read from the file's shapes (width, depth, MLP width, image size from the position table —
384 for 27 × 27 patches of 14, as ComfyUI's config says; heads = width / 72, SigLIP's head size). Its layer norms use ComfyUI's epsilon (1e-5, torch's default, which
ComfyUI's ``CLIPEncoder`` uses for SigLIP too) rather than the published 1e-6, so the tokens are those a designer
gets from the same files in ComfyUI.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..weights.errors import WeightsError
from ..weights.safefile import load_all
from .errors import PipelineError
from .quiet import quiet_loading

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
SIGLIP_HEAD_DIM = 72
#: ComfyUI's LayerNorm epsilon for SigLIP (``comfy/clip_model.py`` builds ``operations.LayerNorm(embed_dim)``).
COMFY_LAYER_NORM_EPS = 1e-5
PATCH_KEY = "vision_model.embeddings.patch_embedding.weight"
POSITION_KEY = "vision_model.embeddings.position_embedding.weight"
LAYER_KEY = "vision_model.encoder.layers.{}.layer_norm1.weight"
FC1_KEY = "vision_model.encoder.layers.0.mlp.fc1.weight"
#: SigLIP input sides whose patch grid does not tile them (ComfyUI's ``clip_vision_siglip_*.json``): 384 / 14 → 27.
IMAGE_SIZES = {(27, 14): 384, (32, 16): 512}
REDUX_KEYS = ("redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias")
PASS_REDUX = "pass Flux Redux's files: --style-model flux1-redux-dev.safetensors --clip-vision " \
             "sigclip_vision_patch14_384.safetensors"


def clip_preprocess(images: torch.Tensor, size: int, mean: tuple[float, ...] = SIGLIP_MEAN,
                    std: tuple[float, ...] = SIGLIP_STD) -> torch.Tensor:
    """ComfyUI's ``clip_preprocess`` with ``crop=True``: ``[B, H, W, C]`` in 0..1 → ``[B, 3, size, size]`` float32.

    The shorter side is resized to ``size`` (bicubic, antialiased), the centre cropped, the pixels rounded to 8
    bits and normalised with ``mean`` / ``std``.
    """
    x = images[..., :3].movedim(-1, 1).float()
    if x.shape[-2:] != (size, size):
        scale = size / min(x.shape[-2], x.shape[-1])
        x = F.interpolate(x, size=(round(scale * x.shape[-2]), round(scale * x.shape[-1])), mode="bicubic",
                          antialias=True)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size]
    x = torch.clip(255.0 * x, 0, 255).round() / 255.0
    m = torch.tensor(mean, device=x.device, dtype=x.dtype)[:, None, None]
    s = torch.tensor(std, device=x.device, dtype=x.dtype)[:, None, None]
    return (x - m) / s


class ReduxProjector(torch.nn.Module):
    """Flux Redux's image-to-text projector: ``redux_down(silu(redux_up(x)))``."""

    def __init__(self, vision_width: int, text_width: int) -> None:
        super().__init__()
        self.redux_up = torch.nn.Linear(vision_width, 3 * text_width)
        self.redux_down = torch.nn.Linear(3 * text_width, text_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.redux_down(F.silu(self.redux_up(x)))


@dataclass
class ReduxEncoder:
    """SigLIP + the Redux projector: reference images → Flux text-space style tokens.

    Attributes:
        vision: a transformers ``SiglipVisionModel``.
        projector: the :class:`ReduxProjector`.
        size: SigLIP's input side (384).
    """

    vision: Any
    projector: ReduxProjector
    size: int

    @property
    def device(self) -> torch.device:
        return next(self.projector.parameters()).device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "ReduxEncoder":
        """Move both models (in place) and return self."""
        self.vision.to(device=device, dtype=dtype)
        self.projector.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def tokens(self, images: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """The style tokens of ``[B, H, W, 3]`` references in 0..1: ``[1, B·N, text width]`` float32, scaled by
        ``strength`` (the tokens of every reference in one row, as Reference Style Redux appends them)."""
        if images.ndim != 4 or images.shape[-1] < 3:
            raise PipelineError(f"a reference must be [B, H, W, 3] RGB; got shape {list(images.shape)}")
        p = next(self.projector.parameters())
        pixels = clip_preprocess(images.to(p.device), self.size).to(next(self.vision.parameters()).dtype)
        hidden = self.vision(pixel_values=pixels).last_hidden_state
        out = self.projector(hidden.to(p.dtype)).float()
        return out.flatten(0, 1)[None] * strength


def _siglip_config(tensors: dict[str, torch.Tensor], name: str):
    # optional dependency: transformers
    from transformers import SiglipVisionConfig

    patch, pos, fc1 = (tensors.get(k) for k in (PATCH_KEY, POSITION_KEY, FC1_KEY))
    if patch is None or pos is None or fc1 is None or patch.ndim != 4:
        if any(k.startswith("vision_model.embeddings.class_embedding") for k in tensors):
            raise PipelineError(f"{name}: this is a CLIP vision model (IP-Adapter's), not Redux's SigLIP; {PASS_REDUX}")
        raise PipelineError(f"{name}: not a SigLIP vision model in the transformers layout; {PASS_REDUX}")
    width, patch_size, grid = int(patch.shape[0]), int(patch.shape[-1]), round(pos.shape[0] ** 0.5)
    if grid * grid != pos.shape[0] or width % SIGLIP_HEAD_DIM:
        raise PipelineError(f"{name}: a SigLIP with {pos.shape[0]} positions and width {width}; Redux reads "
                            f"so400m patch14-384 (729 positions, 1152 wide); {PASS_REDUX}")
    depth = 0
    while LAYER_KEY.format(depth) in tensors:
        depth += 1
    return SiglipVisionConfig(hidden_size=width, intermediate_size=int(fc1.shape[0]), num_hidden_layers=depth,
                              num_attention_heads=width // SIGLIP_HEAD_DIM, num_channels=int(patch.shape[1]),
                              image_size=IMAGE_SIZES.get((grid, patch_size), grid * patch_size), patch_size=patch_size, hidden_act="gelu_pytorch_tanh",
                              layer_norm_eps=COMFY_LAYER_NORM_EPS)


def _read(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"{what} {p}: no such file; {PASS_REDUX}")
    try:
        return load_all(p)[0]
    except WeightsError as e:
        raise PipelineError(f"{what} {p.name}: {e}") from None


def load_siglip(path: str | os.PathLike) -> Any:
    """Redux's SigLIP vision tower from a ``.safetensors`` file in the transformers layout (ComfyUI's
    ``models/clip_vision/sigclip_vision_patch14_384.safetensors``), its config read from the shapes.

    Raises:
        PipelineError: missing, unsafe or malformed file, or not a SigLIP (one line saying what to pass).
    """
    # optional dependency: transformers
    from transformers import SiglipVisionModel

    tensors = {k.removeprefix("clip_vision."): v for k, v in _read(path, "CLIP vision").items()}
    config = _siglip_config(tensors, Path(path).name)
    if not config.num_hidden_layers:
        raise PipelineError(f"{Path(path).name}: a SigLIP without encoder layers; {PASS_REDUX}")
    tensors = {k: v for k, v in tensors.items() if not k.startswith("vision_model.head.")}
    config.vision_use_head = False  # ComfyUI does not use SigLIP's pooling head, and Redux reads every token
    with torch.device("meta"), quiet_loading():
        model = SiglipVisionModel(config)
    if not any(k.startswith("vision_model.") for k in model.state_dict()):  # transformers 5 dropped the prefix
        tensors = {k.removeprefix("vision_model."): v for k, v in tensors.items()}
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:
        raise PipelineError(f"{Path(path).name}: not a SigLIP vision file ({str(e).splitlines()[0][:200]}); "
                            f"{PASS_REDUX}") from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise PipelineError(f"{Path(path).name}: a SigLIP file with {len(missing)} missing and {len(unexpected)} "
                            f"unexpected tensors (e.g. {(missing or unexpected)[0]}); {PASS_REDUX}")
    for name, buffer in model.named_buffers():
        if buffer.is_meta:  # position_ids: not in the file
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner).register_buffer(
                attr, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
    return model.float().eval()


def load_redux_projector(path: str | os.PathLike, vision_width: int | None = None) -> ReduxProjector:
    """The Redux projector from ``flux1-redux-dev.safetensors`` (ComfyUI's ``models/style_models``).

    Raises:
        PipelineError: missing or unsafe file, another style model (T2I style adapter …), or a width mismatch.
    """
    tensors = _read(path, "style model")
    name = Path(path).name
    if any(k not in tensors for k in REDUX_KEYS):
        other = " (a T2I-Adapter style model, SD1.5's)" if "style_embedding" in tensors else ""
        raise PipelineError(f"{name}: not a Flux Redux style model{other}; {PASS_REDUX}")
    up, down = tensors["redux_up.weight"], tensors["redux_down.weight"]
    text = int(down.shape[0])
    if up.shape[0] != 3 * text or down.shape[1] != up.shape[0]:
        raise PipelineError(f"{name}: Redux weights of shapes {list(up.shape)} and {list(down.shape)} do not chain")
    if vision_width is not None and up.shape[1] != vision_width:
        raise PipelineError(f"{name}: this Redux reads {up.shape[1]}-wide SigLIP tokens but the CLIP vision file "
                            f"gives {vision_width}; {PASS_REDUX}")
    projector = ReduxProjector(int(up.shape[1]), text)
    projector.load_state_dict({k: tensors[k].float() for k in REDUX_KEYS})
    return projector.eval()


def load_redux(style_model: str | os.PathLike, clip_vision: str | os.PathLike) -> ReduxEncoder:
    """Flux Redux from ComfyUI's two files: the style model and its SigLIP (float32 on the CPU; move it with
    :meth:`ReduxEncoder.to`)."""
    vision = load_siglip(clip_vision)
    projector = load_redux_projector(style_model, int(vision.config.hidden_size))
    return ReduxEncoder(vision, projector, int(vision.config.image_size))
