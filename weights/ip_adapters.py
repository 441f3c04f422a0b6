"""The published IP-Adapter files and the CLIP vision models they read, as data; and the checks that name them.

Every published IP-Adapter is one of two projections (``linear`` over CLIP image embeds, ``plus`` = Resampler
over CLIP-vision penultimate hidden states) followed by per-layer K/V for one backbone. The shapes alone tell
the releases apart::

    release                          backbone  projection  reads                                   tokens
    ip-adapter_sd15                  SD1.5     linear      ViT-H image embeds (1024)               4
    ip-adapter_sd15_vit-G            SD1.5     linear      ViT-bigG image embeds (1280)            4
    ip-adapter-plus_sd15             SD1.5     plus        ViT-H penultimate hidden states (1280)  16
    ip-adapter_sdxl_vit-h            SDXL      linear      ViT-H image embeds (1024)               4
    ip-adapter_sdxl                  SDXL      linear      ViT-bigG image embeds (1280)            4
    ip-adapter-plus_sdxl_vit-h       SDXL      plus        ViT-H penultimate hidden states (1280)  16

(``-light`` and ``-face`` files share a layout with the release above them and load the same way.)

Nothing here imports torch: a style-encoder config is read through its attributes (``variant``,
``clip_width``, ``tokens``, ``context_dim``, ``hidden_sizes``), so the nodes and the pipeline can call the
checks with whatever they hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import FormatMismatchError


@dataclass(frozen=True)
class ClipVision:
    """One CLIP vision model an IP-Adapter reads.

    Attributes:
        name: short name used in messages (``ViT-H``).
        embed_width: width of its projected ``image_embeds`` (the ``linear`` projection's input).
        hidden_width: width of its penultimate hidden states (the ``plus`` Resampler's input).
        comfy_file: the file to load in ComfyUI's Load CLIP Vision (``models/clip_vision``).
        hub_name: the original (OpenCLIP / LAION) name of the weights.
    """

    name: str
    embed_width: int
    hidden_width: int
    comfy_file: str
    hub_name: str

    def width(self, variant: str) -> int:
        """The feature width a projection of ``variant`` reads from this model."""
        return self.embed_width if variant == "linear" else self.hidden_width

    @property
    def file_hint(self) -> str:
        """E.g. ``clip_vision_g.safetensors (CLIP-ViT-bigG-14-laion2B-39B-b160k)``."""
        return f"{self.comfy_file} ({self.hub_name})"


VIT_L = ClipVision("ViT-L", 768, 1024, "clip_vision_l.safetensors", "clip-vit-large-patch14")
VIT_H = ClipVision("ViT-H", 1024, 1280, "clip_vision_h.safetensors", "CLIP-ViT-H-14-laion2B-s32B-b79K")
VIT_BIGG = ClipVision("ViT-bigG", 1280, 1664, "clip_vision_g.safetensors", "CLIP-ViT-bigG-14-laion2B-39B-b160k")
CLIP_VISIONS: tuple[ClipVision, ...] = (VIT_H, VIT_BIGG, VIT_L)


@dataclass(frozen=True)
class Release:
    """One published IP-Adapter layout.

    Attributes:
        name: file stem as published (``ip-adapter_sdxl_vit-h``).
        family: backbone family (``sd15``, ``sdxl``).
        variant: ``linear`` or ``plus``.
        clip_vision: the CLIP vision model it reads.
        tokens: style tokens it makes.
    """

    name: str
    family: str
    variant: str
    clip_vision: ClipVision
    tokens: int

    @property
    def file(self) -> str:
        return f"{self.name}.safetensors"


RELEASES: tuple[Release, ...] = (
    Release("ip-adapter_sd15", "sd15", "linear", VIT_H, 4),
    Release("ip-adapter-plus_sd15", "sd15", "plus", VIT_H, 16),
    Release("ip-adapter_sd15_vit-G", "sd15", "linear", VIT_BIGG, 4),
    Release("ip-adapter_sdxl_vit-h", "sdxl", "linear", VIT_H, 4),
    Release("ip-adapter-plus_sdxl_vit-h", "sdxl", "plus", VIT_H, 16),
    Release("ip-adapter_sdxl", "sdxl", "linear", VIT_BIGG, 4),
)

_FEATURES = {"linear": "image embeds", "plus": "penultimate hidden states"}


def features_name(variant: str) -> str:
    """What a projection reads: ``image embeds`` (linear) or ``penultimate hidden states`` (plus)."""
    return _FEATURES.get(variant, "features")


def releases_for(family: str) -> tuple[Release, ...]:
    """The published releases made for a backbone family, in the order we recommend them."""
    return tuple(r for r in RELEASES if r.family == family)


def release_of(config: Any) -> Release | None:
    """The published release whose layout ``config`` has (family, projection, input width, tokens), if any."""
    for r in RELEASES:
        if (r.family, r.variant, r.clip_vision.width(r.variant), r.tokens) == (
                config.family, config.variant, config.clip_width, config.tokens):
            return r
    return None


def required_clip_vision(config: Any) -> ClipVision | None:
    """The known CLIP vision model whose features a style encoder reads (None for an unknown width).

    A ``linear`` projection of width 1024 reads ViT-H image embeds, 1280 ViT-bigG's; a ``plus`` Resampler of
    width 1280 reads ViT-H hidden states, 1664 ViT-bigG's (and 768 / 1024 ViT-L's).
    """
    for cv in CLIP_VISIONS:
        if cv.width(config.variant) == config.clip_width:
            return cv
    return None


def identify_clip_vision(embed_width: int | None = None, hidden_width: int | None = None) -> ClipVision | None:
    """The known CLIP vision model with these widths (either may be unknown), if exactly one fits."""
    fits = [cv for cv in CLIP_VISIONS if (embed_width is None or cv.embed_width == embed_width)
            and (hidden_width is None or cv.hidden_width == hidden_width)]
    return fits[0] if len(fits) == 1 and (embed_width, hidden_width) != (None, None) else None


def clip_vision_problem(config: Any, embed_width: int | None = None, hidden_width: int | None = None) -> str | None:
    """Why a CLIP vision model with these widths cannot feed this style encoder (one line), or None if it can.

    Args:
        config: the style encoder's config (``variant``, ``clip_width``).
        embed_width: the CLIP vision's ``image_embeds`` width (its projection dim), if known.
        hidden_width: its hidden-state width (``hidden_size``), if known.

    Returns:
        E.g. ``"this IP-Adapter reads CLIP ViT-bigG image embeds (1280); the connected CLIP vision is ViT-H
        (1024): load clip_vision_g.safetensors (CLIP-ViT-bigG-14-laion2B-39B-b160k)"``; None when the width the
        encoder reads matches (or is not given).
    """
    got = embed_width if config.variant == "linear" else hidden_width
    if got is None or got == config.clip_width:
        return None
    feats = features_name(config.variant)
    need = required_clip_vision(config)
    have = identify_clip_vision(embed_width, hidden_width)
    reads = f"CLIP {need.name} {feats}" if need else f"CLIP-vision {feats}"
    connected = f"is {have.name} ({got})" if have else f"gives {got}-wide {feats}"
    fix = f"load {need.file_hint}" if need else f"load the CLIP vision model with {config.clip_width}-wide {feats}"
    return f"this IP-Adapter reads {reads} ({config.clip_width}); the connected CLIP vision {connected}: {fix}"


def check_clip_vision(config: Any, embed_width: int | None = None, hidden_width: int | None = None) -> None:
    """Raise :class:`FormatMismatchError` with :func:`clip_vision_problem`'s message when the widths do not fit.

    Call it with the connected CLIP vision's widths before encoding a reference; :func:`clip_vision_widths`
    reads them from ComfyUI's CLIP_VISION or transformers' ``CLIPVisionModelWithProjection``.

    Args:
        config: the style encoder's config (``encoder.config``) or a :class:`StyleEncoderInfo`'s config.
        embed_width: the CLIP vision's image-embed width (``projection_dim``).
        hidden_width: the CLIP vision's hidden width (``hidden_size``).
    """
    problem = clip_vision_problem(config, embed_width, hidden_width)
    if problem:
        raise FormatMismatchError(problem)


def clip_vision_widths(clip_vision: Any) -> tuple[int | None, int | None]:
    """``(image-embed width, hidden width)`` of a CLIP vision model, from its weights' shapes or its config.

    Reads ComfyUI's CLIP_VISION (``clip_vision.model.visual_projection.weight`` is ``[projection_dim,
    hidden_size]``) and transformers' ``CLIPVisionModelWithProjection`` (``config.projection_dim`` /
    ``config.hidden_size``), or any object with either; ``(None, None)`` when neither is found.
    """
    for owner in (getattr(clip_vision, "model", None), clip_vision):
        weight = getattr(getattr(owner, "visual_projection", None), "weight", None)
        shape = getattr(weight, "shape", None)
        if shape is not None and len(shape) == 2:
            return int(shape[0]), int(shape[1])
        config = getattr(owner, "config", None)
        if config is not None and getattr(config, "hidden_size", None) is not None:
            embed = getattr(config, "projection_dim", None)
            return (int(embed) if embed is not None else None), int(config.hidden_size)
    return None, None


def use_instead(family: str, label: str) -> str:
    """``"use ip-adapter_sdxl_vit-h.safetensors, ..."`` — what to load for a backbone family (one clause)."""
    names = [r.file for r in releases_for(family)]
    if not names:
        return f"use an IP-Adapter made for {label}"
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return f"use an {label} IP-Adapter ({listed})"
