"""The style encoder (Personality-Wise Generator) in the published IP-Adapter layout, SD1.5 and SDXL.

One loader reads both projections of the IP-Adapter releases and the files this project trains (``C`` is the
backbone's context width: 768 on SD1.5, 2048 on SDXL)::

    image_proj.proj.weight [tokens·C, W]        linear projection of CLIP image embeds: "ip-adapter_sd15" and
    image_proj.proj.bias   [tokens·C]           "ip-adapter_sdxl_vit-h" (ViT-H, W=1024), "ip-adapter_sdxl"
    image_proj.norm.weight/bias [C]             (ViT-bigG, W=1280)

    image_proj.latents [1, 16, D]               Resampler over CLIP-vision penultimate hidden states (ViT-H,
    image_proj.proj_in.weight/bias [D, 1280]    width 1280): "ip-adapter-plus_sd15" (D=768, 12 heads) and
    image_proj.proj_out.weight/bias [C, D], image_proj.norm_out.weight/bias   "ip-adapter-plus_sdxl_vit-h"
    image_proj.layers.<d>.0.{norm1,norm2}.weight/bias, .to_q.weight, .to_kv.weight, .to_out.weight  (D=1280,
    image_proj.layers.<d>.1.0.weight/bias (LayerNorm), .1.1.weight, .1.3.weight (feed-forward, no bias)  20 heads)

    ip_adapter.<n>.to_k_ip.weight [hidden_i, C], ip_adapter.<n>.to_v_ip.weight   n = 1, 3, ..., 2·layers − 1

Files trained here add ``productbg.*`` metadata (variant, tokens, CLIP-vision width, family, training).
Every file is checked against the target model (SD1.5: context width 768, 16 layers; SDXL: 2048, 70) before
use; :mod:`.ip_adapters` names the releases and the CLIP vision model each one reads.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..backbones import BACKBONES, Backbone
from .errors import FormatMismatchError, MalformedFileError, WeightsError
from .ip_adapters import (ClipVision, Release, check_clip_vision, clip_vision_problem, clip_vision_widths,
                          release_of, releases_for, required_clip_vision, use_instead)
from .safefile import Header, SafeReader, atomic_save, parse_json_value, read_header, require_float
from ..backbones.targets import SD15, TargetModel, guess_target, target_of

STYLE_KIND = "style_encoder"
SCHEMA_VERSION = 1
META = "productbg."
VARIANTS = ("linear", "plus")
_IP_KEY = re.compile(r"^ip_adapter\.(\d+)\.(to_k_ip|to_v_ip)\.weight$")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
#: The "plus" null reference, in 0..1 RGB: the CLIP mean colour on 8 bits. IP-Adapter Plus was trained and is
#: sampled with zeroed *normalised* CLIP pixels as the empty image (= the mean colour); an 8-bit colour keeps
#: that through ComfyUI's preprocessing (which rounds to 1/255), so trainer, pipeline and ComfyUI agree.
NULL_REFERENCE_RGB = tuple(round(255 * m) / 255 for m in CLIP_MEAN)


@dataclass(frozen=True)
class StyleEncoderConfig:
    """Shape of a style encoder.

    Attributes:
        variant: ``"linear"`` (ip-adapter_sd15: CLIP image embeds -> tokens) or ``"plus"`` (Resampler over
            CLIP-vision penultimate hidden states).
        tokens: number of style tokens (4 linear, 16 plus in the releases).
        clip_width: CLIP-vision feature width the projection reads (1024 image embeds / 1280 hidden states
            for ViT-H).
        context_dim: token width = text-context width of the UNet (768 for SD1.5).
        hidden_sizes: per-layer K/V output widths, IP-Adapter order.
        family: base family of the target, e.g. ``"sd15"``.
        resampler_dim: Resampler latent width (plus only).
        depth: Resampler blocks (plus only).
        heads: Resampler attention heads (plus only).
        dim_head: Resampler head width (plus only; 64 in the releases).
        ff_mult: Resampler feed-forward expansion (plus only).
    """

    variant: str = "linear"
    tokens: int = 4
    clip_width: int = 1024
    context_dim: int = 768
    hidden_sizes: tuple[int, ...] = SD15.hidden_sizes
    family: str = "sd15"
    resampler_dim: int = 768
    depth: int = 4
    heads: int = 12
    dim_head: int = 64
    ff_mult: int = 4

    @classmethod
    def for_target(cls, target: TargetModel = SD15, **kwargs: Any) -> "StyleEncoderConfig":
        """A config whose context width, layers and family are those of ``target``."""
        return cls(context_dim=target.context_dim, hidden_sizes=target.hidden_sizes, family=target.family, **kwargs)

    @property
    def num_layers(self) -> int:
        """Number of cross-attention layers with K/V."""
        return len(self.hidden_sizes)


class LinearProjection(nn.Module):
    """ip-adapter_sd15's projection: ``[B, clip_width]`` image embeds -> ``[B, tokens, context_dim]``."""

    def __init__(self, cfg: StyleEncoderConfig) -> None:
        super().__init__()
        self.tokens, self.context_dim = cfg.tokens, cfg.context_dim
        self.proj = nn.Linear(cfg.clip_width, cfg.tokens * cfg.context_dim)
        self.norm = nn.LayerNorm(cfg.context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """Project image embeds to style tokens."""
        x = self.proj(embeds.to(self.proj.weight.dtype))
        return self.norm(x.reshape(embeds.shape[0], self.tokens, self.context_dim))


class PerceiverAttention(nn.Module):
    """Latents attend to (image features ++ latents); layout of the IP-Adapter Resampler."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, heads * dim_head * 2, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Return the attention update for ``latents`` (residual not added)."""
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(*(self._split(t) for t in (q, k, v)))
        return self.to_out(out.transpose(1, 2).flatten(2))

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """ip-adapter-plus's projection: ``[B, N, clip_width]`` hidden states -> ``[B, tokens, context_dim]``."""

    def __init__(self, cfg: StyleEncoderConfig) -> None:
        super().__init__()
        dim = cfg.resampler_dim
        self.latents = nn.Parameter(torch.empty(1, cfg.tokens, dim))
        nn.init.normal_(self.latents, std=dim**-0.5)
        self.proj_in = nn.Linear(cfg.clip_width, dim)
        self.proj_out = nn.Linear(dim, cfg.context_dim)
        self.norm_out = nn.LayerNorm(cfg.context_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, cfg.heads, cfg.dim_head), _feed_forward(dim, cfg.ff_mult)])
            for _ in range(cfg.depth)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Resample image features to style tokens."""
        x = self.proj_in(hidden.to(self.proj_in.weight.dtype))
        latents = self.latents.expand(hidden.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class StyleEncoder(nn.Module):
    """Projection to style tokens plus one K/V pair per cross-attention layer.

    Args:
        config: the encoder's shape.
        training: provenance saved with trained files (dataset, steps, date, ...).
    """

    def __init__(self, config: StyleEncoderConfig, training: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        _check_config(config)
        self.config = config
        self.training_info: dict[str, Any] = dict(training or {})
        self.image_proj = LinearProjection(config) if config.variant == "linear" else Resampler(config)
        self.to_k_ip = nn.ModuleList(nn.Linear(config.context_dim, h, bias=False) for h in config.hidden_sizes)
        self.to_v_ip = nn.ModuleList(nn.Linear(config.context_dim, h, bias=False) for h in config.hidden_sizes)

    @property
    def num_layers(self) -> int:
        """Number of cross-attention layers."""
        return self.config.num_layers

    def forward(self, clip_features: torch.Tensor) -> torch.Tensor:
        """Style tokens from CLIP-vision features.

        Args:
            clip_features: ``[B, clip_width]`` image embeds (linear) or ``[B, N, clip_width]`` penultimate
                hidden states (plus).

        Returns:
            ``[B, tokens, context_dim]`` style tokens.
        """
        want = 2 if self.config.variant == "linear" else 3
        if clip_features.ndim != want or clip_features.shape[-1] != self.config.clip_width:
            kind = "image embeds [B, W]" if want == 2 else "penultimate hidden states [B, N, W]"
            raise ValueError(f"{self.config.variant} style encoder expects CLIP-vision {kind} with "
                             f"W={self.config.clip_width}, got {tuple(clip_features.shape)}")
        return self.image_proj(clip_features)

    def layer_kv(self, layer_index: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project style tokens with one layer's K/V.

        Matches ``attention.guided.LayerKV``: ``(layer_index, tokens) -> (k, v)``; ``(tokens, layer_index)``
        is accepted too.

        Args:
            layer_index: 0-based cross-attention layer (IP-Adapter order, see ``targets.SD15_LAYERS``).
            tokens: ``[B, T, context_dim]`` style tokens.

        Returns:
            ``(k, v)``, each ``[B, T, hidden_size of that layer]``, on the weights' device and dtype
            (``tokens`` may be anywhere).
        """
        if isinstance(layer_index, torch.Tensor) and isinstance(tokens, int):
            layer_index, tokens = tokens, layer_index
        if not 0 <= layer_index < self.num_layers:
            raise IndexError(f"layer {layer_index} out of range; this encoder has {self.num_layers} layers")
        w = self.to_k_ip[layer_index].weight  # computed where the weights are (ComfyUI moves them, not the tokens)
        x = tokens.to(w.device, w.dtype)
        return self.to_k_ip[layer_index](x), self.to_v_ip[layer_index](x)

    def file_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters under their IP-Adapter file names (``image_proj.*``, ``ip_adapter.<2i+1>.to_k_ip.weight``)."""
        out = {f"image_proj.{k}": v for k, v in self.image_proj.state_dict().items()}
        for i in range(self.num_layers):
            out[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = self.to_k_ip[i].weight
            out[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = self.to_v_ip[i].weight
        return out

    def metadata(self) -> dict[str, str]:
        """Header metadata for files this project writes."""
        c = self.config
        meta = {"format": "pt", META + "kind": STYLE_KIND, META + "schema": str(SCHEMA_VERSION),
                META + "family": c.family, META + "variant": c.variant, META + "tokens": str(c.tokens),
                META + "clip_vision_width": str(c.clip_width), META + "context_dim": str(c.context_dim)}
        if c.variant == "plus":
            meta[META + "heads"] = str(c.heads)
        if self.training_info:
            meta[META + "training"] = json.dumps(self.training_info, ensure_ascii=False, default=str)
        return meta

    def save(self, path: str | os.PathLike, training: Mapping[str, Any] | None = None) -> Path:
        """Write the encoder atomically in the IP-Adapter layout with productbg metadata.

        Args:
            path: destination ``.safetensors``.
            training: provenance to record (replaces ``training_info`` if given).

        Returns:
            The path written.
        """
        if training is not None:
            self.training_info = dict(training)
        return atomic_save(self.file_state_dict(), path, self.metadata())


def _check_config(c: StyleEncoderConfig) -> None:
    if c.variant not in VARIANTS:
        raise WeightsError(f"style encoder variant must be one of {VARIANTS}, got {c.variant!r}")
    sizes = (c.tokens, c.clip_width, c.context_dim, c.resampler_dim, c.depth, c.heads, c.dim_head, c.ff_mult,
             *c.hidden_sizes)
    if not c.hidden_sizes or any(type(s) is not int or s < 1 for s in sizes):
        raise WeightsError(f"style encoder sizes must be positive integers: {c}")


# ---------------------------------------------------------------------- reading files
@dataclass(frozen=True)
class StyleEncoderInfo:
    """What a style-encoder file is, read from its header only.

    Attributes:
        config: the shape inferred from the tensors (and metadata, for our files).
        source: ``"ip-adapter"`` (published layout, no productbg metadata) or ``"productbg"``.
        detected: the model family the file fits, e.g. ``"SD1.5 (context width 768, 16 ...)"``, or a
            description of an unknown one.
        training: provenance from the metadata.
    """

    config: StyleEncoderConfig
    source: str
    detected: str
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def release(self) -> Release | None:
        """The published IP-Adapter release with this layout (family, projection, input width, tokens), if any."""
        return release_of(self.config)

    @property
    def clip_vision(self) -> ClipVision | None:
        """The CLIP vision model whose features this file reads (None for an unknown width)."""
        return required_clip_vision(self.config)

    @property
    def release_name(self) -> str:
        """The IP-Adapter release this layout corresponds to, e.g. ``ip-adapter_sdxl_vit-h layout (linear ...)``."""
        kind = ("linear projection (ip-adapter layout)" if self.config.variant == "linear"
                else "Resampler (ip-adapter-plus layout)")
        release = self.release
        return f"{release.name} layout: {kind}" if release else kind


def is_style_encoder(header: Header) -> bool:
    """Whether a header looks like an IP-Adapter / style-encoder file."""
    names = header.tensors
    return any(k.startswith("image_proj.") for k in names) and any(k.startswith("ip_adapter.") for k in names)


def read_style_encoder_info(path: str | os.PathLike, header: Header | None = None) -> StyleEncoderInfo:
    """Describe a style-encoder file from its header (no tensor data read, no target check).

    Raises:
        WeightsError: not a style encoder, an unsupported IP-Adapter variant, or inconsistent shapes.
    """
    header = header or read_header(path)
    fname = header.path.name
    if not is_style_encoder(header):
        raise FormatMismatchError(f"{fname}: not a style encoder / IP-Adapter file (no 'image_proj.*' and "
                                  "'ip_adapter.*' tensors); run 'productbg weights inspect' to see what it is")
    shapes = {k: v.shape for k, v in header.tensors.items()}
    _reject_unsupported(shapes, fname)
    context_dim, num_layers, hidden = _layer_shapes(shapes, fname)
    known = guess_target(context_dim, num_layers)
    detected = known.describe() if known else f"unknown model (context width {context_dim}, {num_layers} layers)"
    config = _projection_config(shapes, fname, context_dim, hidden, known.family if known else "unknown")
    config, training, source = _apply_metadata(config, header)
    return StyleEncoderInfo(config, source, detected, training)


def _reject_unsupported(shapes: Mapping[str, tuple[int, ...]], fname: str) -> None:
    if "image_proj.proj.0.weight" in shapes or "image_proj.perceiver_resampler.proj_in.weight" in shapes:
        kind = "FaceID" if any("perceiver" in k or "norm.weight" == k[11:] for k in shapes) else "full-face"
        raise FormatMismatchError(f"{fname}: an IP-Adapter {kind} projection; only the linear (ip-adapter_sd15, "
                                  "ip-adapter_sdxl_vit-h, ip-adapter_sdxl) and Resampler (ip-adapter-plus_sd15, "
                                  "ip-adapter-plus_sdxl_vit-h) layouts are supported")
    if any("_lora." in k for k in shapes):
        raise FormatMismatchError(f"{fname}: IP-Adapter with built-in LoRA (FaceID); not supported")
    odd = [k for k in shapes if not (k.startswith("image_proj.") or _IP_KEY.match(k))]
    if odd:
        raise MalformedFileError(f"{fname}: unexpected tensor '{odd[0]}' in a style-encoder file")


def _layer_shapes(shapes: Mapping[str, tuple[int, ...]], fname: str) -> tuple[int, int, tuple[int, ...]]:
    found: dict[int, dict[str, tuple[int, ...]]] = {}
    for k, shape in shapes.items():
        m = _IP_KEY.match(k)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = shape
    want = list(range(1, 2 * len(found) + 1, 2))
    if sorted(found) != want:
        raise MalformedFileError(f"{fname}: ip_adapter layers are numbered {sorted(found)[:8]}...; expected odd "
                                 f"numbers 1, 3, ..., {2 * len(found) - 1}")
    hidden, context = [], set()
    for n in want:
        kv = found[n]
        if set(kv) != {"to_k_ip", "to_v_ip"} or len(kv["to_k_ip"]) != 2 or kv["to_k_ip"] != kv["to_v_ip"]:
            raise MalformedFileError(f"{fname}: ip_adapter.{n} needs 2-D to_k_ip and to_v_ip weights of equal shape")
        hidden.append(kv["to_k_ip"][0])
        context.add(kv["to_k_ip"][1])
    if len(context) != 1:
        raise MalformedFileError(f"{fname}: ip_adapter layers disagree on the context width: {sorted(context)}")
    return context.pop(), len(want), tuple(hidden)


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int, fname: str) -> tuple[int, ...]:
    shape = shapes.get("image_proj." + key)
    if shape is None or len(shape) != ndim:
        raise MalformedFileError(f"{fname}: image_proj.{key} missing or not {ndim}-D")
    return shape


def _projection_config(shapes: Mapping[str, tuple[int, ...]], fname: str, context_dim: int,
                       hidden: tuple[int, ...], family: str) -> StyleEncoderConfig:
    base = dict(context_dim=context_dim, hidden_sizes=hidden, family=family)
    if "image_proj.proj.weight" in shapes:
        out, clip_width = _shape(shapes, "proj.weight", 2, fname)
        if out % context_dim or out == 0:
            raise MalformedFileError(f"{fname}: image_proj.proj.weight has {out} outputs, not a multiple of the "
                                     f"context width {context_dim}")
        return StyleEncoderConfig(variant="linear", tokens=out // context_dim, clip_width=clip_width, **base)
    if "image_proj.latents" in shapes:
        _, tokens, dim = _shape(shapes, "latents", 3, fname)
        clip_width = _shape(shapes, "proj_in.weight", 2, fname)[1]
        depth = len({k.split(".")[2] for k in shapes if k.startswith("image_proj.layers.")})
        inner = _shape(shapes, "layers.0.0.to_q.weight", 2, fname)[0] if depth else dim
        mult = _shape(shapes, "layers.0.1.1.weight", 2, fname)[0] // max(dim, 1) if depth else 4
        heads, dim_head = (inner // 64, 64) if inner % 64 == 0 and inner else (1, max(inner, 1))
        return StyleEncoderConfig(variant="plus", tokens=tokens, clip_width=clip_width, resampler_dim=dim,
                                  depth=depth, heads=heads, dim_head=dim_head, ff_mult=max(mult, 1), **base)
    raise FormatMismatchError(f"{fname}: unknown image projection (neither image_proj.proj.weight nor "
                              "image_proj.latents)")


def _apply_metadata(config: StyleEncoderConfig, header: Header) -> tuple[StyleEncoderConfig, dict[str, Any], str]:
    meta, fname = header.metadata, header.path.name
    if meta.get(META + "kind") != STYLE_KIND:
        return config, {}, "ip-adapter"
    schema = meta.get(META + "schema", "")
    if not schema.isdigit() or not 1 <= int(schema) <= SCHEMA_VERSION:
        raise FormatMismatchError(f"{fname}: style encoder schema {schema!r}; this productbg reads schema "
                                  f"{SCHEMA_VERSION}")
    claims = {"variant": config.variant, "tokens": str(config.tokens), "clip_vision_width": str(config.clip_width),
              "context_dim": str(config.context_dim)}
    if config.family != "unknown":
        claims["family"] = config.family
    for key, actual in claims.items():
        stated = meta.get(META + key)
        if stated is not None and stated != actual:
            raise MalformedFileError(f"{fname}: metadata says {key} = {stated} but the tensors give {actual}")
    if config.family == "unknown" and meta.get(META + "family"):
        config = replace(config, family=meta[META + "family"][:40])
    config = _apply_heads(config, meta.get(META + "heads"), fname)
    return config, _training(meta, fname), "productbg"


def _apply_heads(config: StyleEncoderConfig, heads: str | None, fname: str) -> StyleEncoderConfig:
    if heads is None or config.variant != "plus":
        return config
    inner = config.heads * config.dim_head
    if not heads.isascii() or not heads.isdigit() or not 0 < int(heads) <= inner or inner % int(heads):
        raise MalformedFileError(f"{fname}: metadata heads = {heads!r} does not divide attention width {inner}")
    return replace(config, heads=int(heads), dim_head=inner // int(heads))


def _training(meta: Mapping[str, str], fname: str) -> dict[str, Any]:
    raw = meta.get(META + "training")
    if raw is None:
        return {}
    value = parse_json_value(raw, META + "training", Path(fname))
    if not isinstance(value, dict):
        raise MalformedFileError(f"{fname}: metadata 'training' must be a JSON object")
    return value


def as_target(target: TargetModel | Backbone) -> TargetModel:
    """The :class:`TargetModel` of a target or of an ``backbones`` :class:`Backbone`."""
    return target_of(target) if isinstance(target, Backbone) else target


def detected_model(config: StyleEncoderConfig) -> str:
    """The model family a style-encoder shape fits, described (``"SDXL (context width 2048, 70 ...)"``)."""
    known = guess_target(config.context_dim, config.num_layers)
    return known.describe() if known else (f"unknown model (context width {config.context_dim}, "
                                           f"{config.num_layers} layers)")


def check_target(info: "StyleEncoderInfo | StyleEncoderConfig | StyleEncoder", target: TargetModel | Backbone,
                 fname: str = "style encoder") -> None:
    """Raise FormatMismatchError unless the encoder fits ``target`` (context width, layer count, hidden sizes).

    Args:
        info: a file's :class:`StyleEncoderInfo`, or a loaded encoder / its config (a node checking the
            encoder it was given against the MODEL it patches).
        target: the model (a :class:`TargetModel`, or an ``backbones`` :class:`Backbone`).
        fname: what to call the encoder in the message (its file name).

    Raises:
        FormatMismatchError: one line naming the model the file is for, the target, and what to load instead
            (the published IP-Adapter files of the target's family).
    """
    target = as_target(target)
    c = info.config if isinstance(info, (StyleEncoderInfo, StyleEncoder)) else info
    detected = info.detected if isinstance(info, StyleEncoderInfo) else detected_model(c)
    if (c.context_dim, c.num_layers) != (target.context_dim, target.num_layers):
        fix = f"; {use_instead(target.family, target.label)}" if releases_for(target.family) else ""
        raise FormatMismatchError(f"{fname}: this style encoder / IP-Adapter is made for {detected}, "
                                  f"but the target model is {target.describe()}{fix}")
    layers = BACKBONES[target.family].layers if target.family in BACKBONES else ()
    for i, (got, want) in enumerate(zip(c.hidden_sizes, target.hidden_sizes, strict=True)):
        if got != want:
            where = f" ({layers[i].diffusers_name})" if i < len(layers) else ""
            raise FormatMismatchError(f"{fname}: ip_adapter.{2 * i + 1}.to_k_ip.weight is [{got}, {c.context_dim}] "
                                      f"but {target.label} layer {i}{where} expects [{want}, {target.context_dim}]")


def _auto_target(info: StyleEncoderInfo, fname: str) -> TargetModel:
    if info.config.family in BACKBONES:
        return target_of(BACKBONES[info.config.family])
    supported = " and ".join(b.label for b in BACKBONES.values() if b.style == "ip-adapter")
    examples = ", ".join(releases_for(f)[0].file for f in BACKBONES if releases_for(f))
    raise FormatMismatchError(f"{fname}: this style encoder / IP-Adapter is made for {info.detected}; productbg "
                              f"reads {supported} IP-Adapters (e.g. {examples})")


def load_style_encoder(path: str | os.PathLike, target: TargetModel | Backbone | None = SD15, *,
                       dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> StyleEncoder:
    """Load a published IP-Adapter (SD1.5 or SDXL, linear or plus) or a productbg style encoder.

    Args:
        path: ``.safetensors`` file (``.bin`` IP-Adapter files are refused: pickle).
        target: the model it must fit (default SD1.5; a :class:`Backbone` is accepted). ``None``: whichever
            supported backbone the file's shapes fit (SD1.5 or SDXL) — for a loader that does not see the MODEL
            yet; check the encoder against the MODEL later with :func:`check_target`.
        dtype: cast parameters to this dtype (default: keep the file's).
        device: where to put the module.

    Returns:
        The :class:`StyleEncoder`, in eval mode.

    Raises:
        WeightsError: unsafe, malformed, unsupported, or made for another model.
    """
    header = read_header(path)
    info = read_style_encoder_info(path, header)
    target = _auto_target(info, header.path.name) if target is None else as_target(target)
    check_target(info, target, header.path.name)
    require_float(header)
    config = replace(info.config, family=target.family)
    with torch.device("meta"):
        encoder = StyleEncoder(config, info.training)
    expected = {k: tuple(v.shape) for k, v in encoder.file_state_dict().items()}
    _compare_keys(expected, {k: v.shape for k, v in header.tensors.items()}, header.path.name)
    with SafeReader(header.path, header) as reader:
        tensors = {k: reader.tensor(k) for k in expected}
    _assign(encoder, tensors)
    encoder = encoder.to(device=device, dtype=dtype) if dtype is not None else encoder.to(device)
    return encoder.eval()


def _compare_keys(expected: Mapping[str, tuple[int, ...]], actual: Mapping[str, tuple[int, ...]], fname: str) -> None:
    missing = [k for k in expected if k not in actual]
    extra = [k for k in actual if k not in expected]
    if missing or extra:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise MalformedFileError(f"{fname}: tensors do not form a complete style encoder ({detail})")
    for k, shape in expected.items():
        if tuple(actual[k]) != shape:
            raise MalformedFileError(f"{fname}: {k} has shape {list(actual[k])}, expected {list(shape)}")


def _assign(encoder: StyleEncoder, tensors: Mapping[str, torch.Tensor]) -> None:
    proj = {k[len("image_proj."):]: v for k, v in tensors.items() if k.startswith("image_proj.")}
    encoder.image_proj.load_state_dict(proj, strict=True, assign=True)
    for i in range(encoder.num_layers):
        n = 2 * i + 1
        encoder.to_k_ip[i].load_state_dict({"weight": tensors[f"ip_adapter.{n}.to_k_ip.weight"]}, assign=True)
        encoder.to_v_ip[i].load_state_dict({"weight": tensors[f"ip_adapter.{n}.to_v_ip.weight"]}, assign=True)
    dtypes = {p.dtype for p in encoder.parameters()}
    if len(dtypes) > 1:  # mixed-precision files: settle on the widest
        encoder.to(max(dtypes, key=lambda d: torch.finfo(d).bits))


def save_style_encoder(encoder: StyleEncoder, path: str | os.PathLike,
                       training: Mapping[str, Any] | None = None) -> Path:
    """Write ``encoder`` atomically (IP-Adapter layout + productbg metadata). See :meth:`StyleEncoder.save`."""
    return encoder.save(path, training)


def null_reference(like: torch.Tensor) -> torch.Tensor:
    """IMAGE-layout [B,H,W,3] null reference (0..1) shaped like ``like``, on its device and dtype."""
    rgb = torch.tensor(NULL_REFERENCE_RGB, dtype=like.dtype, device=like.device)
    return rgb.expand(*like.shape[:-1], 3).clone()


def reference_tokens(encoder: StyleEncoder, clip_vision: Any, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) style tokens of reference IMAGEs [B,H,W,C]; uncond = the null reference, as in training.

    The null reference is IP-Adapter's: zero image embeds for ``linear``, the features of the empty image
    (:data:`NULL_REFERENCE_RGB`) for ``plus`` — what ``train-pg`` feeds for a dropped reference.

    Args:
        encoder: the style encoder.
        clip_vision: an object with ComfyUI's ``encode_image(images)`` interface returning ``image_embeds`` and
            ``penultimate_hidden_states`` (ComfyUI's CLIP_VISION, or the pipeline's transformers wrapper).
        reference: the reference images, 0..1.

    Raises:
        ValueError: NaN/inf features, or features of another width than the encoder reads.
    """
    plus = encoder.config.variant == "plus"

    def features(images: torch.Tensor) -> torch.Tensor:
        out = clip_vision.encode_image(images)
        return out["penultimate_hidden_states"] if plus else out["image_embeds"]

    check_clip_vision(encoder.config, *clip_vision_widths(clip_vision))  # before running it, when it says its widths
    cond = features(reference)
    if not torch.isfinite(cond).all():
        raise ValueError("the CLIP vision model returned NaN/inf features for the reference; check the CLIP "
                         "vision file (a damaged or mismatched model)")
    if cond.shape[-1] != encoder.config.clip_width:
        got = {"embed_width" if not plus else "hidden_width": int(cond.shape[-1])}
        raise FormatMismatchError(clip_vision_problem(encoder.config, **got) or "CLIP vision width mismatch")
    uncond = features(null_reference(reference[:1])) if plus else torch.zeros_like(cond[:1])
    with torch.no_grad():
        p = next(encoder.parameters())
        return (encoder(cond.to(p)).float(), encoder(uncond.to(p)).expand(cond.shape[0], -1, -1).float())
