"""The category bank's file format: one ``.safetensors`` file with every category's identifier vectors.

Layout (schema 1)::

    tensors   clip_l  [categories, vectors, 768]     SD1.5 (family "sd15")
              clip_g  [categories, vectors, 1280]    added for SDXL (family "sdxl": clip_l + clip_g)
              clip_l  [categories, vectors, width]   small self-trained models (family "tiny", any width)
              t5xxl   [categories, vectors, 4096]    Flux.1 (family "flux": T5-XXL only; its CLIP-L only pools)
    metadata  productbg.kind            "category_bank"
              productbg.schema          "1"
              productbg.family          "sd15" | "sdxl" | "flux" | "tiny" | "tiny-sdxl"
              productbg.width           "32"  (family "tiny" only: the text width of its clip_l vectors)
              productbg.categories      JSON list of names (UTF-8), row i of every tensor is category i
              productbg.template        "a product photo on a {id} background"
              productbg.vectors_per_id  "4"   (the most any category has: the tensors' second dimension)
              productbg.vector_counts   JSON list, each category's own vector count (schema 2 only; see below)
              productbg.loras           JSON {name: {"file": "x.safetensors", "strength": 0.8}} (optional)
              productbg.training        JSON {"dataset": ..., "steps": ..., "date": ...} (optional)

Widths: "sd15" and "sdxl" fix them (768 for ``clip_l``, 1280 for ``clip_g``) and write no ``productbg.width``,
so their files are unchanged. A "tiny" bank's width is whatever its text encoder has; it is written to
``productbg.width``. "tiny" files without ``productbg.width`` (written by earlier productbg versions) take the
width from their tensor.

Per-category vector counts (schema 2): a bank whose categories have different numbers of vectors (e.g. one
made by ``productbg bank from-text``, where each category's vectors are its description's tokens) stores every
row padded with zeros to ``vectors_per_id`` and records each category's own count in
``productbg.vector_counts``; such a file is written with schema "2", so that an older productbg refuses it
("upgrade productbg") rather than reading the padding as vectors. A bank whose categories all have
``vectors_per_id`` vectors is written exactly as before (schema "1", no ``vector_counts``); schema-1 files keep
loading, every category having ``vectors_per_id`` vectors.

This module reads and writes the header (:func:`parse_bank_header`, :func:`bank_metadata`) and holds the
rules every field obeys; :class:`~.bank.CategoryBank` is the object built on it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .bank_names import check_name
from .category_lora import CategoryLora, loras_json, parse_loras
from .errors import FormatMismatchError, MalformedFileError, WeightsError
from .safefile import FLOAT_DTYPES, Header, parse_json_value

BANK_KIND = "category_bank"
SCHEMA_VERSION = 2
#: Schema of files without per-category vector counts (every file written before schema 2, and those since).
UNIFORM_SCHEMA = 1
DEFAULT_TEMPLATE = "a product photo on a {id} background"
ENCODER_WIDTHS: dict[str, int] = {"clip_l": 768, "clip_g": 1280, "t5xxl": 4096}
TINY_FAMILY = "tiny"
#: Small self-trained SDXL-shaped models (two text encoders of free widths): tests and experiments.
TINY_SDXL_FAMILY = "tiny-sdxl"
#: The encoders whose input space a family's identifier vectors live in (Flux's CLIP-L only pools: a Flux bank holds
#: T5-XXL vectors alone).
FAMILY_ENCODERS: dict[str, tuple[str, ...]] = {"sd15": ("clip_l",), "sdxl": ("clip_l", "clip_g"), "flux": ("t5xxl",),
                                               TINY_FAMILY: ("clip_l",), TINY_SDXL_FAMILY: ("clip_l", "clip_g")}
#: Families whose text widths are not fixed: they are recorded in the file (``productbg.width`` for clip_l,
#: ``productbg.width_clip_g`` for clip_g).
FREE_WIDTH_FAMILIES = frozenset({TINY_FAMILY, TINY_SDXL_FAMILY})
MAX_WIDTH = 16384
MAX_VECTORS = 75  # a CLIP prompt chunk holds 77 tokens, two of them start/end
META = "productbg."


@dataclass
class BankMeta:
    """A bank's settings, as its header records them."""

    family: str = "sd15"
    vectors_per_id: int = 1
    template: str = DEFAULT_TEMPLATE
    training: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    width: int | None = None  # clip_l width of a free-width family; None until known
    width_g: int | None = None  # clip_g width of a free-width two-encoder family (tiny-sdxl); None until known
    counts: list[int] | None = None  # each category's own vector count (schema 2); None = all vectors_per_id


def is_bank(header: Header) -> bool:
    """Whether a safetensors header says it is a category bank."""
    return header.metadata.get(META + "kind") == BANK_KIND


# ---------------------------------------------------------------------- field rules
def check_family(family: str) -> None:
    if family not in FAMILY_ENCODERS:
        raise WeightsError(f"unknown base family {family!r}; known: {', '.join(FAMILY_ENCODERS)}")


def check_width(family: str, width: Any, encoder: str = "clip_l") -> None:
    if width is None:
        return
    if type(width) is not int or not 1 <= width <= MAX_WIDTH:
        raise WeightsError(f"bank width must be an integer 1..{MAX_WIDTH}, got {width!r}")
    fixed = ENCODER_WIDTHS[encoder]
    if family not in FREE_WIDTH_FAMILIES and width != fixed:
        what = "width" if encoder == "clip_l" else f"{encoder} width"
        small = TINY_SDXL_FAMILY if "clip_g" in FAMILY_ENCODERS.get(family, ()) else TINY_FAMILY
        raise WeightsError(f"{family} banks have {what} {fixed}, not {width}; vectors of a small self-trained "
                           f"model go in a '{small}' bank")


def check_vectors_per_id(n: Any) -> None:
    if type(n) is not int or not 1 <= n <= MAX_VECTORS:
        raise WeightsError(f"vectors per identifier must be an integer 1..{MAX_VECTORS}, got {n!r}")


def check_template(template: Any) -> None:
    if not isinstance(template, str) or template.count("{id}") != 1:
        raise WeightsError(f"prompt template must contain '{{id}}' exactly once, got {template!r}")


# ---------------------------------------------------------------------- writing
def bank_metadata(meta: BankMeta, names: list[str], loras: Mapping[str, CategoryLora],
                  counts: list[int] | None = None) -> dict[str, str]:
    """The header metadata a bank with these settings, names, LoRA references and per-category vector counts
    (None, or all ``vectors_per_id``: a schema-1 file as before) saves with."""
    varied = counts is not None and any(c != meta.vectors_per_id for c in counts)
    out = {
        "format": "pt",
        META + "kind": BANK_KIND,
        META + "schema": str(SCHEMA_VERSION if varied else UNIFORM_SCHEMA),
        META + "family": meta.family,
        META + "categories": json.dumps(names, ensure_ascii=False),
        META + "template": meta.template,
        META + "vectors_per_id": str(meta.vectors_per_id),
    }
    if varied:
        out[META + "vector_counts"] = json.dumps(list(counts))
    if meta.family in FREE_WIDTH_FAMILIES and meta.width is not None:
        out[META + "width"] = str(meta.width)
    if meta.family in FREE_WIDTH_FAMILIES and meta.width_g is not None:
        out[META + "width_clip_g"] = str(meta.width_g)
    if loras:
        out[META + "loras"] = loras_json(loras)
    if meta.training:
        out[META + "training"] = json.dumps(meta.training, ensure_ascii=False, default=str)
    return out


# ---------------------------------------------------------------------- reading
def parse_bank_header(header: Header) -> tuple[BankMeta, list[str], dict[str, CategoryLora]]:
    """A bank file's settings, names (row order) and LoRA references, every field and tensor shape checked.

    Raises:
        FormatMismatchError: not a bank, or a newer schema.
        MalformedFileError: a bank whose header or tensors break the layout.
    """
    meta, fname = header.metadata, header.path.name
    if not is_bank(header):
        raise FormatMismatchError(f"{fname}: not a category bank (metadata '{META}kind' is "
                                  f"{meta.get(META + 'kind')!r}); run 'productbg weights inspect' to see what it is")
    try:
        _check_schema(meta.get(META + "schema"), fname)
        family = meta.get(META + "family", "")
        check_family(family)
        vpi = _int_field(meta, "vectors_per_id", fname)
        check_vectors_per_id(vpi)
        width = _int_field(meta, "width", fname) if META + "width" in meta else None
        check_width(family, width)
        width_g = _int_field(meta, "width_clip_g", fname) if META + "width_clip_g" in meta else None
        check_width(family, width_g, "clip_g")
        template = meta.get(META + "template", DEFAULT_TEMPLATE)
        check_template(template)
        names = _parse_names(_json_field(meta, "categories", header), fname)
        counts = _parse_counts(meta, header, len(names), vpi)
        loras = parse_loras(_json_field(meta, "loras", header, default={}), names, fname)
        training = _json_field(meta, "training", header, default={})
        if not isinstance(training, dict):
            raise MalformedFileError(f"{fname}: bank metadata 'training' must be a JSON object")
        dtype, widths = _check_bank_tensors(header, family, len(names), vpi,
                                            {"clip_l": width, "clip_g": width_g})
    except (MalformedFileError, FormatMismatchError):
        raise
    except WeightsError as e:
        raise MalformedFileError(f"{fname}: {e}") from None
    free = family in FREE_WIDTH_FAMILIES
    return BankMeta(family, vpi, template, training, dtype, widths.get("clip_l") if free else None,
                    widths.get("clip_g") if free else None, counts), names, loras


def _parse_counts(meta: Mapping[str, str], header: Header, count: int, vpi: int) -> list[int] | None:
    """Each category's own vector count (schema 2), or None when the file has none (all ``vectors_per_id``)."""
    fname = header.path.name
    if META + "vector_counts" not in meta:
        if meta.get(META + "schema") == str(SCHEMA_VERSION):
            raise MalformedFileError(f"{fname}: a schema {SCHEMA_VERSION} bank lacks '{META}vector_counts'")
        return None
    counts = _json_field(meta, "vector_counts", header)
    if (not isinstance(counts, list) or len(counts) != count
            or any(type(c) is not int or not 1 <= c <= vpi for c in counts)):
        raise MalformedFileError(f"{fname}: bank metadata 'vector_counts' must be a JSON list of {count} integers "
                                 f"1..{vpi} (vectors_per_id), got {meta[META + 'vector_counts'][:80]!r}")
    return counts


def _json_field(meta: Mapping[str, str], key: str, header: Header, default: Any = None) -> Any:
    if META + key not in meta:
        if default is not None:
            return default
        raise MalformedFileError(f"{header.path.name}: bank metadata lacks '{META + key}'")
    return parse_json_value(meta[META + key], META + key, header.path)


def _check_schema(value: str | None, fname: str) -> None:
    if value is None or not value.isdigit():
        raise MalformedFileError(f"{fname}: bank schema version missing or not a number ({value!r})")
    if int(value) > SCHEMA_VERSION:
        raise FormatMismatchError(f"{fname}: bank schema {value} was written by a newer productbg; this version "
                                  f"reads schema {SCHEMA_VERSION} — upgrade productbg")
    if int(value) < 1:
        raise MalformedFileError(f"{fname}: bank schema {value} is invalid")


def _int_field(meta: Mapping[str, str], key: str, fname: str) -> int:
    value = meta.get(META + key, "")
    if not value.isascii() or not value.isdigit() or len(value) > 6:
        raise MalformedFileError(f"{fname}: bank metadata '{META + key}' must be a small integer, got {value!r}")
    return int(value)


def _parse_names(names: Any, fname: str) -> list[str]:
    if not isinstance(names, list):
        raise MalformedFileError(f"{fname}: bank metadata 'categories' must be a JSON list of names")
    out = [check_name(n) for n in names]
    if len(set(out)) != len(out):
        seen: set[str] = set()
        dup = next(n for n in out if n in seen or seen.add(n))  # type: ignore[func-returns-value]
        raise MalformedFileError(f"{fname}: category '{dup}' appears twice")
    return out


def _check_bank_tensors(header: Header, family: str, count: int, vpi: int,
                        meta_widths: Mapping[str, int | None]) -> tuple[torch.dtype, dict[str, int | None]]:
    """The tensors' dtype, and a free-width family's widths per encoder (from metadata, or the tensor when it
    has none)."""
    fname = header.path.name
    wanted = FAMILY_ENCODERS[family]
    if set(header.tensors) != set(wanted):
        raise MalformedFileError(f"{fname}: a {family} bank holds tensors {list(wanted)}, this file has "
                                 f"{sorted(header.tensors)}")
    dtypes = set()
    widths: dict[str, int | None] = {}
    for enc in wanted:
        width = meta_widths.get(enc)
        from_meta = width is not None
        info = header.tensors[enc]
        if info.dtype not in FLOAT_DTYPES:
            raise MalformedFileError(f"{fname}: '{enc}' has dtype {info.dtype}; expected F16, BF16, F32 or F64")
        if family in FREE_WIDTH_FAMILIES:
            if width is None:  # written before banks recorded their width: the tensor says it
                if len(info.shape) != 3 or not 1 <= info.shape[2] <= MAX_WIDTH:
                    raise MalformedFileError(f"{fname}: '{enc}' has shape {list(info.shape)}; a {family} bank "
                                             f"holds [categories, vectors, width] with width 1..{MAX_WIDTH}")
                width = int(info.shape[2])
            key = "width" if enc == "clip_l" else f"width_{enc}"
            enc_width, source = width, f" (metadata '{META}{key}')" if from_meta else ""
            widths[enc] = width
        else:
            enc_width, source = ENCODER_WIDTHS[enc], ""
        expect = (count, vpi, enc_width)
        if info.shape != expect:
            raise MalformedFileError(f"{fname}: '{enc}' has shape {list(info.shape)} but the metadata says "
                                     f"{count} categories x {vpi} vectors x {enc_width}{source} = {list(expect)}")
        dtypes.add(FLOAT_DTYPES[info.dtype])
    if len(dtypes) > 1:
        raise MalformedFileError(f"{fname}: bank tensors have different dtypes")
    return dtypes.pop(), widths
