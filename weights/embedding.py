"""One category of a bank as a standard textual-inversion embedding file, for ``embedding:NAME`` prompts.

Layouts (the ones ComfyUI's ``comfy.sd1_clip.load_embed`` and A1111 read)::

    SD1.5   emb_params [vectors, 768]                     the single-tensor safetensors embedding
    SDXL    clip_l     [vectors, 768]                     SDXL textual-inversion keys: ComfyUI's CLIP-L
            clip_g     [vectors, 1280]                    tokenizer reads ``clip_l``, its CLIP-G one ``clip_g``

ComfyUI resolves ``embedding:NAME`` to ``models/embeddings/NAME.safetensors`` (sub-folders allowed:
``embedding:brand/NAME``); the name ends at the first space, and ``(``, ``)`` or ``:`` in it are read as prompt
weighting — so the file name is checked to be a single word ComfyUI can find. The bank's own name and template
go into the metadata (``productbg.*``), which loaders ignore.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .bank import CategoryBank
from .bank_format import ENCODER_WIDTHS
from .errors import FormatMismatchError, MalformedFileError, WeightsError
from .safefile import FLOAT_DTYPES, Header, atomic_save, check_finite, load_all, read_header

EMBEDDING_KIND = "embedding"
META = "productbg."
SD15_KEY = "emb_params"
#: Families whose banks hold T5 vectors, which no embedding file format carries.
FLUX_FAMILIES = frozenset({"flux"})
#: Bank family -> the keys of its embedding file, in order.
EMBEDDING_KEYS: dict[str, tuple[str, ...]] = {"sd15": (SD15_KEY,), "sdxl": ("clip_l", "clip_g")}
_KEY_ENCODER = {SD15_KEY: "clip_l", "clip_l": "clip_l", "clip_g": "clip_g"}
#: Characters that end or alter an ``embedding:`` name in a ComfyUI prompt (whitespace ends it; the others are
#: prompt-weighting syntax, or a trailing comma that ComfyUI strips).
_BAD_NAME = re.compile(r"[\s(),:\\]")


@dataclass(frozen=True)
class EmbeddingExport:
    """What :func:`export_embedding` wrote.

    Attributes:
        path: the file.
        category: the stored category name.
        family: ``sd15`` or ``sdxl``.
        shapes: key -> shape, in file order.
        prompt_name: what to write in a ComfyUI prompt (``embedding:NAME``).
        prompt_example: the bank's template with the embedding in place of ``{id}``.
    """

    path: Path
    category: str
    family: str
    shapes: dict[str, tuple[int, ...]]
    prompt_name: str
    prompt_example: str


def prompt_name(path: str | os.PathLike) -> str:
    """``embedding:NAME`` for a file placed directly in ComfyUI's ``models/embeddings`` (NAME = the file stem)."""
    return f"embedding:{Path(path).stem}"


def check_prompt_name(path: str | os.PathLike) -> None:
    """Raise :class:`WeightsError` unless ComfyUI's ``embedding:`` syntax can name this file (and it is .safetensors).

    A name with a space, ``(``, ``)``, ``,`` or ``:`` cannot be typed in a prompt: the message suggests one
    with underscores.
    """
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise WeightsError(f"{p.name}: an embedding is written as NAME.safetensors (ComfyUI's models/embeddings "
                           "reads .safetensors; .pt/.bin are pickles)")
    stem = p.stem
    if not stem or _BAD_NAME.search(stem) or stem.startswith("."):
        better = re.sub(r"_+", "_", _BAD_NAME.sub("_", stem)).strip("_.") or "category"
        raise WeightsError(f"{p.name}: ComfyUI could not find it from a prompt (embedding:NAME ends at a space, and "
                           f"( ) , : are prompt syntax); name it e.g. {better}{p.suffix}")


def embedding_tensors(bank: CategoryBank, category: str) -> tuple[str, dict[str, torch.Tensor]]:
    """The stored name of ``category`` and its vectors under embedding-file keys (see the module docstring).

    Raises:
        NameLookupError: no such category (the message suggests close names).
        FormatMismatchError: a ``tiny`` bank (its vectors fit only the small model it was trained with).
    """
    if bank.family not in EMBEDDING_KEYS:
        if bank.family in FLUX_FAMILIES:
            raise FormatMismatchError(f"a {bank.family} bank's T5 vectors have no embedding file format: load the "
                                      "bank with Load Category Bank and use Category Prompt")
        raise FormatMismatchError(f"a {bank.family} bank's vectors (width {bank.width}) fit only the small model it "
                                  "was trained with; embeddings are exported from sd15 and sdxl banks")
    cat = bank.get(category)
    return cat.name, {key: cat.vectors[_KEY_ENCODER[key]] for key in EMBEDDING_KEYS[bank.family]}


def export_embedding(bank: CategoryBank | str | os.PathLike, category: str, out: str | os.PathLike) -> EmbeddingExport:
    """Write one category of a bank as a standard embedding file, atomically (the bank's dtype, exact values).

    Args:
        bank: a :class:`CategoryBank` or the path of a bank file.
        category: the category (exact, or differing only in letter case).
        out: destination ``NAME.safetensors``; NAME is what ``embedding:NAME`` names in a ComfyUI prompt. An
            existing file is replaced (the CLI asks for ``--force`` first).

    Returns:
        An :class:`EmbeddingExport` describing the file.

    Raises:
        WeightsError: not a bank, a ``tiny`` bank, an unknown category (with suggestions), or a file name the
            ``embedding:`` syntax cannot name.
    """
    check_prompt_name(out)
    opened = not isinstance(bank, CategoryBank)
    b = CategoryBank.load(bank) if opened else bank
    try:
        name, tensors = embedding_tensors(b, category)
        meta = {"format": "pt", META + "kind": EMBEDDING_KIND, META + "family": b.family, META + "category": name,
                META + "vectors": str(b.vector_count(name)), META + "template": b.template}
        if b.path is not None:
            meta[META + "bank"] = b.path.name
        dest = atomic_save(tensors, out, meta)
        template = b.template
        family = b.family
    finally:
        if opened:
            b.close()
    pname = prompt_name(dest)
    return EmbeddingExport(dest, name, family, {k: tuple(v.shape) for k, v in tensors.items()}, pname,
                           template.replace("{id}", pname))


def is_embedding(header: Header) -> bool:
    """Whether a header looks like an SD1.5 or SDXL textual-inversion embedding (ours or not)."""
    if header.metadata.get(META + "kind") == EMBEDDING_KIND:
        return True
    keys = set(header.tensors)
    return bool(keys) and keys in ({SD15_KEY}, {"clip_l", "clip_g"}) and all(
        len(t.shape) in (1, 2) for t in header.tensors.values())


def embedding_family(header: Header) -> str:
    """``sd15`` or ``sdxl`` from an embedding file's keys and widths.

    Raises:
        MalformedFileError: keys or widths that are neither layout.
    """
    fname = header.path.name
    for family, keys in EMBEDDING_KEYS.items():
        if set(header.tensors) == set(keys):
            for key in keys:
                t = header.tensors[key]
                width = ENCODER_WIDTHS[_KEY_ENCODER[key]]
                if t.dtype not in FLOAT_DTYPES or len(t.shape) not in (1, 2) or t.shape[-1] != width:
                    raise MalformedFileError(f"{fname}: '{key}' is {t.dtype} {list(t.shape)}; an {family} embedding "
                                             f"holds float [vectors, {width}]")
            if family == "sdxl" and _rows(header, "clip_l") != _rows(header, "clip_g"):
                raise MalformedFileError(f"{fname}: clip_l has {_rows(header, 'clip_l')} vectors and clip_g "
                                         f"{_rows(header, 'clip_g')}; both text encoders need the same number")
            return family
    raise MalformedFileError(f"{fname}: tensors {sorted(header.tensors)} are neither an SD1.5 embedding "
                             f"({SD15_KEY}) nor an SDXL one (clip_l, clip_g)")


def _rows(header: Header, key: str) -> int:
    shape = header.tensors[key].shape
    return 1 if len(shape) == 1 else shape[0]


def read_embedding(path: str | os.PathLike) -> tuple[str, dict[str, torch.Tensor]]:
    """Read an embedding file: its family and key -> ``[vectors, width]`` tensors (checked finite)."""
    header = read_header(path)
    family = embedding_family(header)
    tensors, _ = load_all(header.path)
    return family, {k: check_finite(v.reshape(-1, v.shape[-1]), k, header.path) for k, v in tensors.items()}


__all__ = ["EMBEDDING_KEYS", "EMBEDDING_KIND", "EmbeddingExport", "SD15_KEY", "check_prompt_name",
           "embedding_family", "embedding_tensors", "export_embedding", "is_embedding", "prompt_name",
           "read_embedding"]
