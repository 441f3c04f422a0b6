"""Writing what the trainers produce, through the ``weights`` package's formats.

* Category bank: :class:`productbg.weights.bank.CategoryBank` for real SD1.5 widths (768). The bank format
  fixes the width per family, so banks of the tiny test models (width 32) are written by
  :func:`save_bank` in the same layout with ``productbg.family = "tiny"`` and read back by
  :func:`read_bank_vectors` (a thin adapter until the bank accepts other widths).
* UNet LoRA: peft's state dict → :class:`productbg.weights.lora.LoraModule` → kohya names
  (:func:`productbg.weights.lora.to_kohya`), the layout ComfyUI's LoraLoader reads.
* Style encoder: :meth:`productbg.weights.style_encoder.StyleEncoder.save`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..weights.bank import BANK_KIND, ENCODER_WIDTHS, META, SCHEMA_VERSION, CategoryBank, CategoryLora
from ..weights.lora import LoraModule, to_kohya
from ..weights.safefile import atomic_save, load_all

TINY_FAMILY = "tiny"


def save_bank(path: Path, names: Sequence[str], vectors: torch.Tensor, template: str,
              training: Mapping[str, Any] | None = None, loras: Mapping[str, CategoryLora] | None = None) -> Path:
    """Write identifier vectors ``[categories, vectors, width]`` as a category bank.

    Args:
        path: destination ``.safetensors``.
        names: category names, row order.
        vectors: the trained vectors.
        template: the prompt template they were trained with.
        training: provenance stored in the bank.
        loras: optional per-category LoRAs.
    """
    vectors = vectors.detach().float().cpu()
    if vectors.shape[-1] == ENCODER_WIDTHS["clip_l"]:
        bank = CategoryBank(vectors_per_id=vectors.shape[1], template=template, training=training)
        for name, v in zip(names, vectors):
            bank.add(name, v, lora=(loras or {}).get(name))
        return bank.save(path)
    meta = {"format": "pt", META + "kind": BANK_KIND, META + "schema": str(SCHEMA_VERSION),
            META + "family": TINY_FAMILY, META + "categories": json.dumps(list(names), ensure_ascii=False),
            META + "template": template, META + "vectors_per_id": str(vectors.shape[1])}
    if training:
        meta[META + "training"] = json.dumps(dict(training), ensure_ascii=False, default=str)
    return atomic_save({"clip_l": vectors.contiguous()}, path, meta)


def read_bank_vectors(path: Path) -> tuple[list[str], torch.Tensor]:
    """(names, ``[categories, vectors, width]``) of a bank written by :func:`save_bank` (any width)."""
    tensors, header = load_all(path)
    if header.metadata.get(META + "family") != TINY_FAMILY:
        with CategoryBank.load(path) as bank:
            return bank.names, bank.tensors()["clip_l"].clone()
    return json.loads(header.metadata[META + "categories"]), tensors["clip_l"]


def peft_lora_modules(peft_state: Mapping[str, torch.Tensor], alpha: float, component: str = "unet") -> list[LoraModule]:
    """LoRA modules from ``get_peft_model_state_dict`` output (``<path>.lora_A.weight`` / ``lora_B``)."""
    downs = {k[: -len(".lora_A.weight")]: v for k, v in peft_state.items() if k.endswith(".lora_A.weight")}
    ups = {k[: -len(".lora_B.weight")]: v for k, v in peft_state.items() if k.endswith(".lora_B.weight")}
    if set(downs) != set(ups) or not downs:
        raise ValueError("peft state dict has unmatched or no lora_A / lora_B tensors")
    return [LoraModule(component, path, downs[path].detach().float().cpu().contiguous(),
                       ups[path].detach().float().cpu().contiguous(), torch.tensor(float(alpha)))
            for path in sorted(downs)]


def save_kohya_lora(path: Path, modules: list[LoraModule], training: Mapping[str, Any] | None = None) -> Path:
    """Write LoRA modules in the kohya layout (ComfyUI ``models/loras``), atomically."""
    meta = {"productbg.training": json.dumps(dict(training or {}), ensure_ascii=False, default=str)}
    tensors, meta = to_kohya(modules, meta)
    return atomic_save(tensors, path, meta)
