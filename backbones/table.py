"""The base models productbg patches, as data: one :class:`Backbone` per family, UNets and diffusion transformers.

Everything that depends on the base model reads it from here — the attention adapters (which cross-attention
layers exist and the ComfyUI keys they sit at), the weight formats (text encoders and their widths, the
IP-Adapter layer order), the nodes (what a MODEL or CLIP is, what to refuse, style-layer presets) and the
diffusers pipeline (default canvas, sampler defaults, latent format), single-file detection (the key prefixes
that tell a family) and the one canvas table (:func:`canvas`). Adding a backbone is a new entry in
:data:`BACKBONES`, not a branch in every module; ``adapters`` says where productbg can already run it (a family
in the table without an adapter for a host is detected by name and refused there). Pure data and small pure
functions: no torch, ComfyUI or diffusers import.

Layers are addressed by host kind: a UNet's cross-attention layers (:class:`CrossAttnLayer`, below); a DiT's
double-stream and single-stream blocks (:class:`DitBlock`), where image tokens attend jointly to the text tokens
and the image, keyed as ComfyUI's ``patches_replace["dit"]`` keys them (``("double_block", i)``).

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
class DitBlock:
    """One joint-attention block of a diffusion transformer.

    Attributes:
        index: position among all the model's blocks (double-stream first, then single-stream).
        kind: ``"double"`` (separate text and image streams, joint attention) or ``"single"`` (one sequence).
        number: the block's number among blocks of its kind.
        diffusers_name: module path, e.g. ``transformer_blocks.3`` / ``single_transformer_blocks.0``.
        comfy_key: ComfyUI ``patches_replace["dit"]`` key, ``("double_block", 3)`` / ``("single_block", 0)``.
    """

    index: int
    kind: str
    number: int
    diffusers_name: str
    comfy_key: ComfyKey


@dataclass(frozen=True)
class LatentFormat:
    """How the VAE's latents are laid out and scaled (``z = (x - shift) * scale`` as ComfyUI's latent formats)."""

    channels: int
    factor: int
    scale: float
    shift: float = 0.0


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a backbone.

    Attributes:
        name: the name its vectors take in embedding / bank files (``clip_l``, ``clip_g``).
        comfy_key: its key in ComfyUI's ``clip.tokenize`` output (``l``, ``g``).
        width: hidden width (the slice of the cross-attention context it fills, in order).
        layer: hidden layer the model reads (-1 last, -2 penultimate).
        pooled: whether its pooled, projected output modulates every token (SDXL's ``text_embeds``, Flux's
            CLIP-L vector): taken from the identifier-free prompt whenever something is confined.
        in_context: whether its hidden states are (part of) the text the model attends to (Flux's CLIP-L only
            pools).
    """

    name: str
    comfy_key: str
    width: int
    layer: int = -1
    pooled: bool = False
    in_context: bool = True


@dataclass(frozen=True)
class SamplerDefaults:
    """What the workflows and the pipeline use unless told otherwise."""

    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    guidance: float | None = None  # distilled guidance (Flux dev's FluxGuidance), with cfg 1
    inpaint_guidance: float | None = None  # the same for the inpainting model (Flux Fill's published 30)


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
        canvas_multiple: canvas sides are multiples of this (the latent grid's coarsest level divides them).
        kind: ``"unet"`` (cross-attention layers) or ``"dit"`` (joint-attention blocks).
        blocks: a DiT's double- and single-stream blocks (empty for UNets).
        latent: the VAE latent format.
        style: how a reference image's style enters: ``"ip-adapter"`` (per-layer K/V) or ``"redux"`` (style-model
            tokens appended to the text).
        checkpoint_prefixes: tensor-name prefixes that all occur in a single-file checkpoint of this family.
        adapters: the hosts productbg runs this family on (``comfyui``, ``diffusers``, ``training``).
    """

    family: str
    label: str
    layers: tuple[CrossAttnLayer, ...]
    text_encoders: tuple[TextEncoder, ...]
    default_size: int
    sampler: SamplerDefaults
    presets: Mapping[str, frozenset[int]]
    comfy_configs: frozenset[str]
    canvas_multiple: int = 16
    kind: str = "unet"
    blocks: tuple[DitBlock, ...] = ()
    latent: LatentFormat = LatentFormat(4, 8, 0.18215)
    style: str = "ip-adapter"
    checkpoint_prefixes: tuple[str, ...] = ()
    adapters: frozenset[str] = frozenset({"comfyui", "diffusers", "training"})

    @property
    def canvases(self) -> dict[str, tuple[int, int]]:
        """Named aspect ratios at the trained pixel count, ``"4:5" -> (width, height)`` (:func:`canvas`)."""
        return {name: canvas(name, self.default_size ** 2, self.canvas_multiple) for name in RATIOS}

    @property
    def context_dim(self) -> int:
        """Width of the text the model attends to (the context-feeding encoders' widths, concatenated)."""
        return sum(t.width for t in self.text_encoders if t.in_context)

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

    @property
    def bank_encoders(self) -> tuple[TextEncoder, ...]:
        """The text encoders a category bank holds vectors for: those whose hidden states the model attends to
        (an encoder that only pools, Flux's CLIP-L, gets the identifier-free prompt instead)."""
        return tuple(t for t in self.text_encoders if t.in_context)

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
        if self.kind == "dit":
            double = sum(b.kind == "double" for b in self.blocks)
            return (f"{self.label} (text width {self.context_dim}, {double} double-stream and "
                    f"{len(self.blocks) - double} single-stream blocks)")
        return f"{self.label} (context width {self.context_dim}, {self.num_layers} cross-attention layers)"

    def runs_on(self, host: str) -> bool:
        """Whether productbg has an adapter for this family on ``host`` (``comfyui``, ``diffusers``, ``training``)."""
        return host in self.adapters


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


#: The named aspect ratios (width:height) every canvas option offers: square listings, portrait feeds, landscape
#: banners, stories.
RATIOS: tuple[str, ...] = ("1:1", "4:5", "3:4", "2:3", "16:9", "9:16", "5:4", "4:3", "3:2")


def canvas(ratio: str, pixels: int, multiple: int = 16) -> tuple[int, int]:
    """``(width, height)`` of a named aspect ratio at about ``pixels`` pixels, sides rounded to ``multiple``.

    The one canvas table: the CLI's ``--canvas``, the pipeline and Place Product all resolve ratios here, so
    "4:5" at SD1.5's 512² is 464×576 everywhere (fine enough that 4:5 and 3:4 stay apart; the UNets round odd
    grids up, which the attention's grid rule follows).
    """
    if ratio not in RATIOS:
        raise ValueError(f"unknown aspect ratio {ratio!r}; choose one of {', '.join(RATIOS)}")
    w, h = (int(x) for x in ratio.split(":"))
    scale = (pixels / (w * h)) ** 0.5
    return (max(multiple, round(w * scale / multiple) * multiple), max(multiple, round(h * scale / multiple) * multiple))


def canvas_multiple_for(pixels: int) -> int:
    """The canvas multiple of the supported backbone whose trained pixel count is nearest ``pixels`` (what a
    node without a MODEL input uses: 512×512 canvases round as SD1.5's, 1024×1024 as SDXL's)."""
    candidates = [b for b in BACKBONES.values() if b.kind == "unet"]
    return min(candidates, key=lambda b: abs(b.default_size ** 2 - pixels)).canvas_multiple


def _dit_blocks(double: int, single: int) -> tuple[DitBlock, ...]:
    """Flux-style blocks: ``double`` double-stream then ``single`` single-stream, diffusers and ComfyUI names."""
    out = [DitBlock(i, "double", i, f"transformer_blocks.{i}", ("double_block", i)) for i in range(double)]
    out += [DitBlock(double + i, "single", i, f"single_transformer_blocks.{i}", ("single_block", i))
            for i in range(single)]
    return tuple(out)

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
    canvas_multiple=16,
    checkpoint_prefixes=("cond_stage_model.transformer.",),
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
    canvas_multiple=32,
    latent=LatentFormat(4, 8, 0.13025),
    checkpoint_prefixes=("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
)

FLUX = Backbone(
    family="flux", label="Flux.1", layers=(), kind="dit", blocks=_dit_blocks(19, 38),
    # T5-XXL's last hidden states are the text every block attends to; CLIP-L's pooled vector modulates every
    # token (AdaLN), so under confinement it comes from the identifier-free prompt, as SDXL's pooled embedding.
    text_encoders=(TextEncoder("t5xxl", "t5xxl", 4096), TextEncoder("clip_l", "l", 768, pooled=True, in_context=False)),
    default_size=1024,
    # Flux dev's published settings: distilled guidance 3.5 with CFG 1, Euler, 20 steps (schnell: 4 steps); Flux
    # Fill's published guidance is 30.
    sampler=SamplerDefaults(steps=20, cfg=1.0, sampler_name="euler", scheduler="simple", guidance=3.5,
                            inpaint_guidance=30.0),
    presets={"all": frozenset(range(57))},
    comfy_configs=frozenset({"Flux", "FluxInpaint", "FluxSchnell"}),
    canvas_multiple=16,  # 8× VAE, then 2×2 patches
    latent=LatentFormat(16, 8, 0.3611, 0.1159),
    style="redux",
    checkpoint_prefixes=("double_blocks.",),
    adapters=frozenset({"comfyui", "diffusers", "training"}),
)

BACKBONES: dict[str, Backbone] = {b.family: b for b in (SD15, SDXL, FLUX)}

#: Families we recognise but do not support: ComfyUI config class (or family key) -> what to tell the user.
_UNSUPPORTED: dict[str, str] = {
    "SD20": "SD2.x", "SD21UnclipL": "SD2.1 unCLIP", "SD21UnclipH": "SD2.1 unCLIP", "SD_X4Upscaler": "SD x4 upscaler",
    "SDXLRefiner": "an SDXL refiner (it has no CLIP-L text encoder, so neither Category Prompt nor its "
                   "identifier fit; use an SDXL base or SDXL-inpainting checkpoint)",
    "SSD1B": "SSD-1B (a distilled SDXL with other cross-attention layers)",
    "Segmind_Vega": "Segmind Vega (a distilled SDXL with other cross-attention layers)",
    "KOALA_700M": "KOALA (a distilled SDXL)", "KOALA_1B": "KOALA (a distilled SDXL)",
    "SD15_instructpix2pix": "SD1.5 InstructPix2Pix", "SDXL_instructpix2pix": "SDXL InstructPix2Pix",
    "SD3": "SD3", "Chroma": "Chroma (Flux-based, with another modulation)", "Flux2": "FLUX.2",
    "FluxKontext": "Flux.1 Kontext (an editing model: it regenerates the whole image from a reference, so the "
                   "product's pixels are not kept; use Flux.1 Fill for product backgrounds)",
    "AuraFlow": "AuraFlow", "PixArtAlpha": "PixArt", "PixArtSigma": "PixArt", "HunyuanDiT": "HunyuanDiT",
    "HunyuanDiT1": "HunyuanDiT", "Lumina2": "Lumina 2", "HiDream": "HiDream", "QwenImage": "Qwen-Image",
    "Stable_Cascade_C": "Stable Cascade", "Stable_Cascade_B": "Stable Cascade",
}

#: Single-file key prefixes of Flux relatives, checked before the table (they have Flux's blocks too).
_RELATIVE_PREFIXES = (("distilled_guidance_layer.", "Chroma"), ("double_stream_modulation_img.", "Flux2"))
#: Single-file key prefixes of families not in the table (checked after every table entry's).
_FOREIGN_PREFIXES = (("conditioner.embedders.0.model.", "SDXLRefiner"), ("cond_stage_model.model.", "SD20"),
                     ("text_encoders.", "SD3"), ("model.diffusion_model.joint_blocks.", "SD3"),
                     ("model.diffusion_model.transformer_blocks.", "a diffusion-transformer (DiT)"))


def supported(host: str = "comfyui") -> str:
    """The families productbg runs on ``host``, for messages."""
    names = [b.label for b in BACKBONES.values() if b.runs_on(host)]
    return f"{', '.join(names)} and their inpainting checkpoints (and fine-tunes of them)"


SUPPORTED = supported()


def unsupported(name: str, host: str = "comfyui") -> BackboneError:
    """The error for a model of family ``name`` (a ComfyUI config class or a plain description)."""
    what = _UNSUPPORTED.get(name, name)
    return BackboneError(f"this is {'' if what.startswith(('an ', 'a ')) else 'a '}{what} model; productbg "
                         f"supports {supported(host)}")


def require(b: Backbone, host: str) -> Backbone:
    """``b`` when productbg has an adapter for it on ``host``; else a one-line BackboneError naming it."""
    if not b.runs_on(host):
        raise BackboneError(f"this is a {b.label} model: {b.label} is in productbg's backbone table but its "
                            f"{host} adapter is not built yet; there productbg supports {supported(host)}")
    return b


def backbone(family: str) -> Backbone:
    """The backbone of a family name (``sd15``, ``sdxl``, ``flux``)."""
    if family not in BACKBONES:
        raise BackboneError(f"unknown backbone {family!r}; productbg knows {', '.join(BACKBONES)}")
    return BACKBONES[family]


def from_comfy_config(config_name: str, unet_config: Mapping, host: str = "comfyui") -> Backbone:
    """The backbone of a ComfyUI model, from its ``model_config`` class name and ``unet_config``.

    Raises:
        BackboneError: another family (named), a family without a ComfyUI adapter yet, or a fine-tune whose
            cross-attention layers differ.
    """
    for b in BACKBONES.values():
        if config_name in b.comfy_configs:
            require(b, host)
            _check_comfy_structure(b, unet_config)
            return b
    raise unsupported(config_name if config_name in _UNSUPPORTED else
                      f"{config_name} (text context {unet_config.get('context_dim')})")


def from_checkpoint_keys(keys, host: str = "diffusers") -> Backbone | None:
    """The backbone of a single-file checkpoint from its tensor names (None: no family's text encoder or blocks
    found — a LoRA, a bare UNet ...; the caller's loader says what is missing).

    Raises:
        BackboneError: a family not in the table or without an adapter on ``host`` (named).
    """
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) or k.startswith("model.diffusion_model." + prefix) for k in keys)

    for prefix, family in _RELATIVE_PREFIXES:
        if has(prefix):
            raise unsupported(family, host)
    for b in BACKBONES.values():
        if b.checkpoint_prefixes and all(has(p) for p in b.checkpoint_prefixes):
            return require(b, host)
    for prefix, family in _FOREIGN_PREFIXES:
        if has(prefix):
            raise unsupported(family, host)
    return None


def _check_comfy_structure(b: Backbone, unet_config: Mapping) -> None:
    if b.kind == "dit":
        _check_comfy_dit(b, unet_config)
        return
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


def _check_comfy_dit(b: Backbone, unet_config: Mapping) -> None:
    """A Flux-class ComfyUI model must have Flux's text width and the joint-attention blocks the adapter hooks
    (any number of them: ComfyUI counts them from the file, and pruned fine-tunes exist)."""
    context = unet_config.get("context_in_dim")
    if context is not None and context != b.context_dim:
        raise BackboneError(f"this {b.label}-class model reads text {context} wide; {b.describe()} reads "
                            f"{b.context_dim}: its text encoder differs")
    if not unet_config.get("depth") and not unet_config.get("depth_single_blocks"):
        raise BackboneError(f"this {b.label}-class model has no double- or single-stream blocks")


def from_token_keys(keys, host: str = "comfyui") -> Backbone:
    """The backbone of a ComfyUI CLIP from the keys of its ``clip.tokenize`` output (``l``; ``g`` and ``l``;
    ``l`` and ``t5xxl``)."""
    keys = set(keys)
    for b in BACKBONES.values():
        if keys == {t.comfy_key for t in b.text_encoders}:
            return require(b, host)
    if keys == {"g"}:
        raise unsupported("SDXLRefiner")
    named = {"t5xxl": "SD3", "h": "SD2.x"}
    for k, what in named.items():
        if k in keys:
            raise unsupported(f"{what} (text encoders {', '.join(sorted(keys))})")
    raise unsupported(f"model with text encoders {', '.join(sorted(keys))}")


def from_context(context_dim: int, num_layers: int) -> Backbone | None:
    """The backbone with this cross-attention context width and layer count, if any (file detection)."""
    for b in BACKBONES.values():
        if b.kind == "unet" and (b.context_dim, b.num_layers) == (context_dim, num_layers):
            return b
    return None


def family_by_context_width(width: int) -> str | None:
    """The family whose cross-attention context is ``width`` wide (SD2's 1024 too: recognised, not supported)."""
    known = {b.context_dim: b.family for b in BACKBONES.values() if b.kind == "unet"}
    return {**known, 1024: "sd2"}.get(width)
