"""Single-file Stable Diffusion checkpoints (the original LDM layout ComfyUI users have), loaded offline.

diffusers' ``from_single_file`` looks component configs up on the hub unless it is handed them. This module
hands it the configs shipped in ``assets/sd15`` (``unet_config.json``, ``unet_inpaint_config.json``,
``vae_config.json``, ``text_encoder_config.json``, ``scheduler_config.json``) or ``assets/sdxl`` (the same plus
``text_encoder_2_config.json``), so loading never touches the network. The backbone is told from the text
encoders' keys (:func:`detect_backbone`): SD1.5 has ``cond_stage_model.transformer``, SDXL
``conditioner.embedders.0.transformer`` (CLIP-L) and ``conditioner.embedders.1.model`` (OpenCLIP-G); other
families are refused by name. A 9-channel ``input_blocks.0.0`` selects the inpainting UNet config.

It also writes the layout (:func:`ldm_state_dict`, :func:`save_single_file`): the diffusers → LDM key mapping
is the inverse of the one diffusers reads, so a model trained here can be dropped into ComfyUI's
``models/checkpoints``, and tests can build small checkpoints that go through the very same loader.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import backbones
from ..weights.errors import WeightsError
from ..weights.safefile import read_header, SafeReader, load_all, atomic_save
from .errors import PipelineError
from .quiet import quiet_loading
from .t5_file import t5_input_embeddings, t5_layout

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SD15_CONFIGS = ASSETS / "sd15"
SDXL_CONFIGS = ASSETS / "sdxl"
SHIPPED_CONFIGS = {"sd15": SD15_CONFIGS, "sdxl": SDXL_CONFIGS}
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
SDXL_TEXT_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_TEXT2_PREFIX = "conditioner.embedders.1.model."
UNET_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"
CONFIG_FILES = {"unet": "unet_config.json", "unet_inpaint": "unet_inpaint_config.json",
                "vae": "vae_config.json", "text_encoder": "text_encoder_config.json",
                "scheduler": "scheduler_config.json"}
#: SDXL's second text encoder (OpenCLIP ViT-bigG/14 text model, with projection).
TEXT2_CONFIG = "text_encoder_2_config.json"
#: Key prefixes of families we refuse, in the order they are checked (first match names the family).
_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


@dataclass
class SingleFileParts:
    """What a single-file checkpoint holds, as diffusers / transformers modules.

    Attributes:
        unet: ``UNet2DConditionModel`` (4 or 9 input channels).
        vae: ``AutoencoderKL``.
        text_encoder: ``CLIPTextModel`` (CLIP-L).
        scheduler_config: the scheduler config dict shipped with the component configs.
        text_encoder_2: SDXL's ``CLIPTextModelWithProjection`` (OpenCLIP-G); None on SD1.5.
        family: the backbone family (``sd15``, ``sdxl``).
    """

    unet: Any
    vae: Any
    text_encoder: Any
    scheduler_config: dict
    text_encoder_2: Any = None
    family: str = "sd15"


def detect_backbone(keys, name: str = "checkpoint"):
    """The :class:`~productbg.backbones.Backbone` of an LDM-layout checkpoint from its tensor names (the
    registry's :func:`~productbg.backbones.from_checkpoint_keys`).

    Raises:
        PipelineError: another family (named: SDXL refiner, SD2, SD3, Flux ...). Files without any text
            encoder are taken as SD1.5, whose loader then names what is missing.
    """
    try:
        found = backbones.from_checkpoint_keys(keys, host="diffusers")
    except backbones.BackboneError as e:
        raise PipelineError(f"{name}: {e}") from None
    # No text encoder we know and no foreign family: SD1.5's loader says what is missing (a LoRA, a UNet ...).
    return found if found is not None else backbones.SD15


def checkpoint_backbone(path: str | os.PathLike):
    """The backbone of a ``.safetensors`` checkpoint, read from its header only (no tensor is loaded)."""
    try:
        header = read_header(path)
    except WeightsError as e:
        raise PipelineError(str(e)) from None
    return detect_backbone(header.tensors, Path(path).name)


def safetensors_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` as a Path when it is an existing ``.safetensors`` file (pickles are refused: they can run code)."""
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"{p}: no such checkpoint file")
    if p.suffix.lower() != ".safetensors":
        raise PipelineError(f"{p.name}: only .safetensors checkpoints are read (.ckpt/.pt files are pickles "
                            "that can run code; convert them first)")
    return p


def token_embeddings(path: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    """A ``.safetensors`` checkpoint's family and its text encoders' token input embeddings, ``[vocab, width]``
    per encoder (``clip_l``; SDXL adds ``clip_g``; ``flux`` for a T5-XXL file, ``t5xxl`` alone), read from the
    file alone (no model is built).

    These are the matrices ``text_encoder.get_input_embeddings().weight`` of :func:`load_single_file` holds; for
    T5-XXL the table of the model ComfyUI builds from the file (:mod:`.t5_file`: fp8-rounded for an fp8 file).
    """
    p = safetensors_checkpoint(path)
    try:
        header = read_header(p)
    except WeightsError as e:
        raise PipelineError(str(e)) from None
    t5 = t5_layout(header)
    if t5 is not None:
        return "flux", {"t5xxl": t5_input_embeddings(p, header, t5)}
    backbone = detect_backbone(header.tensors, p.name)
    keys = {"sd15": {"clip_l": TEXT_PREFIX + "embeddings.token_embedding.weight"},
            "sdxl": {"clip_l": SDXL_TEXT_PREFIX + "embeddings.token_embedding.weight",
                     "clip_g": SDXL_TEXT2_PREFIX + "token_embedding.weight"}}[backbone.family]
    missing = [k for k in keys.values() if k not in header.tensors]
    if missing:
        raise PipelineError(f"{p.name}: no text-encoder token embeddings ({missing[0]}); a full "
                            f"{backbone.label} checkpoint is needed")
    reader = SafeReader(p, header)
    try:
        return backbone.family, {enc: reader.tensor(key) for enc, key in keys.items()}
    finally:
        reader.close()


# ---------------------------------------------------------------------------------------------- loading
def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` checkpoint (pickle files are refused: they can run code)."""
    p = safetensors_checkpoint(path)
    try:
        return load_all(p)[0]
    except WeightsError as e:
        raise PipelineError(f"{p.name}: {e}") from None


def config_files(config_dir: str | os.PathLike | None = None, family: str = "sd15") -> dict[str, Path]:
    """The component config files of ``config_dir`` (default: the shipped set of ``family``), checked to exist.

    SDXL adds ``text_encoder_2``.
    """
    root = Path(config_dir) if config_dir is not None else SHIPPED_CONFIGS[family]
    names = dict(CONFIG_FILES, text_encoder_2=TEXT2_CONFIG) if family == "sdxl" else CONFIG_FILES
    files = {name: root / fname for name, fname in names.items()}
    missing = [f.name for f in files.values() if not f.is_file()]
    if missing:
        raise PipelineError(f"{root}: missing component config(s) {', '.join(missing)}")
    return files


def load_single_file(path: str | os.PathLike | dict, config_dir: str | os.PathLike | None = None,
                     dtype: torch.dtype = torch.float32) -> SingleFileParts:
    """Load UNet, VAE and text encoder(s) from one LDM-layout checkpoint, offline.

    Args:
        path: a ``.safetensors`` SD1.5, SDXL or inpainting checkpoint of either, or its state dict.
        config_dir: folder with the component configs (default: ``assets/sd15`` or ``assets/sdxl``, by the
            backbone detected from the file).
        dtype: dtype of the loaded weights.

    Returns:
        The :class:`SingleFileParts`.

    Raises:
        PipelineError: not a safetensors file, another family (named), or shapes that do not fit.
    """
    # optional dependency: diffusers, transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    checkpoint = path if isinstance(path, dict) else read_checkpoint(path)
    name = "checkpoint" if isinstance(path, dict) else Path(path).name
    b = detect_backbone(checkpoint, name)
    if b.kind != "unet":
        raise PipelineError(f"{name}: a {b.label} file; load it with ProductBGPipeline.from_single_file (which reads "
                            f"Flux.1's layouts), not as a Stable Diffusion checkpoint")
    files = config_files(config_dir, b.family)
    unet_cfg = files["unet_inpaint" if _in_channels(checkpoint, name) == 9 else "unet"]

    kw: dict[str, Any] = dict(local_files_only=True, torch_dtype=dtype)
    text_encoder_2 = None
    try:
        with quiet_loading():
            unet = UNet2DConditionModel.from_single_file(checkpoint, config=str(unet_cfg), **kw)
            vae = AutoencoderKL.from_single_file(checkpoint, config=str(files["vae"]), **kw)
            text_encoder = create_diffusers_clip_model_from_ldm(
                CLIPTextModel, checkpoint, config=str(files["text_encoder"]), torch_dtype=dtype,
                local_files_only=True)
            if b.family == "sdxl":
                text_encoder_2 = create_diffusers_clip_model_from_ldm(
                    CLIPTextModelWithProjection, checkpoint, config=str(files["text_encoder_2"]),
                    torch_dtype=dtype, local_files_only=True)
    except (RuntimeError, KeyError, ValueError) as e:
        raise PipelineError(f"{name}: does not fit the {b.label} component configs in {unet_cfg.parent} "
                            f"({str(e).splitlines()[0][:300]})") from None
    models = {"UNet": unet, "VAE": vae, "text encoder": text_encoder, "second text encoder": text_encoder_2}
    for what, model in models.items():
        missing = [n for n, t in (model.state_dict().items() if model is not None else ()) if t.is_meta]
        if missing:
            raise PipelineError(f"{name}: the {what} lacks {len(missing)} tensors of the {b.label} configs in "
                                f"{unet_cfg.parent} (e.g. {missing[0]})")
    scheduler = json.loads(files["scheduler"].read_text(encoding="utf-8"))
    return SingleFileParts(unet.eval(), vae.eval(), text_encoder.eval(), scheduler,
                           text_encoder_2.eval() if text_encoder_2 is not None else None, b.family)


def _in_channels(checkpoint: dict[str, torch.Tensor], name: str) -> int:
    weight = checkpoint.get(UNET_IN_KEY)
    if weight is None or weight.ndim != 4:
        hint = ("it looks like a LoRA or embedding, not a full model" if not any(k.startswith(UNET_PREFIX)
                for k in checkpoint) else "its first UNet convolution is missing")
        raise PipelineError(f"{name}: not a Stable Diffusion checkpoint in the original layout ({hint}; "
                            f"expected tensor {UNET_IN_KEY})")
    if weight.shape[1] not in (4, 9):
        raise PipelineError(f"{name}: UNet takes {weight.shape[1]} input channels; SD1.5 and SDXL have 4, their "
                            "inpainting variants 9")
    return int(weight.shape[1])


# ---------------------------------------------------------------------------------------------- writing
def _rename(key: str, pairs: tuple[tuple[str, str], ...]) -> str:
    parts = key.split(".")
    for new, old in pairs:
        n = new.split(".")
        if parts[:len(n)] == n:
            return ".".join(old.split(".") + parts[len(n):])
    return key


def _unet_key(key: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    stem, leaf = key.rsplit(".", 1)
    if stem in top:
        return f"{top[stem]}.{leaf}"
    p = key.split(".")
    per = layers_per_block + 1
    if p[0] == "mid_block":
        index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{p[1]}.{p[2]}"]
        rest = ".".join(p[3:])
        return f"middle_block.{index}.{_rename(rest, _RESNET) if p[1] == 'resnets' else rest}"
    block, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
    if p[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * per}.0.op.{rest.removeprefix('conv.')}"
        slot = 0 if kind == "resnets" else 1
        return f"input_blocks.{1 + block * per + j}.{slot}.{_rename(rest, _RESNET) if slot == 0 else rest}"
    if kind == "upsamplers":
        return f"output_blocks.{block * per + layers_per_block}.{2 if up_has_attention[block] else 1}.{rest}"
    slot = 0 if kind == "resnets" else 1
    return f"output_blocks.{block * per + j}.{slot}.{_rename(rest, _RESNET) if slot == 0 else rest}"


def _vae_key(key: str, blocks: int) -> str:
    simple = {"conv_norm_out": "norm_out"}
    p = key.split(".")
    coder, part = p[0], p[1]
    if part in ("conv_in", "conv_out") or coder in ("quant_conv", "post_quant_conv"):
        return key
    if part in simple:
        return ".".join([coder, simple[part]] + p[2:])
    if part == "mid_block":
        if p[2] == "attentions":
            return ".".join([coder, "mid.attn_1", _rename(".".join(p[4:]), _VAE_ATTN)])
        return ".".join([coder, f"mid.block_{int(p[3]) + 1}", _rename(".".join(p[4:]), (("conv_shortcut", "nin_shortcut"),))])
    level = int(p[2]) if part == "down_blocks" else blocks - 1 - int(p[2])
    name = "down" if part == "down_blocks" else "up"
    if p[3] in ("downsamplers", "upsamplers"):
        return ".".join([coder, f"{name}.{level}", "downsample" if name == "down" else "upsample"] + p[5:])
    rest = _rename(".".join(p[5:]), (("conv_shortcut", "nin_shortcut"),))
    return ".".join([coder, f"{name}.{level}.block.{p[4]}", rest])


def _open_clip_state(text_encoder_2: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModelWithProjection`` in OpenCLIP's layout (SDXL's ``conditioner.embedders.1.model``):
    fused q/k/v ``in_proj``, ``resblocks``, ``ln_*``, ``c_fc`` / ``c_proj`` and a transposed projection."""
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder_2.state_dict().items()}
    out = {"positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "text_projection": sd.pop("text_projection.weight").T}
    rename = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
              "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(int(text_encoder_2.config.num_hidden_layers)):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat([sd.pop(f"{src}self_attn.{p}_proj.{leaf}") for p in "qkv"])
            for new, old in rename.items():
                out[f"{dst}{old}.{leaf}"] = sd.pop(f"{src}{new}.{leaf}")
    for leaf in ("weight", "bias"):
        out[f"ln_final.{leaf}"] = sd.pop(f"final_layer_norm.{leaf}")
    sd.pop("embeddings.position_ids", None)
    if sd:
        raise ValueError(f"OpenCLIP layout: unexpected text-encoder tensors {sorted(sd)[:3]}")
    return out


def ldm_state_dict(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                   text_encoder_2: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The components as one state dict in the original (LDM) single-file layout.

    With ``text_encoder_2`` the layout is SDXL's: CLIP-L under ``conditioner.embedders.0.transformer``,
    OpenCLIP-G under ``conditioner.embedders.1.model``. VAE attention projections are written as 1×1
    convolutions, as in the released SD1.5 files.
    """
    out: dict[str, torch.Tensor] = {}
    lpb = int(unet.config.layers_per_block)
    up_attn = ["CrossAttn" in t for t in unet.config.up_block_types]
    for k, v in unet.state_dict().items():
        out[UNET_PREFIX + _unet_key(k, lpb, up_attn)] = v
    out.update({VAE_PREFIX + k: v for k, v in ldm_vae_state_dict(vae).items()})
    prefix = TEXT_PREFIX if text_encoder_2 is None else SDXL_TEXT_PREFIX
    for k, v in text_encoder.state_dict().items():
        out[prefix + k.removeprefix("text_model.")] = v
    if text_encoder_2 is not None:
        out.update({SDXL_TEXT2_PREFIX + k: v for k, v in _open_clip_state(text_encoder_2).items()})
    return {k: v.detach().contiguous() for k, v in out.items()}


def ldm_vae_state_dict(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL``'s state dict in the original (LDM) names, without a prefix (Flux's
    ``ae.safetensors`` layout); attention projections as 1×1 convolutions, as in the released files."""
    out: dict[str, torch.Tensor] = {}
    blocks = len(vae.config.down_block_types)
    for k, v in vae.state_dict().items():
        key = _vae_key(k, blocks)
        if ".mid.attn_1." in key and key.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out[key] = v
    return out


def save_single_file(path: str | os.PathLike, unet: torch.nn.Module, vae: torch.nn.Module,
                     text_encoder: torch.nn.Module, dtype: torch.dtype | None = None,
                     text_encoder_2: torch.nn.Module | None = None) -> Path:
    """Write the components as an LDM-layout ``.safetensors`` checkpoint, atomically.

    Args:
        path: destination file.
        unet, vae, text_encoder: the diffusers / transformers modules.
        dtype: cast floating tensors to this dtype (e.g. ``torch.float16``); default keep.
        text_encoder_2: SDXL's second text encoder (writes the SDXL layout).

    Returns:
        The path written.
    """
    tensors = ldm_state_dict(unet, vae, text_encoder, text_encoder_2)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return atomic_save(tensors, path, {"format": "pt"})


def write_config_dir(folder: str | os.PathLike, unet: torch.nn.Module, vae: torch.nn.Module,
                     text_encoder: torch.nn.Module, scheduler_config: dict | None = None,
                     text_encoder_2: torch.nn.Module | None = None) -> Path:
    """Write the component configs of a model (the layout of ``assets/sd15``, or ``assets/sdxl`` with
    ``text_encoder_2``) to ``folder``.

    Used to load small or custom single-file models offline, the same way the shipped SD1.5 set is used.
    """
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    unet_cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    configs = {"unet": dict(unet_cfg, in_channels=4), "unet_inpaint": dict(unet_cfg, in_channels=9),
               "vae": {k: v for k, v in dict(vae.config).items() if not k.startswith("_")},
               "text_encoder": text_encoder.config.to_dict(),
               "scheduler": scheduler_config or json.loads((SD15_CONFIGS / CONFIG_FILES["scheduler"]).read_text())}
    configs["unet"]["_class_name"] = configs["unet_inpaint"]["_class_name"] = "UNet2DConditionModel"
    configs["vae"]["_class_name"] = "AutoencoderKL"
    names = dict(CONFIG_FILES)
    if text_encoder_2 is not None:
        configs["text_encoder_2"], names["text_encoder_2"] = text_encoder_2.config.to_dict(), TEXT2_CONFIG
    for name, cfg in configs.items():
        (root / names[name]).write_text(json.dumps(cfg, indent=1, default=list), encoding="utf-8")
    return root
