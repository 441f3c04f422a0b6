"""Flux.1 LoRA files merged into the diffusers models of :class:`~.flux_models.FluxParts`.

The layouts Flux LoRAs come in (the ones ComfyUI 0.3.75's ``comfy.lora`` maps for Flux), all read here:

* kohya / sd-scripts on BFL names: ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``lora_up.weight``
  / ``.alpha``; the fused ``qkv`` and a single block's ``linear1`` (q, k, v and the MLP input in one matrix) have
  one ``lora_up`` whose rows split into diffusers' ``to_q`` / ``to_k`` / ``to_v`` (+ ``proj_mlp``) exactly as the
  weight's rows do (:func:`.flux_keys.split_rows`, the split the loader uses);
* BFL names with dots (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``, with or without the prefix);
* diffusers / peft: ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` / ``lora_B.weight`` (what
  ``productbg train-cg`` on Flux writes, alpha folded into ``lora_B``; diffusers' ``lora_adapter_metadata``
  alphas are read), OneTrainer's ``lora_transformer_*`` and SimpleTuner's ``lycoris_*`` on diffusers names;
* text-encoder parts: CLIP-L (``lora_te1_`` / ``lora_te_`` / ``text_encoder.``) and T5-XXL (``lora_te3_``, which
  sd-scripts writes, ``lora_te2_``, OneTrainer's, ``text_encoder_2.``).

**Text-encoder parts are applied**, at the same strength, as ComfyUI's LoraLoader applies them (its
``strength_clip`` defaults to the model's): a LoRA trained with its CLIP-L part expects it, and dropping it would
make the CLI's pictures differ from ComfyUI's for the same file. It keeps the confinement exact: the identifier-free
stream and the full one go through the same (changed) encoders, and a bank's vectors are spliced into T5's input,
which no LoRA on T5's linear layers changes.

Every module is matched and its shapes checked before any weight changes, so a refused file leaves the models as
they were. A module no Flux.1 model has (an SD1.5 / SDXL LoRA) is refused with the count and an example, never
skipped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..weights.errors import WeightsError
from ..weights.lora import LoraModule, read_lora
from .errors import PipelineError
from .flux_keys import DIFFUSION_PREFIX, bfl_modules, split_rows
from .flux_models import FluxParts
from .t5_file import FP8

#: Name prefixes of transformer modules and the naming after them (BFL's or diffusers'), longest first.
TRANSFORMER_PREFIXES = (("lora_unet_", "bfl"), (DIFFUSION_PREFIX, "bfl"), ("diffusion_model.", "bfl"),
                        ("lora_transformer_", "diffusers"), ("lycoris_", "diffusers"), ("transformer.", "diffusers"),
                        ("base_model.model.", "diffusers"))
#: Name prefixes of text-encoder modules and the encoder they name.
TEXT_PREFIXES = (("lora_te1_", "clip_l"), ("lora_te_", "clip_l"), ("lora_te2_", "t5"), ("lora_te3_", "t5"),
                 ("text_encoder_2.", "t5"), ("text_encoder.", "clip_l"))
#: Transformer modules with no prefix: a BFL or diffusers block name.
_BFL_ROOTS = ("double_blocks.", "single_blocks.", "img_in", "txt_in", "time_in.", "vector_in.", "guidance_in.",
              "final_layer.")


@dataclass
class _Target:
    """One LoRA update of one linear layer: ``up @ down · scale`` added to ``model``'s ``path``."""

    model: str
    path: str
    layer: torch.nn.Linear
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    lora_name: str


def _linear_names(model: torch.nn.Module | None, aliases: bool = False) -> dict[str, str]:
    """``{name: module path}`` of every linear layer, each under its dotted and its underscored name (``aliases``:
    also with CLIP's ``text_model.`` prefix added or removed, as transformers >= 5.6 flattened it); none without a
    model (a transformer loaded alone)."""
    table: dict[str, str] = {}
    for path, module in (model.named_modules() if model is not None else ()):
        if isinstance(module, torch.nn.Linear):
            names = [path]
            if aliases:
                names.append(path.removeprefix("text_model.") if path.startswith("text_model.")
                             else "text_model." + path)
            for n in names:
                table[n] = path
                table[n.replace(".", "_")] = path
    return table


class _Names:
    """Where the modules a Flux LoRA names live in :class:`FluxParts`."""

    def __init__(self, parts: FluxParts) -> None:
        t = parts.transformer
        self.parts = parts
        self.inner = int(t.config.num_attention_heads * t.config.attention_head_dim)
        bfl = bfl_modules(len(t.transformer_blocks), len(t.single_transformer_blocks), parts.guidance_embeds)
        self.bfl = {n: n for n in bfl} | {n.replace(".", "_"): n for n in bfl}
        self.tables = {"diffusers": _linear_names(t), "clip_l": _linear_names(parts.clip_l, aliases=True),
                       "t5": _linear_names(parts.t5)}
        self.models = {"diffusers": t, "clip_l": parts.clip_l, "t5": parts.t5}
        self.paths = {k: set(v.values()) for k, v in self.tables.items()}

    def targets(self, m: LoraModule) -> list[tuple[str, str, torch.Tensor]] | None:
        """``(model, module path, up rows)`` of one stored LoRA module; None when no Flux.1 module has its name."""
        name = m.path
        for prefix, encoder in TEXT_PREFIXES:
            if name.startswith(prefix):
                path = self.tables[encoder].get(name[len(prefix):])
                return None if path is None else [(encoder, path, m.up)]
        for prefix, naming in TRANSFORMER_PREFIXES:
            if name.startswith(prefix):
                return self._transformer(name[len(prefix):], naming, m.up)
        return self._transformer(name, "bfl" if name.startswith(_BFL_ROOTS) else "diffusers", m.up)

    def _transformer(self, name: str, naming: str, up: torch.Tensor):
        if naming == "diffusers":
            path = self.tables["diffusers"].get(name)
            return None if path is None else [("diffusers", path, up)]
        bfl = self.bfl.get(name)
        if bfl is None:
            return None
        if bfl.endswith(".linear1") and up.shape[0] <= 3 * self.inner:
            return [("diffusers", bfl, up)]  # too few rows for q, k, v and the MLP: the shape check names it
        return [("diffusers", path, rows) for path, rows in split_rows(bfl, up, self.inner).items()]


#: How each model is named in messages.
_LABELS = {"diffusers": "the Flux transformer", "clip_l": "CLIP-L", "t5": "T5-XXL"}


def _plan(parts: FluxParts, modules: list[LoraModule], strength: float, fname: str) -> list[_Target]:
    """Every update the LoRA makes, matched and shape-checked (nothing changed yet)."""
    names = _Names(parts)
    plan: list[_Target] = []
    unmatched: list[str] = []
    for m in modules:
        found = names.targets(m)
        if found is None:
            unmatched.append(m.path)
            continue
        for model, path, up in found:
            layer = names.models[model].get_submodule(path) if path in names.paths[model] else None
            down = m.down.flatten(1)
            shape = (int(up.shape[0]), int(down.shape[1]))
            if m.down.ndim != 2 or m.up.ndim != 2 or layer is None or tuple(layer.weight.shape) != shape:
                have = f"more than {3 * names.inner} rows (q, k, v and the MLP input)" if layer is None else \
                    "×".join(str(int(n)) for n in layer.weight.shape)
                raise PipelineError(f"{fname}: the LoRA's '{m.path}' makes a {shape[0]}×{shape[1]} update for "
                                    f"{_LABELS[model]}'s {path}, which is {have} (a LoRA for another Flux.1 "
                                    "variant or width, e.g. a dev LoRA's img_in on Fill?)")
            plan.append(_Target(model, path, layer, down, up, m.scale * strength, m.path))
    if unmatched:
        raise PipelineError(f"{fname}: {len(unmatched)} of {len(modules)} LoRA modules match no Flux.1 module "
                            f"(e.g. '{unmatched[0]}'): a LoRA for another base model (SD1.5 / SDXL)?")
    return plan


def is_flux_lora(keys) -> bool:
    """Whether LoRA tensor names address Flux.1 blocks (BFL's ``double_blocks`` / ``single_blocks`` or diffusers'
    ``transformer.transformer_blocks`` / ``single_transformer_blocks``), for a clear refusal on SD1.5 / SDXL."""
    marks = ("double_blocks", "single_blocks", "transformer.transformer_blocks.",
             "transformer.single_transformer_blocks.")
    return any(any(m in k for m in marks) for k in keys)


def add_to_linear(layer: torch.nn.Linear, delta: torch.Tensor) -> None:
    """Add ``delta`` to a linear layer's weight in place.

    A layer stored narrower than it computes (flux_files' ``CastLinear`` holding an fp8 weight, optionally with a
    ``scale_weight``) is dequantized first: its weight becomes ``weight · scale_weight + delta`` stored in the
    layer's compute dtype (so that layer takes 2–4× its fp8 bytes), and its scale is dropped. Any other weight keeps
    its dtype: the sum is taken in ``delta``'s dtype (float32) and rounded once.
    """
    w = layer.weight
    with torch.no_grad():
        if w.dtype in FP8:
            dtype = getattr(layer, "compute_dtype", torch.float32)
            base = w.to(dtype)
            scale = getattr(layer, "scale_weight", None)
            if scale is not None:
                base = base * scale.to(base)
                layer.scale_weight = None
            layer.weight = torch.nn.Parameter(base + delta.to(base), requires_grad=False)
        elif w.dtype == delta.dtype:
            w += delta
        else:  # bf16 / fp16 weights: added in float32, rounded once
            w.copy_(w.to(delta.dtype) + delta)


def merge_flux_lora(parts: FluxParts, path: str | os.PathLike, strength: float = 1.0) -> int:
    """Add a Flux.1 LoRA file's low-rank updates (``strength · alpha/rank · up @ down``) into the transformer, and its
    CLIP-L / T5-XXL parts into those encoders, in place.

    Args:
        parts: the loaded Flux.1 models.
        path: ``.safetensors`` LoRA in any Flux layout of the module docstring.
        strength: multiplier of every update.

    Returns:
        The number of layers changed.

    Raises:
        PipelineError: an unreadable file, modules no Flux.1 model has (count and an example), or an update whose
            shape does not fit its layer; the models are unchanged then.
    """
    fname = Path(path).name
    try:
        lora = read_lora(path, resolve=False)
    except WeightsError as e:
        raise PipelineError(str(e)) from None
    plan = _plan(parts, lora.modules, strength, fname)
    for t in plan:
        w = t.layer.weight
        delta = (t.up.to(w.device, torch.float32) @ t.down.to(w.device, torch.float32)) * t.scale
        add_to_linear(t.layer, delta.to(w.device))
    return len(plan)
