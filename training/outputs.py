"""Writing what the trainers produce, through the ``weights`` package's formats.

* Category bank: :class:`productbg.weights.bank.CategoryBank`, family "sd15" for SD1.5's text width (768) and
  family "tiny" (width recorded in the file) for the small test/demo models (width 32 or 64).
  :func:`set_category_lora` names a single-category run's LoRA in its bank.
* UNet LoRA: peft's state dict → :class:`productbg.weights.lora.LoraModule` → kohya names
  (:func:`productbg.weights.lora.to_kohya`), the layout ComfyUI's LoraLoader reads.
* Style encoder: :meth:`productbg.weights.style_encoder.StyleEncoder.save`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..weights.bank import ENCODER_WIDTHS, TINY_FAMILY, CategoryBank, CategoryLora
from ..weights.bank_format import TINY_SDXL_FAMILY
from ..weights.lora import LoraModule, to_kohya
from ..weights.safefile import atomic_save


def save_bank(path: Path, names: Sequence[str], vectors: torch.Tensor | Mapping[str, torch.Tensor], template: str,
              training: Mapping[str, Any] | None = None, loras: Mapping[str, CategoryLora] | None = None,
              counts: Sequence[int] | None = None) -> Path:
    """Write identifier vectors ``[categories, vectors, width]`` (one per text encoder) as a bank, atomically.

    The family follows the encoders and their widths: ``clip_l`` alone at 768 is "sd15", ``clip_l`` 768 +
    ``clip_g`` 1280 is "sdxl"; other widths (small self-trained models) give "tiny" / "tiny-sdxl" banks that
    record their widths.

    Args:
        path: destination ``.safetensors``.
        names: category names, row order.
        vectors: the trained vectors, a tensor (``clip_l``) or encoder name -> tensor.
        template: the prompt template they were trained with.
        training: provenance stored in the bank.
        loras: optional per-category LoRAs.
        counts: each category's own vector count (its first ``count`` vectors are saved); None = all.
    """
    per_encoder = {"clip_l": vectors} if isinstance(vectors, torch.Tensor) else dict(vectors)
    per_encoder = {k: v.detach().float().cpu() for k, v in per_encoder.items()}
    for enc, v in per_encoder.items():
        if v.ndim != 3 or v.shape[0] != len(names):
            raise ValueError(f"{enc} identifier vectors must be [{len(names)} categories, vectors, width], "
                             f"got {list(v.shape)}")
    widths = {enc: int(v.shape[-1]) for enc, v in per_encoder.items()}
    full_size = all(widths[enc] == ENCODER_WIDTHS[enc] for enc in widths)
    if set(widths) == {"clip_l"}:
        family = "sd15" if full_size else TINY_FAMILY
    elif set(widths) == {"clip_l", "clip_g"}:
        family = "sdxl" if full_size else TINY_SDXL_FAMILY
    else:
        raise ValueError(f"identifier vectors for {sorted(widths)}: expected clip_l, or clip_l and clip_g")
    per = int(per_encoder["clip_l"].shape[1])
    bank = CategoryBank(family, vectors_per_id=per, template=template, training=training,
                        width=widths["clip_l"], width_g=widths.get("clip_g"), varied_counts=counts is not None)
    for i, name in enumerate(names):
        n = per if counts is None else int(counts[i])
        bank.add(name, {enc: v[i, :n] for enc, v in per_encoder.items()}, lora=(loras or {}).get(name))
    return bank.save(path)


def read_bank_vectors(path: Path, encoder: str = "clip_l") -> tuple[list[str], torch.Tensor]:
    """(names, ``[categories, vectors, width]``) of one text encoder's vectors in a bank of any family."""
    with CategoryBank.load(path) as bank:
        return bank.names, bank.tensors()[encoder].clone()


def set_category_lora(bank_path: Path, category: str, lora_file: Path | str, strength: float = 1.0) -> Path:
    """Name ``lora_file`` as ``category``'s own LoRA in the bank at ``bank_path`` (rewritten atomically).

    The bank stores the bare file name, which ComfyUI's Category LoRA node looks up in ``models/loras``.

    Returns:
        The bank's path.
    """
    with CategoryBank.load(bank_path) as bank:
        bank.set_lora(category, CategoryLora(Path(lora_file).name, float(strength)))
        return bank.save(bank_path)


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
