"""Say what a weight file is: category bank, style encoder, embedding, LoRA, or unknown — from its header.

This backs ``productbg weights inspect``. Only the header (and, for banks, the lazily opened file) is read.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backbones import BACKBONES
from .bank import CategoryBank, is_bank
from .embedding import EMBEDDING_KEYS, embedding_family, is_embedding
from .errors import WeightsError
from .ip_adapters import features_name
from .lora import detect_layout, is_lora
from .safefile import Header, read_header
from .style_encoder import check_target, is_style_encoder, read_style_encoder_info
from ..backbones import family_by_context_width
from ..backbones.targets import target_of

KINDS = ("category bank", "style encoder", "embedding", "LoRA", "unknown")
_MAX_VALUE_CHARS = 160


@dataclass
class FileReport:
    """What :func:`describe_file` found.

    Attributes:
        path: the file.
        kind: one of ``KINDS``.
        family: base model family (``"sd15"``...), or None if unknown.
        facts: ordered (label, value) lines.
        metadata: the header metadata as stored.
    """

    path: Path
    kind: str
    family: str | None
    facts: list[tuple[str, str]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    def render(self) -> str:
        """Human-readable multi-line report."""
        lines = [f"{self.path.name}: {self.kind}" + (f" ({self.family})" if self.family else "")]
        width = max((len(k) for k, _ in self.facts), default=0)
        lines += [f"  {k.ljust(width)}  {v}" for k, v in self.facts]
        if self.metadata:
            lines.append("  metadata:")
            lines += [f"    {k} = {_clip(v)}" for k, v in sorted(self.metadata.items())]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"path": str(self.path), "kind": self.kind, "family": self.family, "facts": dict(self.facts),
                "metadata": self.metadata}


def _clip(value: str) -> str:
    value = value.replace("\n", " ")
    return value if len(value) <= _MAX_VALUE_CHARS else value[:_MAX_VALUE_CHARS] + f"... ({len(value)} chars)"


def describe_file(path: str | os.PathLike) -> FileReport:
    """Identify a ``.safetensors`` weight file and summarise it.

    Args:
        path: the file.

    Returns:
        A :class:`FileReport`.

    Raises:
        WeightsError: unsafe or malformed files (and banks / style encoders whose contents are inconsistent).
    """
    header = read_header(path)
    if is_bank(header):
        return _describe_bank(header)
    if is_style_encoder(header):
        return _describe_style(header)
    if is_embedding(header):
        return _describe_embedding(header)
    if is_lora(header):
        return _describe_lora(header)
    return _describe_unknown(header)


def _vector_counts(bank: CategoryBank) -> str:
    counts = bank.vector_counts()
    if not counts or min(counts) == max(counts) == bank.vectors_per_id:
        return str(bank.vectors_per_id)
    return f"{min(counts)}..{max(counts)} (each category its own; stored padded to {bank.vectors_per_id})"


def _describe_bank(header: Header) -> FileReport:
    with CategoryBank.load(header.path) as bank:
        names = bank.names
        facts = [
            ("categories", str(len(bank))),
            ("names", ", ".join(names[:5]) + (f", ... (+{len(names) - 5})" if len(names) > 5 else "")),
            ("vectors/identifier", _vector_counts(bank)),
            ("tensors", ", ".join(f"{e} {list(header.tensors[e].shape)} {header.tensors[e].dtype}"
                                  for e in bank.encoders)),
            ("template", bank.template),
            ("works with", _works_with(bank.family)),
            ("category LoRAs", str(len(bank.loras))),
            ("training", json.dumps(bank.training, ensure_ascii=False) if bank.training else "-"),
        ]
        return FileReport(header.path, "category bank", bank.family, facts, _meta_without(header, "categories"))


def _works_with(family: str) -> str:
    if family in BACKBONES:
        label = BACKBONES[family].label
        works = f"{label} checkpoints (base, inpainting, fine-tunes)"
        if family not in EMBEDDING_KEYS:  # Flux: Category Prompt splices its T5 vectors; no embedding file format
            return works
        article = "an" if label[:1] in "AEIOUS" else "a"
        return f"{works}; 'productbg weights export-embedding' writes a category as {article} {label} embedding"
    return "the small self-trained model it was trained with only"


def _describe_style(header: Header) -> FileReport:
    info = read_style_encoder_info(header.path, header)
    c = info.config
    clip = info.clip_vision
    facts = [
        ("layout", info.release_name),
        ("source", "published IP-Adapter" if info.source == "ip-adapter" else "trained by productbg"),
        ("style tokens", str(c.tokens)),
        ("CLIP-vision input", f"{features_name(c.variant)}, width {c.clip_width}"),
        ("CLIP vision", f"{clip.name}: {clip.file_hint}" if clip else f"unknown ({c.clip_width}-wide "
                                                                          f"{features_name(c.variant)})"),
        ("made for", info.detected),
        ("K/V layers", f"{c.num_layers} (hidden sizes {', '.join(map(str, c.hidden_sizes[:16]))}"
                       f"{', ...' if c.num_layers > 16 else ''})"),
    ]
    for b in BACKBONES.values():
        try:
            check_target(info, target_of(b), header.path.name)
            facts.append((f"fits {b.label}", "yes"))
        except WeightsError as e:
            facts.append((f"fits {b.label}", f"no — {e}"))
    facts.append(("tensors", f"{len(header.tensors)}, {_dtypes(header)}"))
    if info.training:
        facts.append(("training", json.dumps(info.training, ensure_ascii=False)))
    family = info.config.family if info.config.family != "unknown" else None
    return FileReport(header.path, "style encoder", family, facts, dict(header.metadata))


def _describe_embedding(header: Header) -> FileReport:
    family = embedding_family(header)
    meta = header.metadata
    facts = [("tensors", ", ".join(f"{k} {list(header.tensors[k].shape)} {header.tensors[k].dtype}"
                                   for k in EMBEDDING_KEYS[family]))]
    if meta.get("productbg.category"):
        facts.append(("category", meta["productbg.category"] + (f" (from {meta['productbg.bank']})"
                                                                if meta.get("productbg.bank") else "")))
    facts += [("works with", f"{BACKBONES[family].label} checkpoints"),
              ("in ComfyUI", f"models/embeddings/{header.path.name}; write embedding:{header.path.stem} in a prompt")]
    return FileReport(header.path, "embedding", family, facts, dict(meta))


def _describe_lora(header: Header) -> FileReport:
    layout = detect_layout(header.tensors)
    down = {k: v for k, v in header.tensors.items() if k.endswith((".lora_down.weight", ".lora_A.weight"))
            or ".lora_A." in k or k.endswith(".down.weight")}
    ranks = sorted({v.shape[0] for v in down.values() if v.shape})
    comps = Counter(_component(k) for k in down)
    facts = [
        ("layout", f"{layout} ({'ComfyUI LoraLoader' if layout == 'kohya' else 'diffusers/peft'})"),
        ("modules", ", ".join(f"{n} {c}" for c, n in sorted(comps.items()))),
        ("ranks", ", ".join(map(str, ranks)) or "-"),
        ("alphas", "stored" if any(k.endswith(".alpha") for k in header.tensors)
                   or "lora_adapter_metadata" in header.metadata else "none (scale 1)"),
        ("tensors", f"{len(header.tensors)}, {_dtypes(header)}"),
    ]
    return FileReport(header.path, "LoRA", _lora_family(header), facts, dict(header.metadata))


def _component(key: str) -> str:
    if key.startswith(("lora_te", "text_encoder", "text_model", "base_model.model.text_model")):
        return "text-encoder"
    return "unet"


def _lora_family(header: Header) -> str | None:
    for k, v in header.tensors.items():
        if "attn2" in k and ("to_k" in k) and ("lora_down" in k or "lora_A" in k) and len(v.shape) == 2:
            return family_by_context_width(int(v.shape[1]))
    return None


def _describe_unknown(header: Header) -> FileReport:
    items = list(header.tensors.items())
    facts = [("tensors", f"{len(items)}, {_dtypes(header)}" if items else "0")]
    facts += [(name if len(name) < 60 else name[:57] + "...", f"{list(t.shape)} {t.dtype}") for name, t in items[:8]]
    if len(items) > 8:
        facts.append(("...", f"{len(items) - 8} more"))
    return FileReport(header.path, "unknown", None, facts, dict(header.metadata))


def _dtypes(header: Header) -> str:
    counts = Counter(t.dtype for t in header.tensors.values())
    return ", ".join(f"{d} x{n}" for d, n in counts.most_common())


def _meta_without(header: Header, *keys: str) -> dict[str, str]:
    return {k: v for k, v in header.metadata.items() if k.removeprefix("productbg.") not in keys}
