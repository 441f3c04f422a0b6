"""LoRA key conversion between peft/diffusers and the kohya layout ComfyUI's LoraLoader reads.

peft / diffusers (what our trainers write)::

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight   [r, in]
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight   [out, r]
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight
    (also read: ``base_model.model.`` / ``unet.base_model.model.`` peft prefixes, ``lora_A.default.weight``,
    and diffusers' old ``.processor.to_k_lora.down.weight`` names)
    alphas: safetensors metadata ``lora_adapter_metadata`` (diffusers: ``unet.lora_alpha``, ``unet.alpha_pattern``)

kohya (what ComfyUI reads; the names ``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip`` map)::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight   [r, in]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight     [out, r]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha              []
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight
    (SDXL: lora_te1_ / lora_te2_ for the two text encoders)

Tensors are copied unchanged, so a round trip in either direction is exact. A module without an alpha means
``alpha = rank`` (scale 1) in both layouts; it stays without one.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import FormatMismatchError, MalformedFileError, WeightsError
from .safefile import FLOAT_DTYPES, Header, atomic_save, load_all, parse_json_value, read_header, require_float

LAYOUTS = ("kohya", "peft")
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
ALPHA_DTYPE_KEY = "productbg.kohya_alpha_dtype"
NO_ALPHA_KEY = "productbg.kohya_no_alpha"  # modules that had no .alpha in kohya (exact round trips)
OWN_KEYS = (DIFFUSERS_METADATA_KEY, ALPHA_DTYPE_KEY, NO_ALPHA_KEY)

#: Multi-word names of diffusers UNet / CLIP modules; a kohya name is split back into a module path with them.
COMPOUND_NAMES = tuple(sorted({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "conv_in", "conv_out", "conv_norm_out", "conv_shortcut", "time_emb_proj",
    "time_embedding", "linear_1", "linear_2", "add_embedding", "class_embedding", "encoder_hid_proj",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_out",
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2",
    "final_layer_norm", "token_embedding", "position_embedding", "text_projection",
}, key=len, reverse=True))

#: First path segment of a module, per component; anything else cannot be a diffusers SD module.
UNET_ROOTS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
              "add_embedding", "class_embedding", "encoder_hid_proj")
TEXT_ROOTS = ("text_model", "text_projection")

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
PEFT_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

_KOHYA_KEY = re.compile(r"^(lora_unet_|lora_te_|lora_te1_|lora_te2_)([A-Za-z0-9_]+)\.(lora_down\.weight|"
                        r"lora_up\.weight|alpha)$")
_ANY_KOHYA_KEY = re.compile(r"^(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_KOHYA_SLOTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_PEFT_KEY = re.compile(r"^(.+)\.(lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight$")
_OLD_DIFFUSERS_KEY = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


@dataclass
class LoraModule:
    """One low-rank update ``ΔW = up @ down · alpha / rank`` of one module.

    Attributes:
        component: ``"unet"``, ``"text_encoder"`` or ``"text_encoder_2"``.
        path: diffusers module path inside that component, e.g. ``down_blocks.0...attn2.to_k``.
        down: ``lora_A`` / ``lora_down`` weight ``[rank, in, ...]``.
        up: ``lora_B`` / ``lora_up`` weight ``[out, rank, ...]``.
        alpha: scalar alpha, or None (= rank).
    """

    component: str
    path: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        """LoRA rank."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / rank`` (1.0 without alpha), the factor both ComfyUI and peft apply."""
        return 1.0 if self.alpha is None else float(self.alpha) / self.rank


# ---------------------------------------------------------------------- names
def kohya_name(component: str, path: str, sdxl: bool = False) -> str:
    """kohya module name, e.g. ``("unet", "down_blocks.0.resnets.0.conv1") -> "lora_unet_down_blocks_0_resnets_0_conv1"``.

    Args:
        component: ``unet``, ``text_encoder`` or ``text_encoder_2``.
        path: diffusers module path.
        sdxl: name text encoders ``lora_te1_`` / ``lora_te2_`` (two text encoders) instead of ``lora_te_``.
    """
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl else "lora_te_",
              "text_encoder_2": "lora_te2_"}.get(component)
    if prefix is None:
        raise WeightsError(f"unknown LoRA component {component!r}; expected one of {PEFT_COMPONENTS}")
    return prefix + path.replace(".", "_")


def diffusers_path(name: str) -> tuple[str, str]:
    """Inverse of :func:`kohya_name`: ``"lora_unet_down_blocks_0_..."`` -> ``("unet", "down_blocks.0....")``.

    Raises:
        WeightsError: the name has no known prefix, or cannot be split into a diffusers module path
            unambiguously (e.g. LDM-style ``input_blocks`` names).
    """
    prefix = next((p for p in sorted(KOHYA_PREFIXES, key=len, reverse=True) if name.startswith(p)), None)
    if prefix is None:
        raise WeightsError(f"'{name}' is not a kohya LoRA name (no lora_unet_/lora_te_ prefix)")
    component, body = KOHYA_PREFIXES[prefix], name[len(prefix):]
    path = ".".join(_split_words(body))
    roots = UNET_ROOTS if component == "unet" else TEXT_ROOTS
    if path.split(".")[0] not in roots or path.replace(".", "_") != body:
        raise WeightsError(f"kohya name '{name}' does not map to a diffusers module path (LDM-style names such "
                           "as input_blocks are not converted)")
    return component, path


def _split_words(body: str) -> list[str]:
    out, i = [], 0
    while i < len(body):
        word = next((c for c in COMPOUND_NAMES if body.startswith(c, i)
                     and (i + len(c) == len(body) or body[i + len(c)] == "_")), None)
        if word is None:
            end = body.find("_", i)
            word = body[i:] if end < 0 else body[i:end]
        out.append(word)
        i += len(word) + 1
    return out


# ---------------------------------------------------------------------- parsing
def detect_layout(keys: Any) -> str | None:
    """``"kohya"``, ``"peft"`` or None for a collection of tensor names."""
    keys = list(keys)
    if keys and all(_KOHYA_KEY.match(k) for k in keys):
        return "kohya"
    if keys and any(_PEFT_KEY.match(k) or _OLD_DIFFUSERS_KEY.match(k) for k in keys):
        return "peft"
    if any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys):
        return "kohya"
    return None


def parse_lora(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> tuple[list[LoraModule], str]:
    """Read a LoRA state dict in either layout into :class:`LoraModule` objects.

    Args:
        tensors: the file's tensors.
        metadata: the file's safetensors metadata (peft alphas live there).

    Returns:
        (modules, layout).
    """
    layout = detect_layout(tensors)
    if layout is None:
        raise FormatMismatchError("not a LoRA: no lora_down/lora_up (kohya) or lora_A/lora_B (peft) tensors")
    modules = _parse_kohya(tensors) if layout == "kohya" else _parse_peft(tensors, metadata or {})
    for m in modules:
        _check_module(m)
    return modules, layout


def _parse_kohya(tensors: Mapping[str, torch.Tensor]) -> list[LoraModule]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KOHYA_KEY.match(key)
        if m is None:
            raise FormatMismatchError(f"unsupported kohya LoRA key '{key}' (only lora_down/lora_up/alpha LoRAs are "
                                      "converted; LoHa/LoKr/DoRA are not)")
        parts.setdefault(m.group(1) + m.group(2), {})[m.group(3)] = t
    modules, seen = [], set()
    sdxl_te1 = any(name.startswith("lora_te1_") for name in parts)
    for name, p in parts.items():
        if "lora_down.weight" not in p or "lora_up.weight" not in p:
            raise MalformedFileError(f"kohya LoRA module '{name}' lacks its lora_down or lora_up weight")
        component, path = diffusers_path(name)
        if name.startswith("lora_te_") and sdxl_te1:
            raise MalformedFileError("kohya LoRA mixes lora_te_ and lora_te1_ names for the same text encoder")
        if (component, path) in seen:
            raise MalformedFileError(f"kohya LoRA names module {component}.{path} twice")
        seen.add((component, path))
        modules.append(LoraModule(component, path, p["lora_down.weight"], p["lora_up.weight"], p.get("alpha")))
    return modules


def _peft_component(prefix: str) -> tuple[str, str]:
    """Split ``unet.base_model.model.down_blocks...`` into (component, path)."""
    component = None
    for c in sorted(PEFT_COMPONENTS, key=len, reverse=True):
        if prefix.startswith(c + "."):
            component, prefix = c, prefix[len(c) + 1:]
            break
    if prefix.startswith("base_model.model."):
        prefix = prefix[len("base_model.model."):]
    if component is None:
        component = "text_encoder" if prefix.split(".")[0] in TEXT_ROOTS else "unet"
    return component, prefix


def _parse_peft(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> list[LoraModule]:
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        slot, where = _peft_slot(key)
        entry = parts.setdefault(_peft_component(where), {})
        if slot in entry:
            raise MalformedFileError(f"peft LoRA names {slot} of module '{where}' twice (key '{key}')")
        entry[slot] = t
    alphas = _peft_alphas(metadata)
    no_alpha = _no_alpha(metadata)
    modules = []
    for (component, path), p in parts.items():
        if "down" not in p or "up" not in p:
            raise MalformedFileError(f"peft LoRA module '{component}.{path}' lacks its lora_A or lora_B weight")
        alpha = p.get("alpha")
        if alpha is None and f"{component}.{path}" not in no_alpha:
            alpha = _alpha_for(alphas.get(component), path, metadata)
        modules.append(LoraModule(component, path, p["down"], p["up"], alpha))
    return modules


def _peft_slot(key: str) -> tuple[str, str]:
    m = _PEFT_KEY.match(key)
    if m:
        return ("down" if m.group(2) == "lora_A" else "up"), m.group(1)
    m = _OLD_DIFFUSERS_KEY.match(key)
    if m:
        proj = m.group(2) + (".0" if m.group(2) == "to_out" else "")
        return m.group(3), f"{m.group(1)}.{proj}"
    if key.endswith(".alpha"):
        return "alpha", key[: -len(".alpha")]
    raise FormatMismatchError(f"unsupported peft LoRA key '{key}' (DoRA magnitudes, LoRA biases and other adapter "
                              "types are not converted)")


def _peft_alphas(metadata: Mapping[str, str], components: tuple[str, ...] | None = PEFT_COMPONENTS
                ) -> dict[str, dict[str, Any]]:
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if raw is None:
        return {}
    flat = parse_json_value(raw, DIFFUSERS_METADATA_KEY, Path("LoRA"))
    if not isinstance(flat, dict):
        raise MalformedFileError(f"LoRA metadata '{DIFFUSERS_METADATA_KEY}' must be a JSON object")
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, field = str(key).rpartition(".")
        if component and (components is None or component in components):
            out.setdefault(component, {})[field] = value
    return out


def _no_alpha(metadata: Mapping[str, str]) -> set[str]:
    raw = metadata.get(NO_ALPHA_KEY)
    if raw is None:
        return set()
    value = parse_json_value(raw, NO_ALPHA_KEY, Path("LoRA"))
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MalformedFileError(f"LoRA metadata '{NO_ALPHA_KEY}' must be a JSON list of module names")
    return set(value)


def _alpha_for(config: Mapping[str, Any] | None, path: str, metadata: Mapping[str, str]) -> torch.Tensor | None:
    if not config or "lora_alpha" not in config:
        return None
    pattern = config.get("alpha_pattern") or {}
    if not isinstance(pattern, dict):
        raise MalformedFileError("LoRA metadata alpha_pattern must be a JSON object")
    value = pattern.get(path, pattern.get("^" + path))
    if value is None:
        value = next((v for k, v in pattern.items() if re.fullmatch(rf"(.*\.)?{re.escape(k)}", path)),
                     config["lora_alpha"])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MalformedFileError(f"LoRA metadata gives a non-numeric alpha {value!r} for '{path}'")
    dtype = FLOAT_DTYPES.get(metadata.get(ALPHA_DTYPE_KEY, "F32"), torch.float32)
    return torch.tensor(float(value), dtype=dtype)


def parse_lora_as_stored(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
                         ) -> tuple[list[LoraModule], str]:
    """Read a LoRA state dict into :class:`LoraModule` objects named as the file names them, for backbones whose
    module names :func:`parse_lora` does not resolve (Flux.1: BFL names such as
    ``lora_unet_double_blocks_0_img_attn_qkv``, diffusers' ``transformer.transformer_blocks.0.attn.to_q``).

    Each module's ``component`` is ``""`` and its ``path`` the stored name without the slot suffix (kohya:
    ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; peft: ``.lora_A.weight`` / ``.lora_B.weight`` /
    ``.alpha``). A peft module without an ``.alpha`` takes the alpha diffusers' ``lora_adapter_metadata`` gives its
    first name segment (``transformer.lora_alpha``, ``alpha_pattern``), else none (scale 1).

    Returns:
        (modules, layout).

    Raises:
        FormatMismatchError: not a LoRA, or tensors of another adapter type (LoHa, LoKr, DoRA, biases).
        MalformedFileError: a module lacking its down or up weight, named twice, or whose shapes are no rank-r pair.
    """
    layout = detect_layout(tensors)
    if layout is None:
        raise FormatMismatchError("not a LoRA: no lora_down/lora_up (kohya) or lora_A/lora_B (peft) tensors")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if layout == "kohya":
            m = _ANY_KOHYA_KEY.match(key)
            if m is None:
                raise FormatMismatchError(f"unsupported kohya LoRA key '{key}' (only lora_down/lora_up/alpha LoRAs "
                                          "are read; LoHa/LoKr/DoRA are not)")
            name, slot = m.group(1), _KOHYA_SLOTS[m.group(2)]
        else:
            slot, name = _peft_slot(key)
        entry = parts.setdefault(name, {})
        if slot in entry:
            raise MalformedFileError(f"LoRA names {slot} of module '{name}' twice (key '{key}')")
        entry[slot] = t
    alphas = _peft_alphas(metadata or {}, None) if layout == "peft" else {}
    modules = []
    for name, p in parts.items():
        if "down" not in p or "up" not in p:
            raise MalformedFileError(f"LoRA module '{name}' lacks its down (lora_down / lora_A) or up "
                                     "(lora_up / lora_B) weight")
        alpha = p.get("alpha")
        if alpha is None and layout == "peft":
            component, _, path = name.partition(".")
            alpha = _alpha_for(alphas.get(component), path, metadata or {})
        module = LoraModule("", name, p["down"], p["up"], alpha)
        _check_module(module)
        modules.append(module)
    return modules, layout


def _check_module(m: LoraModule) -> None:
    where = f"{m.component}.{m.path}" if m.component else m.path
    for name, t in (("down", m.down), ("up", m.up)):
        if not t.is_floating_point():
            raise MalformedFileError(f"LoRA {where}: {name} weight has dtype {t.dtype}; expected a float dtype")
    if m.down.ndim < 2 or m.up.ndim < 2 or m.up.shape[1] != m.down.shape[0] or m.down.shape[0] == 0:
        raise MalformedFileError(f"LoRA {where}: down {list(m.down.shape)} and up {list(m.up.shape)} do not form a "
                                 "rank-r pair (down [r, in, ...], up [out, r, ...])")
    if m.alpha is not None:
        if m.alpha.numel() != 1 or not m.alpha.is_floating_point() or not math.isfinite(float(m.alpha)):
            raise MalformedFileError(f"LoRA {where}: alpha must be one finite float, got {list(m.alpha.shape)} "
                                     f"{m.alpha.dtype}")


# ---------------------------------------------------------------------- writing
def to_kohya(modules: list[LoraModule], metadata: Mapping[str, str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya tensors + metadata (diffusers' alpha metadata dropped: alphas become ``.alpha`` tensors).

    Raises:
        WeightsError: a module path that kohya naming could not represent unambiguously.
    """
    sdxl = any(m.component == "text_encoder_2" for m in modules)
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        name = kohya_name(m.component, m.path, sdxl)
        if diffusers_path(name) != (m.component, m.path):
            raise WeightsError(f"module '{m.path}' cannot be written unambiguously in kohya naming")
        out[f"{name}.lora_down.weight"] = m.down
        out[f"{name}.lora_up.weight"] = m.up
        if m.alpha is not None:
            out[f"{name}.alpha"] = m.alpha
    meta = {k: v for k, v in (metadata or {}).items() if k not in OWN_KEYS}
    return out, meta


def to_peft(modules: list[LoraModule], metadata: Mapping[str, str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers/peft tensors (``unet.…lora_A.weight``) + metadata carrying the alphas the way diffusers reads them."""
    out: dict[str, torch.Tensor] = {}
    for m in modules:
        out[f"{m.component}.{m.path}.lora_A.weight"] = m.down
        out[f"{m.component}.{m.path}.lora_B.weight"] = m.up
    meta = {k: v for k, v in (metadata or {}).items() if k not in OWN_KEYS}
    config = _adapter_metadata(modules)
    if config:
        meta[DIFFUSERS_METADATA_KEY] = json.dumps(config, sort_keys=True)
        absent = sorted(f"{m.component}.{m.path}" for m in modules if m.alpha is None)
        if absent:  # diffusers gets alpha = rank for these (same scale); we remember there was none
            meta[NO_ALPHA_KEY] = json.dumps(absent)
        dtypes = {m.alpha.dtype for m in modules if m.alpha is not None}
        rev = {v: k for k, v in FLOAT_DTYPES.items()}
        if len(dtypes) == 1 and dtypes != {torch.float32}:
            meta[ALPHA_DTYPE_KEY] = rev[dtypes.pop()]
    meta.setdefault("format", "pt")
    return out, meta


def _adapter_metadata(modules: list[LoraModule]) -> dict[str, Any]:
    """Per-component LoraConfig fields (r, lora_alpha, rank/alpha patterns, target_modules), prefixed."""
    if all(m.alpha is None for m in modules):
        return {}
    flat: dict[str, Any] = {}
    for component in PEFT_COMPONENTS:
        mods = [m for m in modules if m.component == component]
        if not mods:
            continue
        r = Counter(m.rank for m in mods).most_common(1)[0][0]
        alphas = {m.path: float(m.alpha) if m.alpha is not None else float(m.rank) for m in mods}
        a = Counter(alphas.values()).most_common(1)[0][0]
        flat.update({
            f"{component}.r": r,
            f"{component}.lora_alpha": a,
            f"{component}.rank_pattern": {m.path: m.rank for m in mods if m.rank != r},
            f"{component}.alpha_pattern": {p: v for p, v in alphas.items() if v != a},
            f"{component}.target_modules": sorted(m.path for m in mods),
        })
    return flat


# ---------------------------------------------------------------------- files
@dataclass
class LoraFile:
    """A LoRA read from disk.

    Attributes:
        modules: its low-rank updates.
        layout: ``"kohya"`` or ``"peft"``.
        metadata: safetensors metadata as stored.
        header: the validated header.
    """

    modules: list[LoraModule]
    layout: str
    metadata: dict[str, str]
    header: Header

    def components(self) -> dict[str, int]:
        """Module count per component."""
        return dict(Counter(m.component for m in self.modules))

    def ranks(self) -> list[int]:
        """Distinct ranks, sorted."""
        return sorted({m.rank for m in self.modules})


def is_lora(header: Header) -> bool:
    """Whether a header's tensor names look like a LoRA."""
    return detect_layout(header.tensors) is not None


def read_lora(path: str | os.PathLike, resolve: bool = True) -> LoraFile:
    """Validate and read a LoRA ``.safetensors`` file (either layout); every tensor is checked finite.

    Args:
        path: the ``.safetensors`` file.
        resolve: map module names to diffusers SD1.5 / SDXL components and paths (:func:`parse_lora`); False keeps
            them as stored (:func:`parse_lora_as_stored`, for Flux.1).
    """
    header = read_header(path)
    if not is_lora(header):
        raise FormatMismatchError(f"{header.path.name}: not a LoRA (no lora_down/lora_up or lora_A/lora_B tensors)")
    require_float(header)
    tensors, _ = load_all(header.path)
    try:
        modules, layout = (parse_lora if resolve else parse_lora_as_stored)(tensors, header.metadata)
    except WeightsError as e:
        raise type(e)(f"{header.path.name}: {e}") from None
    return LoraFile(modules, layout, dict(header.metadata), header)


def convert_lora_file(src: str | os.PathLike, dst: str | os.PathLike, to: str) -> Path:
    """Convert a LoRA file to ``"kohya"`` (for ComfyUI) or ``"peft"`` (for diffusers), writing atomically.

    Args:
        src: input ``.safetensors`` (either layout).
        dst: output ``.safetensors``.
        to: target layout.

    Returns:
        The path written.
    """
    if to not in LAYOUTS:
        raise WeightsError(f"target layout must be one of {LAYOUTS}, got {to!r}")
    lora = read_lora(src)
    tensors, meta = (to_kohya if to == "kohya" else to_peft)(lora.modules, lora.metadata)
    return atomic_save(tensors, dst, meta)
