"""Flux.1 files as ComfyUI users have them, loaded offline into :class:`~.flux_models.FluxParts`.

Two ways in:

* one single file that bundles everything (ComfyUI's "checkpoint" layout: ``model.diffusion_model.*`` in BFL
  names, ``text_encoders.t5xxl.transformer.*``, ``text_encoders.clip_l.transformer.*``, ``vae.*``);
* a transformer alone (``models/diffusion_models/flux1-fill-dev.safetensors``: BFL names, with or without
  ``model.diffusion_model.``) and its companions — T5-XXL (``models/text_encoders/t5xxl_fp16.safetensors`` or
  ``t5xxl_fp8_e4m3fn.safetensors``), CLIP-L (``clip_l.safetensors``), the VAE (``models/vae/ae.safetensors``) —
  given by path, or else found beside the transformer: in its own folder, then in the ComfyUI ``models`` tree it
  sits in. A companion that is found nowhere is one line naming the flag to pass.

Configs come from ``assets/flux`` (diffusers' / transformers' configs of the published models; ``NOTICE.md``), with
what the transformer's keys say on top: the depth (double / single blocks counted as ComfyUI counts them), the
variant (Fill: ``img_in`` over 384 features; schnell: no ``guidance_in``) and the widths.

**Precision.** Weights are held in the compute dtype (default: bfloat16 on CUDA, float32 on a CPU), except the
linear layers of an fp8 file, which stay fp8 and are cast per call (:class:`CastLinear`): an fp32 T5-XXL is 19 GB,
the fp8 file 4.9 GB. T5's token-embedding table is the one ComfyUI's model holds (:func:`.t5_file.t5_input_embeddings`:
fp8-rounded for an fp8 file), so a bank made from text encodes here exactly as its words do.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F

from .. import backbones
from ..weights.errors import WeightsError
from ..weights.safefile import Header, SafeReader, read_header
from .errors import PipelineError
from .flux_keys import CLIP_L_PREFIX, T5_PREFIX, VAE_PREFIX, bfl_to_diffusers, block_counts, strip_prefix
from .flux_latents import FILL_FEATURES, PLAIN_FEATURES
from .flux_models import FluxParts
from .quiet import quiet_loading
from .single_file import ASSETS, SD15_CONFIGS, safetensors_checkpoint
from .t5_file import (DTYPE_KEY, EMBEDDING, FP8, TORCH_DTYPES, T5Layout, comfy_t5_dtype, t5_input_embeddings,
                      t5_layout)
from .text import clip_tokenizer, t5_tokenizer

FLUX_CONFIGS = ASSETS / "flux"
CONFIG_FILES = {"transformer": "transformer_config.json", "vae": "vae_config.json", "t5": "t5xxl_config.json",
                "clip_l": "clip_l_config.json"}
#: CLIP-L's config is SD1.5's (both are OpenAI's ViT-L/14 text model).
CLIP_L_FALLBACK = SD15_CONFIGS / "text_encoder_config.json"
#: Companion file names searched beside a transformer, in order of preference.
T5_NAMES = ("t5xxl_fp8_e4m3fn.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors", "t5xxl_fp16.safetensors")
T5_GLOB = "t5xxl_*.safetensors"
CLIP_L_NAMES = ("clip_l.safetensors",)
VAE_NAMES = ("ae.safetensors", "flux_vae.safetensors")
#: ComfyUI models folders each companion lives in (``clip`` is the older name of ``text_encoders``).
COMPANION_FOLDERS = {"t5": ("text_encoders", "clip"), "clip_l": ("text_encoders", "clip"), "vae": ("vae",)}
FLAGS = {"t5": "--t5", "clip_l": "--clip-l", "vae": "--vae"}
WHAT = {"t5": "T5-XXL text encoder (models/text_encoders/t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors)",
        "clip_l": "CLIP-L text encoder (models/text_encoders/clip_l.safetensors)",
        "vae": "Flux VAE (models/vae/ae.safetensors)"}
SCALE_WEIGHT = "scale_weight"
#: Bytes read through one mapping of a file before it is mapped again (:func:`_read`).
MAP_WINDOW = 512 * 2 ** 20


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """The compute dtype: bfloat16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if torch.device(device or "cpu").type == "cuda" else torch.float32


def is_flux_file(path: str | os.PathLike) -> bool:
    """Whether a ``.safetensors`` file holds a Flux.1 transformer (its header only; False for anything else, which
    the Stable Diffusion loader then reads or refuses)."""
    p = Path(path)
    if p.suffix.lower() != ".safetensors" or not p.is_file():
        return False
    try:
        header = read_header(p)
    except WeightsError:
        return False
    try:
        return backbones.from_checkpoint_keys(header.tensors, host="diffusers") is backbones.FLUX
    except backbones.BackboneError:
        return False


# ---------------------------------------------------------------------------------------------- fp8 storage
class CastLinear(torch.nn.Linear):
    """A ``Linear`` whose stored weight may be narrower than the compute dtype (fp8): cast on every call.

    ``scale_weight`` (ComfyUI's "scaled fp8" files) multiplies the weight once cast.
    """

    compute_dtype: torch.dtype = torch.float32
    scale_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(self.compute_dtype)
        if self.scale_weight is not None:
            w = w * self.scale_weight.to(w)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), w, bias)


def _t5_gated_ffn_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """T5's gated-GELU FFN without transformers' cast of the hidden states to ``wo``'s storage dtype (which would
    round them to fp8 when ``wo`` is stored in fp8)."""
    gelu = self.act(self.wi_0(hidden_states))
    return self.wo(self.dropout(gelu * self.wi_1(hidden_states)))


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor], dtype: torch.dtype, name: str,
            scales: Mapping[str, torch.Tensor] | None = None) -> None:
    """Load ``state`` into a model built on the meta device: fp8 linear weights stay fp8 (their layers become
    :class:`CastLinear`), everything else is cast to ``dtype``; PipelineError naming what does not fit."""
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    held = {}
    for k, v in state.items():
        owner = k.rsplit(".", 1)[0]
        keep = v.dtype in FP8 and owner in linears and k.endswith(".weight")
        held[k] = v if keep else v.to(dtype)
    try:
        missing, unexpected = model.load_state_dict(held, strict=False, assign=True)
    except RuntimeError as e:
        raise PipelineError(f"{name}: its tensors do not fit the model ({str(e).splitlines()[-1].strip()[:200]})") \
            from None
    missing = [k for k in missing if not k.endswith("embed_tokens.weight")]  # T5's tied copy of shared.weight
    if missing or unexpected:
        what = f"lacks '{missing[0]}'" if missing else f"has a tensor '{unexpected[0]}' the model does not have"
        raise PipelineError(f"{name}: not the expected model: it {what}")
    for mod_name, module in model.named_modules():
        for b_name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:  # non-persistent buffers built on the meta device (CLIP's ids)
                if b_name != "position_ids":
                    raise PipelineError(f"{name}: the model's buffer {mod_name}.{b_name} is not in the file")
                module._buffers[b_name] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
    for n in linears:
        module = model.get_submodule(n)
        module.__class__ = CastLinear  # same parameters, a forward that casts
        module.compute_dtype = dtype
        if scales and n in scales:
            module.scale_weight = scales[n].to(torch.float32)


def _read(path: Path, header: Header, prefix: str = "", skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` (stripped), except names starting with ``skip``.

    The file is mapped again every :data:`MAP_WINDOW` bytes: the pages of a mapping stay resident while it is
    open, so reading a 4.9 GB T5 through one mapping would hold the file's pages beside the copies (twice its size).
    """
    names = [k for k in header.tensors if k.startswith(prefix) and not k.removeprefix(prefix).startswith(skip)]
    out: dict[str, torch.Tensor] = {}
    try:
        while names:
            with SafeReader(path, header) as reader:
                mapped = 0
                while names and mapped < MAP_WINDOW:
                    k = names.pop(0)
                    out[k.removeprefix(prefix)] = reader.tensor(k)
                    mapped += header.tensors[k].end - header.tensors[k].begin
    except WeightsError as e:
        raise PipelineError(str(e)) from None
    return out


def _config(config_dir: Path | None, which: str) -> Path:
    for root in ([config_dir] if config_dir is not None else []) + [FLUX_CONFIGS]:
        f = root / CONFIG_FILES[which]
        if f.is_file():
            return f
    if which == "clip_l":
        return CLIP_L_FALLBACK
    raise PipelineError(f"{FLUX_CONFIGS}: missing the shipped config {CONFIG_FILES[which]}")


# ---------------------------------------------------------------------------------------------- the parts
def detect_variant(keys, name: str = "transformer") -> str:
    """``fill`` (``img_in`` over 384 features), ``schnell`` (no ``guidance_in``) or ``dev``, from a BFL header
    (``{name: TensorInfo}``) or state dict."""
    prefix = strip_prefix(keys)
    img_in = keys.get(prefix + "img_in.weight")
    if img_in is None:
        raise PipelineError(f"{name}: a Flux.1 transformer without 'img_in.weight'; the file is incomplete")
    features = int(img_in.shape[-1])
    if features not in (PLAIN_FEATURES, FILL_FEATURES):
        raise PipelineError(f"{name}: its img_in reads {features} features; Flux.1 dev / schnell read "
                            f"{PLAIN_FEATURES} and Fill {FILL_FEATURES} (another Flux-based model?)")
    if features == FILL_FEATURES:
        return "fill"
    return "dev" if any(k.startswith(prefix + "guidance_in.") for k in keys) else "schnell"


def load_transformer(path: Path, header: Header, dtype: torch.dtype, config_dir: Path | None = None):
    """The diffusers ``FluxTransformer2DModel`` of a BFL-layout file (config: the shipped one, with the depth,
    variant and widths the keys say)."""
    # optional dependency: diffusers
    from diffusers import FluxTransformer2DModel

    variant = detect_variant(header.tensors, path.name)
    prefix = strip_prefix(header.tensors)
    state = _read(path, header, prefix, skip=("text_encoders.", "vae.")) if prefix else _read(path, header)
    state = {k: v for k, v in state.items() if not k.startswith(("text_encoders.", "vae.", "model.", SCALE_WEIGHT))}
    try:
        converted = bfl_to_diffusers(state)
    except (KeyError, ValueError) as e:
        raise PipelineError(f"{path.name}: {str(e).strip(chr(34) + chr(39))}") from None
    double, single = block_counts(state)
    config = FluxTransformer2DModel.load_config(str(_config(config_dir, "transformer")))
    inner = int(converted["x_embedder.weight"].shape[0])
    head_dim = int(converted["transformer_blocks.0.attn.norm_q.weight"].shape[0]) if double else \
        int(converted["single_transformer_blocks.0.attn.norm_q.weight"].shape[0])
    config.update(num_layers=double, num_single_layers=single, in_channels=int(converted["x_embedder.weight"].shape[1]),
                  out_channels=PLAIN_FEATURES, guidance_embeds=variant != "schnell", attention_head_dim=head_dim,
                  num_attention_heads=inner // head_dim,
                  joint_attention_dim=int(converted["context_embedder.weight"].shape[1]),
                  pooled_projection_dim=int(converted["time_text_embed.text_embedder.linear_1.weight"].shape[1]))
    with torch.device("meta"), quiet_loading():
        model = FluxTransformer2DModel.from_config(config)
    _assign(model, converted, dtype, path.name)
    return model, variant


def load_t5(path: Path, header: Header, dtype: torch.dtype, config_dir: Path | None = None):
    """transformers ``T5EncoderModel`` of a T5-XXL file (or the T5 a Flux single file bundles): fp8 linears kept
    fp8, the embedding table as ComfyUI's model holds it."""
    # optional dependency: transformers
    from transformers import T5Config, T5EncoderModel
    from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

    layout = t5_layout(header) if config_dir is None or not (config_dir / CONFIG_FILES["t5"]).is_file() else \
        custom_t5_layout(header, path.name)
    if layout is None:
        raise PipelineError(f"{path.name}: holds no T5-XXL text encoder; pass Flux.1's with --t5 "
                            "(models/text_encoders/t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors)")
    state = _read(path, header, layout.prefix, skip=(EMBEDDING, "scaled_fp8"))
    scales = {k.removesuffix("." + SCALE_WEIGHT): state.pop(k) for k in list(state) if k.endswith(SCALE_WEIGHT)}
    for k in [k for k in state if k.endswith("scale_input")]:
        del state[k]  # ComfyUI's fp8 matmul input scales: unused when weights are cast to the compute dtype
    table = t5_input_embeddings(path, header, layout)  # fp8-rounded as ComfyUI's model holds it
    state[EMBEDDING] = table
    config = T5Config.from_json_file(str(_config(config_dir, "t5")))
    config.dropout_rate, config.use_cache, config.is_encoder_decoder = 0.0, False, False
    with torch.device("meta"), quiet_loading():
        model = T5EncoderModel(config)
    _assign(model, state, dtype, path.name, scales)
    model.encoder.embed_tokens = model.shared
    for m in model.modules():
        if isinstance(m, T5DenseGatedActDense):
            m.forward = _t5_gated_ffn_forward.__get__(m)
    return model.eval()


def custom_t5_layout(header: Header, name: str) -> T5Layout:
    """Where the T5 of a custom-config model sits (any size: the T5-XXL checks of :func:`.t5_file.t5_layout` are for
    the published files), with the same dtype rule for its embedding table."""
    prefix = T5_PREFIX if any(k.startswith(T5_PREFIX) for k in header.tensors) else ""
    emb, norm = header.tensors.get(prefix + EMBEDDING), header.tensors.get(prefix + DTYPE_KEY)
    if emb is None or emb.dtype not in TORCH_DTYPES:
        raise PipelineError(f"{name}: no T5 token embeddings ('{prefix}{EMBEDDING}')")
    norm_dtype = TORCH_DTYPES.get(norm.dtype) if norm is not None else None
    return T5Layout(prefix, "T5 text encoder", TORCH_DTYPES[emb.dtype], comfy_t5_dtype(norm_dtype),
                    prefix + "scaled_fp8" in header.tensors)


def load_clip_l(path: Path, header: Header, dtype: torch.dtype, prefix: str = "", config_dir: Path | None = None):
    """transformers ``CLIPTextModel`` (Flux's CLIP-L, whose pooled output modulates every token)."""
    # optional dependency: transformers
    from transformers import CLIPTextConfig, CLIPTextModel

    state = _read(path, header, prefix, skip=("text_projection", "logit_scale"))
    if not any(k.startswith("text_model.") for k in state):
        raise PipelineError(f"{path.name}: holds no CLIP-L text encoder ('text_model.*'); pass Flux.1's with "
                            "--clip-l (models/text_encoders/clip_l.safetensors)")
    state.pop("text_model.embeddings.position_ids", None)
    config = CLIPTextConfig.from_json_file(str(_config(config_dir, "clip_l")))
    with torch.device("meta"), quiet_loading():
        model = CLIPTextModel(config)
    expected = set(model.state_dict())
    if not set(state) <= expected:  # transformers >= 5.6 names the text model without "text_model."
        state = {k.removeprefix("text_model.") if k.removeprefix("text_model.") in expected else k: v
                 for k, v in state.items()}
    _assign(model, state, dtype, path.name)
    return model.eval()


def load_vae(path: Path, header: Header, dtype: torch.dtype, prefix: str = "", config_dir: Path | None = None):
    """diffusers ``AutoencoderKL`` of a Flux VAE in the original (LDM) layout (``ae.safetensors``, or ``vae.*``)."""
    # optional dependency: diffusers
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    state = _read(path, header, prefix)
    if "encoder.conv_in.weight" not in state:
        raise PipelineError(f"{path.name}: holds no VAE ('encoder.conv_in.weight'); pass Flux.1's with --vae "
                            "(models/vae/ae.safetensors)")
    channels = int(state["decoder.conv_in.weight"].shape[1])
    if channels != backbones.FLUX.latent.channels:
        raise PipelineError(f"{path.name}: a VAE with {channels} latent channels; Flux.1's has "
                            f"{backbones.FLUX.latent.channels} (ae.safetensors), pass it with --vae")
    config = AutoencoderKL.load_config(str(_config(config_dir, "vae")))
    with torch.device("meta"), quiet_loading():
        model = AutoencoderKL.from_config(config)
    _assign(model, convert_ldm_vae_checkpoint(state, config), dtype, path.name)
    return model.eval()


# ---------------------------------------------------------------------------------------------- companions
def find_companion(transformer: Path, which: str) -> Path | None:
    """A companion file of a transformer: in its folder, else in the ComfyUI ``models`` tree it sits in (the
    closest ``models`` folder above it); None when there is none."""
    names = {"t5": T5_NAMES, "clip_l": CLIP_L_NAMES, "vae": VAE_NAMES}[which]
    places = [transformer.parent]
    models = next((p for p in transformer.resolve().parents if p.name == "models"), None)
    if models is None:
        models = next((p for p in transformer.absolute().parents if p.name == "models"), None)
    if models is not None:
        for folder in COMPANION_FOLDERS[which]:
            root = models / folder
            if root.is_dir():
                places += [root, *sorted(d for d in root.rglob("*") if d.is_dir())]
    for place in places:
        for name in names:
            if (place / name).is_file():
                return place / name
        if which == "t5":
            found = sorted(place.glob(T5_GLOB))
            if found:
                return found[0]
    return None


def _companion(transformer: Path, which: str, given: str | os.PathLike | None) -> Path:
    if given is not None:
        return safetensors_checkpoint(given)
    found = find_companion(transformer, which)
    if found is None:
        raise PipelineError(f"{transformer.name} holds the Flux.1 transformer alone and no {WHAT[which]} was found "
                            f"beside it or in its ComfyUI models folder: pass {FLAGS[which]} PATH")
    return found


def load_flux(checkpoint: str | os.PathLike, *, t5: str | os.PathLike | None = None,
              clip_l: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
              dtype: torch.dtype | None = None, device: str | torch.device | None = None,
              config_dir: str | os.PathLike | None = None) -> FluxParts:
    """Load Flux.1 (dev, schnell or Fill) offline from a bundled single file or a transformer and its companions.

    Args:
        checkpoint: a ``.safetensors`` Flux.1 single file (ComfyUI's checkpoint layout) or transformer (BFL layout).
        t5, clip_l, vae: companion files (default: the bundled ones, else found beside the transformer).
        dtype: compute dtype (default: bfloat16 on CUDA, float32 elsewhere); fp8 linear weights stay fp8.
        device: the device the compute dtype is chosen for (the models are loaded on the CPU).
        config_dir: configs to use instead of ``assets/flux`` (for tiny or custom models; any file it lacks comes
            from ``assets/flux``).

    Raises:
        PipelineError: not a Flux.1 file (another family named), a companion missing (names the flag), a file
            that does not fit.
    """
    p = safetensors_checkpoint(checkpoint)
    try:
        header = read_header(p)
        found = backbones.from_checkpoint_keys(header.tensors, host="diffusers")
    except WeightsError as e:
        raise PipelineError(str(e)) from None
    except backbones.BackboneError as e:
        raise PipelineError(f"{p.name}: {e}") from None
    if found is not backbones.FLUX:
        raise PipelineError(f"{p.name}: not a Flux.1 transformer (no 'double_blocks.*' tensors)")
    dtype = dtype or default_dtype(device)
    configs = Path(config_dir) if config_dir is not None else None
    transformer, variant = load_transformer(p, header, dtype, configs)
    files = [p.name]

    def part(which: str, given, prefix: str):
        if given is None and any(k.startswith(prefix) for k in header.tensors):
            return p, header, prefix
        path = _companion(p, which, given)
        files.append(path.name)
        try:
            companion = read_header(path)
        except WeightsError as e:
            raise PipelineError(str(e)) from None
        bundled = any(k.startswith(prefix) for k in companion.tensors)  # another Flux single file's part
        return path, companion, prefix if bundled else ""

    t5_path, t5_header, _ = part("t5", t5, T5_PREFIX)
    t5_model = load_t5(t5_path, t5_header, dtype, configs)
    clip_path, clip_header, clip_prefix = part("clip_l", clip_l, CLIP_L_PREFIX)
    clip_model = load_clip_l(clip_path, clip_header, dtype, clip_prefix, configs)
    vae_path, vae_header, vae_prefix = part("vae", vae, VAE_PREFIX)
    vae_model = load_vae(vae_path, vae_header, dtype, vae_prefix, configs)
    return FluxParts(transformer, vae_model, t5_model, clip_model, t5_tokenizer(), clip_tokenizer(), variant,
                     " + ".join(files))
