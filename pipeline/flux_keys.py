"""Flux.1 tensor names: Black Forest Labs' layout (the files ComfyUI loads) ↔ diffusers' ``FluxTransformer2DModel``.

BFL files name the transformer ``double_blocks.N.img_attn.qkv`` … (``flux1-dev.safetensors``,
``flux1-fill-dev.safetensors`` in ``models/diffusion_models``), optionally under ``model.diffusion_model.`` (ComfyUI's
single-file "checkpoint" layout, which also bundles ``text_encoders.t5xxl.transformer.*``,
``text_encoders.clip_l.transformer.*`` and ``vae.*``). diffusers splits the fused projections: ``qkv`` into
``to_q/to_k/to_v`` (``add_*_proj`` for text), a single block's ``linear1`` into q, k, v and ``proj_mlp``, and its
final ``adaLN_modulation`` is (scale, shift) where BFL's is (shift, scale).

diffusers' own ``convert_flux_transformer_checkpoint_to_diffusers`` fixes the width at 3072; this mapping reads it
from the tensors, so the tiny test models use the very same code as the published files (a test checks the two agree
at full width). :func:`diffusers_to_bfl` is the inverse, for writing files ComfyUI loads.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

DIFFUSION_PREFIX = "model.diffusion_model."
T5_PREFIX = "text_encoders.t5xxl.transformer."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
VAE_PREFIX = "vae."

#: (BFL, diffusers) for tensors renamed as they are (``.weight`` / ``.bias`` appended).
_TOP = (("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
        ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
        ("txt_in", "context_embedder"), ("img_in", "x_embedder"), ("final_layer.linear", "proj_out"))
_DOUBLE = (("img_mod.lin", "norm1.linear"), ("txt_mod.lin", "norm1_context.linear"),
           ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"),
           ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
           ("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"))
_DOUBLE_NORMS = (("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
                 ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
                 ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
                 ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"))
_DOUBLE_QKV = (("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
               ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")))
_SINGLE = (("modulation.lin", "norm.linear"), ("linear2", "proj_out"))
_SINGLE_NORMS = (("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight"))
_SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
_FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")


def strip_prefix(keys: Iterable[str]) -> str:
    """``model.diffusion_model.`` when the transformer's keys carry it (ComfyUI's checkpoint layout), else ``""``."""
    return DIFFUSION_PREFIX if any(k.startswith(DIFFUSION_PREFIX + "double_blocks.") for k in keys) else ""


def block_counts(keys: Iterable[str]) -> tuple[int, int]:
    """(double, single) blocks of a BFL-layout transformer, counted from its keys as ComfyUI counts them (the
    highest block number + 1 of each kind; ``model.diffusion_model.`` ignored)."""
    double, single = -1, -1
    for k in keys:
        k = k.removeprefix(DIFFUSION_PREFIX)
        head, _, rest = k.partition(".")
        if head in ("double_blocks", "single_blocks"):
            n = int(rest.split(".", 1)[0])
            if head == "double_blocks":
                double = max(double, n)
            else:
                single = max(single, n)
    return double + 1, single + 1


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _pairs(double: int, single: int):
    """Every (BFL name, diffusers name) renamed as is (without ``.weight`` / ``.bias``), and the norm scales."""
    for bfl, ours in _TOP:
        yield bfl, ours
    for i in range(double):
        for bfl, ours in _DOUBLE:
            yield f"double_blocks.{i}.{bfl}", f"transformer_blocks.{i}.{ours}"
    for i in range(single):
        for bfl, ours in _SINGLE:
            yield f"single_blocks.{i}.{bfl}", f"single_transformer_blocks.{i}.{ours}"


def bfl_modules(double: int, single: int, guidance: bool = True) -> list[str]:
    """Every linear module of a BFL-layout transformer (names without ``.weight`` / ``.bias``): the renamed ones, the
    fused ``qkv`` / ``linear1`` and the final modulation, in file order of :func:`bfl_to_diffusers`.

    Args:
        double, single: the block counts (:func:`block_counts`).
        guidance: include ``guidance_in.*`` (dev and Fill; schnell has none).
    """
    names = [bfl for bfl, _ in _pairs(double, single) if guidance or not bfl.startswith("guidance_in.")]
    names += [f"double_blocks.{i}.{bfl}" for i in range(double) for bfl, _ in _DOUBLE_QKV]
    names += [f"single_blocks.{i}.linear1" for i in range(single)]
    return names + [_FINAL_MOD[0]]


def split_rows(module: str, rows: torch.Tensor, inner: int) -> dict[str, torch.Tensor]:
    """The diffusers modules a BFL module's output rows belong to, with their rows: a weight, a bias, or a LoRA's
    ``lora_up`` (whose rows split the way the weight's do). ``qkv`` splits into three equal parts, a single block's
    ``linear1`` into q, k, v (``inner`` rows each) and ``proj_mlp``, the final modulation swaps its halves; anything
    else is renamed.

    Args:
        module: a BFL module name from :func:`bfl_modules` (no ``model.diffusion_model.``, no ``.weight``).
        rows: ``[out, ...]``.
        inner: the transformer's width (heads × head dim).

    Raises:
        KeyError: a name that is no linear module of a Flux.1 transformer.
    """
    if module == _FINAL_MOD[0]:
        return {_FINAL_MOD[1]: _swap_halves(rows)}
    head, _, rest = module.partition(".")
    if head in ("double_blocks", "single_blocks"):
        index, _, name = rest.partition(".")
        if index.isdigit():
            if head == "double_blocks":
                ours = dict(_DOUBLE).get(name)
                fused = dict(_DOUBLE_QKV).get(name)
                if fused is not None:
                    return {f"transformer_blocks.{index}.{n}": part for n, part in zip(fused, rows.chunk(3, dim=0))}
                if ours is not None:
                    return {f"transformer_blocks.{index}.{ours}": rows}
            else:
                if name == "linear1":
                    sizes = (inner, inner, inner, rows.shape[0] - 3 * inner)
                    return {f"single_transformer_blocks.{index}.{n}": part
                            for n, part in zip(_SINGLE_FUSED, rows.split(sizes, dim=0))}
                ours = dict(_SINGLE).get(name)
                if ours is not None:
                    return {f"single_transformer_blocks.{index}.{ours}": rows}
    ours = dict(_TOP).get(module)
    if ours is None:
        raise KeyError(f"'{module}' is no linear module of a Flux.1 transformer")
    return {ours: rows}


def bfl_to_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL-layout transformer state dict (``model.diffusion_model.`` stripped or not) in diffusers' names.

    Raises:
        KeyError: a tensor a Flux transformer must have is missing (names it).
        ValueError: tensors left over that a Flux transformer does not have (names the first).
    """
    prefix = strip_prefix(state)
    src = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    double, single = block_counts(src)
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise KeyError(f"the Flux transformer has no '{prefix}{name}'")
        return src.pop(name)

    if "img_in.weight" not in src:
        take("img_in.weight")  # raises, naming it
    inner = int(src["img_in.weight"].shape[0])
    for module in bfl_modules(double, single, guidance=any(k.startswith("guidance_in.") for k in src)):
        for suffix in (".weight", ".bias"):
            for ours, part in split_rows(module, take(module + suffix), inner).items():
                out[ours + suffix] = part
    for i in range(double):
        for bfl, ours in _DOUBLE_NORMS:
            out[f"transformer_blocks.{i}.{ours}"] = take(f"double_blocks.{i}.{bfl}")
    for i in range(single):
        for bfl, ours in _SINGLE_NORMS:
            out[f"single_transformer_blocks.{i}.{ours}"] = take(f"single_blocks.{i}.{bfl}")
    if src:
        raise ValueError(f"the Flux transformer has a tensor '{prefix}{next(iter(src))}' that Flux.1 does not have")
    return out


def diffusers_to_bfl(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of :func:`bfl_to_diffusers`: a diffusers ``FluxTransformer2DModel`` state dict in BFL names
    (under ``prefix``, e.g. ``model.diffusion_model.`` for ComfyUI's checkpoint layout)."""
    src = dict(state)
    double = len({k.split(".")[1] for k in src if k.startswith("transformer_blocks.")})
    single = len({k.split(".")[1] for k in src if k.startswith("single_transformer_blocks.")})
    out: dict[str, torch.Tensor] = {}
    for bfl, ours in _pairs(double, single):
        for suffix in (".weight", ".bias"):
            if ours + suffix in src:
                out[bfl + suffix] = src.pop(ours + suffix)
    for i in range(double):
        for bfl, ours in _DOUBLE_NORMS:
            out[f"double_blocks.{i}.{bfl}"] = src.pop(f"transformer_blocks.{i}.{ours}")
        for bfl, names in _DOUBLE_QKV:
            for suffix in (".weight", ".bias"):
                out[f"double_blocks.{i}.{bfl}{suffix}"] = torch.cat(
                    [src.pop(f"transformer_blocks.{i}.{n}{suffix}") for n in names], dim=0)
    for i in range(single):
        for bfl, ours in _SINGLE_NORMS:
            out[f"single_blocks.{i}.{bfl}"] = src.pop(f"single_transformer_blocks.{i}.{ours}")
        for suffix in (".weight", ".bias"):
            out[f"single_blocks.{i}.linear1{suffix}"] = torch.cat(
                [src.pop(f"single_transformer_blocks.{i}.{n}{suffix}") for n in _SINGLE_FUSED], dim=0)
    for suffix in (".weight", ".bias"):
        out[_FINAL_MOD[0] + suffix] = _swap_halves(src.pop(_FINAL_MOD[1] + suffix))
    if src:
        raise ValueError(f"a diffusers Flux tensor without a BFL name: {next(iter(src))}")
    return {prefix + k: v for k, v in out.items()}
