"""Flux.1's T5-XXL text encoder as ComfyUI users have it, read for its token input embeddings (no model built).

The files: ``models/text_encoders/t5xxl_fp16.safetensors`` or ``t5xxl_fp8_e4m3fn.safetensors`` (keys
``shared.weight`` [32128, 4096] + ``encoder.block.N...``; a ``scaled_fp8`` marker in the "scaled" fp8 files), or a
Flux.1 single-file checkpoint that bundles them under ``text_encoders.t5xxl.transformer.``.
:func:`t5_layout` tells such a file from its header (T5-XXL v1.1: the gated ``wi_1`` FFN of 4096 inputs at block
23, a 32,128 x 4096 embedding) and refuses, in one line saying what to pass, other T5 sizes (T5-XL, T5-base,
T5 v1.0 XXL, UMT5), a Flux.1 transformer without text encoders, and a lone CLIP text-encoder file.

**The embeddings are those of the model ComfyUI builds from the file**, not the file's bytes. ComfyUI 0.3.75
(``comfy/sd.py`` ``t5xxl_detect`` -> ``text_encoders/sd3_clip.py`` ``t5_xxl_detect``) takes the T5's weight dtype
from ``encoder.final_layer_norm.weight`` and passes it through ``model_management.pick_weight_dtype`` with the
text-encoder dtype (fp16 unless ComfyUI was started with ``--fp*-text-enc``) as the fallback: the file's dtype,
unless it is wider than fp16 (an fp32 file gives an fp16 model). The whole T5, ``shared`` (the
``operations.Embedding`` of ``text_encoders/t5.py``) included, is built in that dtype and ``load_state_dict``
copies the file's tensors into it, so the fp16 ``shared.weight`` of ``t5xxl_fp8_e4m3fn.safetensors`` becomes an
fp8 e4m3fn table on load, and the lookup (``get_input_embeddings()(ids, out_dtype=torch.float32)``) returns the
fp8-rounded values. The ``scaled_fp8`` files change only the linear layers (``ops.scaled_fp8_ops``); the
embedding is still built in that dtype. :func:`t5_input_embeddings` mirrors this: the table is cast to the
model's dtype with the same torch conversion ``load_state_dict`` does, then ``nan_to_num``'d as ``T5.forward``
does for an fp8 model, and returned in a dtype that holds those values exactly (fp16 for fp8, which it contains).
A bank made from the file's own fp16 rows would encode differently from the same words in ComfyUI.

Assumed: ComfyUI's default text-encoder dtype and a device that holds fp8 (CUDA, CPU). ComfyUI on Apple MPS or
DirectML cannot cast to fp8 and builds the T5 in fp16; there the file's fp16 rows are the model's, and a bank made
here differs from them by the fp8 rounding (what :func:`rounding_note` records in the bank says so).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .. import backbones
from ..weights.errors import WeightsError
from ..weights.safefile import Header, SafeReader, TensorInfo
from .errors import PipelineError

#: Where a T5-XXL's tensors sit: a text-encoder file (top level), a Flux.1 single-file checkpoint.
T5_PREFIXES = {"": "T5-XXL text encoder", "text_encoders.t5xxl.transformer.": "Flux.1 checkpoint's T5-XXL"}
EMBEDDING = "shared.weight"
T5_XXL_SHAPE = (32128, 4096)
#: ComfyUI's T5-XXL test (``comfy/sd.py`` ``detect_te_model``): the gated FFN of block 23, 4096 inputs.
XXL_KEY = "encoder.block.23.layer.1.DenseReluDense.wi_1.weight"
#: T5 v1.0 XXL (Cosmos' encoder): one FFN input (``wi``), not gated.
OLD_XXL_KEY = "encoder.block.23.layer.1.DenseReluDense.wi.weight"
ANY_T5_KEY = "encoder.block.0.layer.0.SelfAttention.k.weight"
#: The tensor whose dtype ComfyUI builds the T5 in (``sd3_clip.t5_xxl_detect``).
DTYPE_KEY = "encoder.final_layer_norm.weight"
SCALED_FP8_KEY = "scaled_fp8"
#: ComfyUI's text-encoder dtype (``model_management.text_encoder_dtype``) without ``--fp*-text-enc`` flags.
COMFY_TEXT_ENCODER_DTYPE = torch.float16
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F16": torch.float16, "BF16": torch.bfloat16,
    "F32": torch.float32, "F64": torch.float64,
}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
PASS_T5 = ("pass Flux.1's T5-XXL text encoder: --checkpoint models/text_encoders/t5xxl_fp16.safetensors "
           "(or t5xxl_fp8_e4m3fn.safetensors)")


@dataclass(frozen=True)
class T5Layout:
    """Where a T5-XXL sits in a file and what ComfyUI builds from it.

    Attributes:
        prefix: key prefix of the T5's tensors ("" in a text-encoder file).
        what: what the file is, for messages.
        file_dtype: dtype of the file's ``shared.weight``.
        model_dtype: the dtype ComfyUI builds the T5 (and so its embedding table) in.
        scaled_fp8: whether the file has ComfyUI's ``scaled_fp8`` marker.
    """

    prefix: str
    what: str
    file_dtype: torch.dtype
    model_dtype: torch.dtype
    scaled_fp8: bool = False


def comfy_t5_dtype(final_norm_dtype: torch.dtype | None,
                   fallback: torch.dtype = COMFY_TEXT_ENCODER_DTYPE) -> torch.dtype:
    """ComfyUI's ``pick_weight_dtype(dtype_t5, text_encoder_dtype, device)`` on a device that casts to fp8:
    the final layer norm's dtype, unless it is missing or wider than the fallback."""
    if final_norm_dtype is None or final_norm_dtype.itemsize > fallback.itemsize:
        return fallback
    return final_norm_dtype


def _dtype(info: TensorInfo, key: str, name: str) -> torch.dtype:
    if info.dtype not in TORCH_DTYPES:
        raise PipelineError(f"{name}: tensor '{key}' has dtype {info.dtype}; a T5-XXL's are floating point")
    return TORCH_DTYPES[info.dtype]


def t5_layout(header: Header) -> T5Layout | None:
    """The T5-XXL of a file, from its header; None when the file holds no T5 and is none of the refused kinds
    (an SD1.5 / SDXL checkpoint: its own loader takes it).

    Raises:
        PipelineError: another T5 (XL, base, v1.0, UMT5), a Flux.1 transformer without text encoders, a lone CLIP
            text encoder, or a checkpoint of another family bundling a T5 (SD3): one line saying what to pass.
    """
    tensors, name = header.tensors, header.path.name
    for prefix, what in T5_PREFIXES.items():
        if prefix + ANY_T5_KEY not in tensors and prefix + EMBEDDING not in tensors:
            continue
        if prefix:
            _check_flux_checkpoint(tensors, name)
        _check_xxl(tensors, prefix, name)
        file_dtype = _dtype(tensors[prefix + EMBEDDING], prefix + EMBEDDING, name)
        norm = tensors.get(prefix + DTYPE_KEY)
        norm_dtype = _dtype(norm, prefix + DTYPE_KEY, name) if norm is not None else None
        return T5Layout(prefix, what, file_dtype, comfy_t5_dtype(norm_dtype), prefix + SCALED_FP8_KEY in tensors)
    _refuse_other_flux_files(tensors, name)
    return None


def _check_flux_checkpoint(tensors: Mapping[str, TensorInfo], name: str) -> None:
    """A single file bundling a T5 under ``text_encoders.``: Flux.1 (dev, schnell, Fill) is taken; SD3 and Flux
    relatives are refused by name."""
    try:
        found = backbones.from_checkpoint_keys(tensors, host="comfyui")
    except backbones.BackboneError as e:
        raise PipelineError(f"{name}: {e}; for a flux bank {PASS_T5}") from None
    if found is None or found.family != "flux":
        raise PipelineError(f"{name}: a checkpoint with a T5-XXL that is not Flux.1's; {PASS_T5}")


def _check_xxl(tensors: Mapping[str, TensorInfo], prefix: str, name: str) -> None:
    wi = tensors.get(prefix + XXL_KEY)
    other = None
    if wi is None:
        if prefix + OLD_XXL_KEY in tensors:
            other = "T5 v1.0 XXL (not gated: Cosmos' text encoder)"
        elif prefix + ANY_T5_KEY in tensors:
            k = tensors[prefix + ANY_T5_KEY].shape
            other = f"smaller T5 (attention {k[0] if k else '?'} wide, fewer than 24 blocks: T5-base, ByT5 ...)"
    elif len(wi.shape) != 2 or wi.shape[-1] != T5_XXL_SHAPE[1]:
        other = f"T5 of width {wi.shape[-1] if wi.shape else '?'} (T5-XL: AuraFlow's)"
    emb = tensors.get(prefix + EMBEDDING)
    if other is None and emb is not None and tuple(emb.shape) != T5_XXL_SHAPE:
        other = (f"T5 whose embedding is {list(emb.shape)}, not T5-XXL v1.1's {list(T5_XXL_SHAPE)}"
                 + (" (UMT5-XXL: Wan's)" if emb.shape and emb.shape[0] > T5_XXL_SHAPE[0] else ""))
    if other is not None:
        raise PipelineError(f"{name}: this is a {other} text encoder, not Flux.1's T5-XXL v1.1; {PASS_T5}")
    if emb is None:
        raise PipelineError(f"{name}: a T5-XXL without its token embeddings ('{prefix}{EMBEDDING}'); {PASS_T5}")


def _refuse_other_flux_files(tensors: Mapping[str, TensorInfo], name: str) -> None:
    """Files a Flux.1 user may pass by mistake: the transformer alone, a CLIP text encoder alone."""
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in tensors):
        raise PipelineError(f"{name}: this is a Flux.1 transformer (models/diffusion_models) without text encoders; "
                            f"a flux bank holds T5-XXL vectors: {PASS_T5}")
    if any(k.startswith("text_model.encoder.layers.") for k in tensors):
        raise PipelineError(f"{name}: this is a CLIP text encoder alone; a flux bank holds T5-XXL vectors (Flux's "
                            f"CLIP-L only pools): {PASS_T5}; an SD1.5 or SDXL bank needs the full checkpoint")


def t5_input_embeddings(path: str | os.PathLike, header: Header, layout: T5Layout) -> torch.Tensor:
    """The [32128, 4096] token-embedding table of the T5 ComfyUI builds from the file (see the module notes):
    ``shared.weight`` cast to the model's dtype, ``nan_to_num``'d when that is fp8, in fp16 / bf16 / fp32 (a dtype
    that holds every value exactly)."""
    key = layout.prefix + EMBEDDING
    try:
        with SafeReader(path, header) as reader:
            table = reader.tensor(key)
    except WeightsError as e:
        raise PipelineError(str(e)) from None
    held = table.to(layout.model_dtype)  # what load_state_dict's copy_ into the model's parameter gives
    del table
    if layout.model_dtype in FP8:
        half = held.to(torch.float16)  # exact: fp16 holds every finite e4m3fn and e5m2 value
        if bool(torch.isfinite(half).all()):
            return half
        return torch.nan_to_num(held.to(torch.float32))  # T5.forward's "Fix for fp8 T5", on its float32 input
    return held


def rounding_note(layout: T5Layout) -> dict[str, str | bool]:
    """What the bank's ``training`` metadata records about the embeddings: the file's and the model's dtypes."""
    name = {v: k for k, v in TORCH_DTYPES.items()}
    note: dict[str, str | bool] = {"file_dtype": name[layout.file_dtype], "model_dtype": name[layout.model_dtype],
                                   "scaled_fp8": layout.scaled_fp8}
    if layout.model_dtype != layout.file_dtype:
        note["rounding"] = (f"shared.weight ({name[layout.file_dtype]}) rounded through {name[layout.model_dtype]}, "
                            "the dtype ComfyUI builds this T5 in (from encoder.final_layer_norm.weight; fp16 text-"
                            "encoder default, a device that holds fp8): the vectors its embedding lookup returns")
    return note
