"""The base models productbg patches, as data: one :class:`Backbone` per family.

Everything that depends on the base model reads it from here — the attention adapters (which cross-attention
layers exist and the ComfyUI keys they sit at), the weight formats (text encoders and their widths, the
IP-Adapter layer order), the nodes (what a MODEL or CLIP is, what to refuse, style-layer presets) and the
diffusers pipeline (default canvas, sampler defaults). Adding a backbone is a new entry in :data:`BACKBONES`,
not a branch in every module. Pure data and small pure functions: no torch, ComfyUI or diffusers import.

Layer order is the IP-Adapter / diffusers ``unet.attn_processors`` order — down blocks, up blocks, mid block,
and inside a block its attentions and their transformer blocks in order — so layer ``i`` is IP-Adapter file
index ``2i + 1`` (the original code numbered *all* processors, self-attention at even positions).

ComfyUI keys: single-transformer blocks (SD1.5) are ``(block, number)``; blocks with several transformer blocks
(SDXL) are ``(block, number, transformer index)`` — the key ComfyUI looks up first (``block_index`` of
``extra_options``), and the one ComfyUI_IPAdapter_plus uses on SDXL.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

ComfyKey = tuple  # ("input", 4) or ("input", 4, 1)


class BackboneError(ValueError):
    """A model of a family productbg does not support (the message names the family and what to use)."""


@dataclass(frozen=True)
class CrossAttnLayer:
    """One cross-attention layer (one transformer block's ``attn2``) of a UNet.

    Attributes:
        index: position among the cross-attention layers (0-based, IP-Adapter order).
        file_index: ``n`` in IP-Adapter keys ``ip_adapter.<n>.to_k_ip.weight`` (= 2·index + 1).
        diffusers_name: module path, e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn2``.
        comfy_key: ComfyUI ``patches_replace["attn2"]`` key, ``("input", 1)`` or ``("input", 4, 1)``.
        hidden_size: the layer's query width (output width of its K/V projections).
    """

    index: int
    file_index: int
    diffusers_name: str
    comfy_key: ComfyKey
    hidden_size: int

    @property
    def attention(self) -> str:
        """The diffusers attention module holding this layer, e.g. ``up_blocks.0.attentions.1``."""
        return self.diffusers_name.split(".transformer_blocks.")[0]


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a backbone.

    Attributes:
        name: the name its vectors take in embedding / bank files (``clip_l``, ``clip_g``).
        comfy_key: its key in ComfyUI's ``clip.tokenize`` output (``l``, ``g``).
        width: hidden width (the slice of the cross-attention context it fills, in order).
        layer: hidden layer the UNet reads (-1 last, -2 penultimate).
        pooled: whether its pooled, projected output conditions the UNet (SDXL's ``text_embeds``).
    """

    name: str
    comfy_key: str
    width: int
    layer: int = -1
    pooled: bool = False


@dataclass(frozen=True)
class SamplerDefaults:
    """What the workflows and the pipeline use unless told otherwise."""

    steps: int
    cfg: float
    sampler_name: str
    scheduler: str


@dataclass(frozen=True)
class Backbone:
    """Everything productbg needs to know about one base-model family.

    Attributes:
        family: short name used in files and options (``sd15``, ``sdxl``).
        label: human name used in messages (``SD1.5``).
        layers: the cross-attention layers, IP-Adapter order.
        text_encoders: in the order their widths are concatenated into the cross-attention context.
        default_size: the side of the trained square canvas, in pixels.
        sampler: default sampling settings.
        presets: reference-style layer presets, name -> layer indices the style acts in (others get weight 0).
        comfy_configs: ComfyUI ``supported_models`` class names of this family.
        canvases: named aspect ratios at the trained pixel count, ``"4:5" -> (width, height)``.
    """

    family: str
    label: str
    layers: tuple[CrossAttnLayer, ...]
    text_encoders: tuple[TextEncoder, ...]
    default_size: int
    sampler: SamplerDefaults
    presets: Mapping[str, frozenset[int]]
    comfy_configs: frozenset[str]
    canvases: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def context_dim(self) -> int:
        """Width of the cross-attention context (the text encoders' widths, concatenated)."""
        return sum(t.width for t in self.text_encoders)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_keys(self) -> tuple[ComfyKey, ...]:
        """ComfyUI attn2 keys, layer order."""
        return tuple(layer.comfy_key for layer in self.layers)

    @property
    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(layer.hidden_size for layer in self.layers)

    @property
    def encoder_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.text_encoders)

    def encoder(self, name: str) -> TextEncoder:
        for t in self.text_encoders:
            if t.name == name:
                return t
        raise KeyError(f"{self.label} has no text encoder {name!r} (it has {', '.join(self.encoder_names)})")

    def layer_weights(self, preset: str) -> tuple[float, ...]:
        """Per-layer style weights of a preset (1 in its layers, 0 elsewhere)."""
        if preset not in self.presets:
            raise KeyError(f"style layer preset must be one of {', '.join(self.presets)}, got {preset!r}")
        chosen = self.presets[preset]
        return tuple(1.0 if layer.index in chosen else 0.0 for layer in self.layers)

    def describe(self) -> str:
        """E.g. ``"SD1.5 (context width 768, 16 cross-attention layers)"``."""
        return f"{self.label} (context width {self.context_dim}, {self.num_layers} cross-attention layers)"


# ---------------------------------------------------------------------- the UNet structures
def _layers(down: list[tuple[int, int, int, int]], up: list[tuple[int, int, int, int]],
            mid: tuple[int, int], comfy_index: bool) -> tuple[CrossAttnLayer, ...]:
    """Cross-attention layers from per-block specs.

    ``down`` / ``up`` entries are ``(diffusers block, attentions, transformer depth, width)``; ComfyUI numbers
    input blocks ``1 + 3·block + attention`` and output blocks ``3·block + attention``. ``mid`` is
    ``(transformer depth, width)``. ``comfy_index``: key by transformer index too (3-tuples).
    """
    specs: list[tuple[str, ComfyKey, int]] = []

    def add(path: str, key: tuple[str, int], depth: int, width: int) -> None:
        for t in range(depth):
            specs.append((f"{path}.transformer_blocks.{t}.attn2", (*key, t) if comfy_index else key, width))

    for block, attentions, depth, width in down:
        for a in range(attentions):
            add(f"down_blocks.{block}.attentions.{a}", ("input", 1 + 3 * block + a), depth, width)
    for block, attentions, depth, width in up:
        for a in range(attentions):
            add(f"up_blocks.{block}.attentions.{a}", ("output", 3 * block + a), depth, width)
    add("mid_block.attentions.0", ("middle", 0), *mid)
    return tuple(CrossAttnLayer(i, 2 * i + 1, name, key, width) for i, (name, key, width) in enumerate(specs))


def _indices(layers: tuple[CrossAttnLayer, ...], *prefixes: str) -> frozenset[int]:
    return frozenset(layer.index for layer in layers if layer.diffusers_name.startswith(prefixes))


_SD15_LAYERS = _layers(down=[(0, 2, 1, 320), (1, 2, 1, 640), (2, 2, 1, 1280)],
                       up=[(1, 3, 1, 1280), (2, 3, 1, 640), (3, 3, 1, 320)], mid=(1, 1280), comfy_index=False)
# SDXL: no attention at the largest level; depth 2 at 640 wide, 10 at 1280 wide (the 70 layers of the base).
_SDXL_LAYERS = _layers(down=[(1, 2, 2, 640), (2, 2, 10, 1280)],
                       up=[(0, 3, 10, 1280), (1, 3, 2, 640)], mid=(10, 1280), comfy_index=True)


def _canvases(pixels: int, multiple: int, ratios: tuple[tuple[int, int], ...]) -> dict[str, tuple[int, int]]:
    """Named aspect ratios at about ``pixels`` pixels, sides rounded to ``multiple`` (fine enough that 4:5 and
    3:4 stay apart; the UNets round odd grids up, which the attention's grid rule follows)."""
    out = {}
    for w, h in ratios:
        scale = (pixels / (w * h)) ** 0.5
        out[f"{w}:{h}"] = (round(w * scale / multiple) * multiple, round(h * scale / multiple) * multiple)
    return out


_RATIOS = ((1, 1), (4, 5), (3, 4), (2, 3), (16, 9), (9, 16), (5, 4), (4, 3), (3, 2))

SD15 = Backbone(
    family="sd15", label="SD1.5", layers=_SD15_LAYERS,
    text_encoders=(TextEncoder("clip_l", "l", 768),),
    default_size=512,
    # The paper's recipe.
    sampler=SamplerDefaults(steps=40, cfg=7.5, sampler_name="ddim", scheduler="ddim_uniform"),
    # Our reading: input blocks + middle shape the layout, output blocks the texture and colour.
    presets={"all": frozenset(range(len(_SD15_LAYERS))),
             "style": _indices(_SD15_LAYERS, "up_blocks."),
             "composition": _indices(_SD15_LAYERS, "down_blocks.", "mid_block.")},
    comfy_configs=frozenset({"SD15"}),
    canvases=_canvases(512 * 512, 16, _RATIOS),
)

SDXL = Backbone(
    family="sdxl", label="SDXL", layers=_SDXL_LAYERS,
    text_encoders=(TextEncoder("clip_l", "l", 768, layer=-2), TextEncoder("clip_g", "g", 1280, layer=-2, pooled=True)),
    default_size=1024,
    # SDXL's usual community settings: fewer steps than the paper's DDIM 40 with a second-order sampler, and
    # a lower CFG (SDXL over-saturates at 7.5).
    sampler=SamplerDefaults(steps=30, cfg=6.0, sampler_name="dpmpp_2m", scheduler="karras"),
    # Our reading of InstantStyle (Wang et al. 2024): SDXL's style lives in up_blocks.0.attentions.1, its
    # layout in down_blocks.2.attentions.1; "all" is every layer, as on SD1.5.
    presets={"all": frozenset(range(len(_SDXL_LAYERS))),
             "style": _indices(_SDXL_LAYERS, "up_blocks.0.attentions.1."),
             "composition": _indices(_SDXL_LAYERS, "down_blocks.2.attentions.1.")},
    comfy_configs=frozenset({"SDXL"}),
    canvases=_canvases(1024 * 1024, 32, _RATIOS),
)

BACKBONES: dict[str, Backbone] = {b.family: b for b in (SD15, SDXL)}

#: Families we recognise but do not support: ComfyUI config class (or family key) -> what to tell the user.
_UNSUPPORTED: dict[str, str] = {
    "SD20": "SD2.x", "SD21UnclipL": "SD2.1 unCLIP", "SD21UnclipH": "SD2.1 unCLIP", "SD_X4Upscaler": "SD x4 upscaler",
    "SDXLRefiner": "an SDXL refiner (it has no CLIP-L text encoder, so neither Category Prompt nor its "
                   "identifier fit; use an SDXL base or SDXL-inpainting checkpoint)",
    "SSD1B": "SSD-1B (a distilled SDXL with other cross-attention layers)",
    "Segmind_Vega": "Segmind Vega (a distilled SDXL with other cross-attention layers)",
    "KOALA_700M": "KOALA (a distilled SDXL)", "KOALA_1B": "KOALA (a distilled SDXL)",
    "SD15_instructpix2pix": "SD1.5 InstructPix2Pix", "SDXL_instructpix2pix": "SDXL InstructPix2Pix",
    "SD3": "SD3", "Flux": "Flux", "FluxInpaint": "Flux", "FluxSchnell": "Flux", "Chroma": "Chroma (Flux-based)",
    "AuraFlow": "AuraFlow", "PixArtAlpha": "PixArt", "PixArtSigma": "PixArt", "HunyuanDiT": "HunyuanDiT",
    "HunyuanDiT1": "HunyuanDiT", "Lumina2": "Lumina 2", "HiDream": "HiDream", "QwenImage": "Qwen-Image",
    "Stable_Cascade_C": "Stable Cascade", "Stable_Cascade_B": "Stable Cascade",
}

SUPPORTED = "SD1.5, SDXL and their inpainting checkpoints (and fine-tunes of them)"


def unsupported(name: str) -> BackboneError:
    """The error for a model of family ``name`` (a ComfyUI config class or a plain description)."""
    what = _UNSUPPORTED.get(name, name)
    return BackboneError(f"this is {'' if what.startswith(('an ', 'a ')) else 'a '}{what} model; productbg "
                         f"supports {SUPPORTED}")


def backbone(family: str) -> Backbone:
    """The backbone of a family name (``sd15``, ``sdxl``)."""
    if family not in BACKBONES:
        raise BackboneError(f"unknown backbone {family!r}; productbg supports {', '.join(BACKBONES)}")
    return BACKBONES[family]


def from_comfy_config(config_name: str, unet_config: Mapping) -> Backbone:
    """The backbone of a ComfyUI model, from its ``model_config`` class name and ``unet_config``.

    Raises:
        BackboneError: another family (named), or a fine-tune whose cross-attention layers differ.
    """
    for b in BACKBONES.values():
        if config_name in b.comfy_configs:
            _check_comfy_structure(b, unet_config)
            return b
    raise unsupported(config_name if config_name in _UNSUPPORTED else
                      f"{config_name} (text context {unet_config.get('context_dim')})")


def _check_comfy_structure(b: Backbone, unet_config: Mapping) -> None:
    context, channels = unet_config.get("context_dim"), unet_config.get("model_channels")
    if context != b.context_dim or channels != 320:
        raise BackboneError(f"this {b.label}-class model has text context {context} and {channels} channels; "
                            f"{b.describe()} has {b.context_dim} and 320: its cross-attention layers differ")
    depth = unet_config.get("transformer_depth")
    if depth is not None:
        layers = sum(depth) + sum(unet_config.get("transformer_depth_output") or depth) + \
            int(unet_config.get("transformer_depth_middle") or 0)
        if b.family == "sdxl" and layers != b.num_layers:
            raise BackboneError(f"this SDXL-class model has {layers} cross-attention layers, not {b.num_layers}: "
                                "a distilled SDXL (SSD-1B, Vega...) is not supported")


def from_token_keys(keys) -> Backbone:
    """The backbone of a ComfyUI CLIP from the keys of its ``clip.tokenize`` output (``l``; ``g`` and ``l``)."""
    keys = set(keys)
    for b in BACKBONES.values():
        if keys == {t.comfy_key for t in b.text_encoders}:
            return b
    if keys == {"g"}:
        raise unsupported("SDXLRefiner")
    named = {"t5xxl": "SD3 or Flux", "h": "SD2.x"}
    for k, what in named.items():
        if k in keys:
            raise unsupported(f"{what} (text encoders {', '.join(sorted(keys))})")
    raise unsupported(f"model with text encoders {', '.join(sorted(keys))}")


def from_context(context_dim: int, num_layers: int) -> Backbone | None:
    """The backbone with this cross-attention context width and layer count, if any (file detection)."""
    for b in BACKBONES.values():
        if (b.context_dim, b.num_layers) == (context_dim, num_layers):
            return b
    return None
