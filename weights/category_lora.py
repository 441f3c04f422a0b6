"""A category's LoRA reference: the bare file name of a LoRA in ComfyUI's ``models/loras`` and its strength.

A category bank stores these in its header (``productbg.loras``, JSON ``{name: {"file": ..., "strength": ...}}``);
this module holds the value type, its rules, and its JSON form. The LoRA file itself is :mod:`.lora`'s business.
"""
from __future__ import annotations

import json
import math
import unicodedata
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import MalformedFileError, WeightsError


@dataclass(frozen=True)
class CategoryLora:
    """An optional per-category LoRA, looked up by file name in ComfyUI's ``models/loras``.

    Attributes:
        file: bare file name, e.g. ``"shoes.safetensors"``.
        strength: model strength to apply it with.
    """

    file: str
    strength: float = 1.0


def check_lora(name: str, lora: Any) -> CategoryLora:
    """``lora`` if it is a valid reference for category ``name``; else :class:`WeightsError`."""
    if not isinstance(lora, CategoryLora):
        raise WeightsError(f"category '{name}': lora must be a CategoryLora")
    file, strength = lora.file, lora.strength
    if (not isinstance(file, str) or not file.lower().endswith(".safetensors") or "/" in file or "\\" in file
            or file.startswith(".")):
        raise WeightsError(f"category '{name}': LoRA must be a bare .safetensors file name, got {file!r}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise WeightsError(f"category '{name}': LoRA strength must be a finite number, got {strength!r}")
    return lora


def parse_loras(raw: Any, names: list[str], fname: str) -> dict[str, CategoryLora]:
    """The references of a bank header's ``loras`` JSON value, for categories among ``names``."""
    if not isinstance(raw, dict):
        raise MalformedFileError(f"{fname}: bank metadata 'loras' must be a JSON object")
    known = set(names)
    out = {}
    for name, entry in raw.items():
        name = unicodedata.normalize("NFC", name)
        if name not in known:
            raise MalformedFileError(f"{fname}: LoRA given for unknown category '{name}'")
        if not isinstance(entry, dict) or set(entry) - {"file", "strength"} or "file" not in entry:
            raise MalformedFileError(f"{fname}: LoRA entry of '{name}' must be {{\"file\": ..., \"strength\": ...}}")
        out[name] = check_lora(name, CategoryLora(entry["file"], entry.get("strength", 1.0)))
    return out


def loras_json(loras: Mapping[str, CategoryLora]) -> str:
    """The header value that :func:`parse_loras` reads back."""
    return json.dumps({n: {"file": lo.file, "strength": lo.strength} for n, lo in loras.items()}, ensure_ascii=False)
