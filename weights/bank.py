"""The category bank: one ``.safetensors`` file with every category's identifier vectors.

Layout (schema 1)::

    tensors   clip_l  [categories, vectors, 768]     SD1.5 (family "sd15")
              clip_g  [categories, vectors, 1280]    added for SDXL (family "sdxl": clip_l + clip_g)
              clip_l  [categories, vectors, width]   small self-trained models (family "tiny", any width)
    metadata  productbg.kind            "category_bank"
              productbg.schema          "1"
              productbg.family          "sd15" | "sdxl" | "tiny"
              productbg.width           "32"  (family "tiny" only: the text width of its clip_l vectors)
              productbg.categories      JSON list of names (UTF-8), row i of every tensor is category i
              productbg.template        "a product photo on a {id} background"
              productbg.vectors_per_id  "4"
              productbg.loras           JSON {name: {"file": "x.safetensors", "strength": 0.8}} (optional)
              productbg.training        JSON {"dataset": ..., "steps": ..., "date": ...} (optional)

:meth:`CategoryBank.load` validates the header and memory-maps the file; names come from the header and a
category's vectors are read only when it is looked up.

Widths: "sd15" and "sdxl" fix them (768 for ``clip_l``, 1280 for ``clip_g``) and write no ``productbg.width``,
so their files are unchanged. A "tiny" bank's width is whatever its text encoder has: given to the
constructor (``width=``), or fixed by the first category added; it is written to ``productbg.width`` and every
later ``add``, ``merge`` and load is checked against it. "tiny" files without ``productbg.width`` (written by
earlier productbg versions) take the width from their tensor.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from .errors import FormatMismatchError, MalformedFileError, NameLookupError, WeightsError
from .safefile import FLOAT_DTYPES, Header, SafeReader, atomic_save, check_finite, parse_json_value, read_header

BANK_KIND = "category_bank"
SCHEMA_VERSION = 1
DEFAULT_TEMPLATE = "a product photo on a {id} background"
ENCODER_WIDTHS: dict[str, int] = {"clip_l": 768, "clip_g": 1280}
TINY_FAMILY = "tiny"
FAMILY_ENCODERS: dict[str, tuple[str, ...]] = {"sd15": ("clip_l",), "sdxl": ("clip_l", "clip_g"),
                                               TINY_FAMILY: ("clip_l",)}
#: Families whose text width is not fixed: it is recorded in the file (``productbg.width``).
FREE_WIDTH_FAMILIES = frozenset({TINY_FAMILY})
MAX_WIDTH = 16384
MAX_VECTORS = 75  # a CLIP prompt chunk holds 77 tokens, two of them start/end
MAX_NAME_CHARS = 256
META = "productbg."


@dataclass(frozen=True)
class CategoryLora:
    """An optional per-category LoRA, looked up by file name in ComfyUI's ``models/loras``.

    Attributes:
        file: bare file name, e.g. ``"shoes.safetensors"``.
        strength: model strength to apply it with.
    """

    file: str
    strength: float = 1.0


@dataclass(frozen=True)
class Category:
    """One looked-up category.

    Attributes:
        name: the stored name (the query may have differed in case).
        index: row in the bank's tensors.
        vectors: encoder name (``"clip_l"``...) -> ``[vectors, width]`` identifier vectors.
        lora: the category's LoRA, if any.
        template: the bank's prompt template; ``{id}`` marks where the vectors go.
    """

    name: str
    index: int
    vectors: dict[str, torch.Tensor]
    lora: CategoryLora | None
    template: str


class _Row:
    """Where one category's vectors live: a row of an open file, or tensors in memory."""

    __slots__ = ("reader", "index", "tensors")

    def __init__(self, reader: SafeReader | None = None, index: int = 0,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
        self.reader, self.index, self.tensors = reader, index, tensors

    def get(self, encoder: str) -> torch.Tensor:
        if self.tensors is not None:
            return self.tensors[encoder]
        assert self.reader is not None
        return self.reader.rows(encoder, self.index, self.index + 1)[0]


@dataclass
class _Meta:
    family: str = "sd15"
    vectors_per_id: int = 1
    template: str = DEFAULT_TEMPLATE
    training: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    width: int | None = None  # clip_l width of a free-width family; None until known


class CategoryBank:
    """Identifier vectors for many categories, with name lookup and atomic saving.

    Args:
        family: base model family, ``"sd15"`` (or ``"sdxl"``, which adds ``clip_g``), or ``"tiny"`` for small
            self-trained models whose text width is not SD's.
        vectors_per_id: vectors per identifier (1..75).
        template: prompt template containing ``{id}`` once.
        training: provenance (dataset, steps, date, ...), stored as JSON.
        dtype: dtype the vectors are stored in.
        width: text width of the ``clip_l`` vectors. For ``"tiny"``: optional, else the first category added
            fixes it. For ``"sd15"``/``"sdxl"`` it is 768 and may be omitted.
    """

    def __init__(self, family: str = "sd15", vectors_per_id: int = 1, template: str = DEFAULT_TEMPLATE,
                 training: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32,
                 width: int | None = None) -> None:
        _check_family(family)
        _check_vectors_per_id(vectors_per_id)
        _check_template(template)
        _check_width(family, width)
        if dtype not in FLOAT_DTYPES.values():
            raise WeightsError(f"bank dtype must be a float dtype, got {dtype}")
        self._meta = _Meta(family, vectors_per_id, template, dict(training or {}), dtype,
                           width if family in FREE_WIDTH_FAMILIES else None)
        self._names: list[str] = []
        self._rows: list[_Row] = []
        self._loras: dict[str, CategoryLora] = {}
        self._index: dict[str, int] = {}
        self._folded: dict[str, list[str]] = {}
        self._reader: SafeReader | None = None
        self.path: Path | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike) -> "CategoryBank":
        """Open a bank file lazily (header validated, tensors memory-mapped, rows read on lookup).

        Args:
            path: a ``.safetensors`` category bank.

        Returns:
            The bank. Close it (or use ``with``) to release the memory map.

        Raises:
            WeightsError: if the file is not a valid category bank.
        """
        header = read_header(path)
        meta, names, loras = _parse_bank_header(header)
        bank = cls(meta.family, meta.vectors_per_id, meta.template, meta.training, meta.dtype, meta.width)
        bank._loras = loras
        bank._attach(SafeReader(header.path, header), names)
        return bank

    def _attach(self, reader: SafeReader, names: list[str]) -> None:
        self._reader, self.path = reader, reader.path
        self._names = names
        self._rows = [_Row(reader, i) for i in range(len(names))]
        self._reindex()

    def close(self) -> None:
        """Release the memory-mapped file. Rows not yet read become unreadable."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def __enter__(self) -> "CategoryBank":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ properties
    @property
    def family(self) -> str:
        """Base model family (``"sd15"``, ``"sdxl"`` or ``"tiny"``)."""
        return self._meta.family

    @property
    def width(self) -> int | None:
        """Text width of the ``clip_l`` vectors (768 for sd15/sdxl); ``None`` for a tiny bank not yet given one."""
        return self._width("clip_l")

    def _width(self, encoder: str) -> int | None:
        if self._meta.family in FREE_WIDTH_FAMILIES:
            return self._meta.width
        return ENCODER_WIDTHS[encoder]

    @property
    def encoders(self) -> tuple[str, ...]:
        """Text encoders that have vectors, e.g. ``("clip_l",)``."""
        return FAMILY_ENCODERS[self._meta.family]

    @property
    def vectors_per_id(self) -> int:
        """Vectors per identifier."""
        return self._meta.vectors_per_id

    @property
    def template(self) -> str:
        """Default prompt template; ``{id}`` marks the identifier."""
        return self._meta.template

    @template.setter
    def template(self, value: str) -> None:
        _check_template(value)
        self._meta.template = value

    @property
    def training(self) -> dict[str, Any]:
        """Training provenance (mutable dict, saved as JSON)."""
        return self._meta.training

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the vectors."""
        return self._meta.dtype

    @property
    def names(self) -> list[str]:
        """Category names in row order (a copy)."""
        return list(self._names)

    @property
    def loras(self) -> dict[str, CategoryLora]:
        """Category name -> LoRA, for categories that have one (a copy)."""
        return dict(self._loras)

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __contains__(self, name: object) -> bool:
        try:
            return isinstance(name, str) and self._find(name) is not None
        except NameLookupError:  # several names differ only in case: it is there, just ambiguous
            return True

    def __repr__(self) -> str:
        where = f" from {self.path.name}" if self.path else ""
        family = f"{self.family} width {self.width}" if self.family in FREE_WIDTH_FAMILIES else self.family
        return f"CategoryBank({len(self)} categories, {family}, {self.vectors_per_id} vectors{where})"

    # ------------------------------------------------------------------ lookup
    def resolve(self, name: str) -> str:
        """Return the stored name for a query: exact match first, then case-insensitive.

        Raises:
            NameLookupError: on a miss, with "did you mean ..." suggestions, or when a case-insensitive
                query matches several categories.
        """
        found = self._find(name)
        if found is None:
            raise NameLookupError(self._miss_message(name))
        return found

    def get(self, name: str) -> Category:
        """Look up a category and read its vectors.

        Args:
            name: category name; exact, or differing only in letter case.

        Returns:
            The :class:`Category`.

        Raises:
            NameLookupError: unknown or ambiguous name (message suggests close names).
            WeightsError: the stored vectors are NaN/inf.
        """
        stored = self.resolve(name)
        i = self._index[stored]
        vectors = {enc: self._rows[i].get(enc) for enc in self.encoders}
        return Category(stored, i, vectors, self._loras.get(stored), self.template)

    def vectors(self, name: str, encoder: str = "clip_l") -> torch.Tensor:
        """The ``[vectors, width]`` identifier vectors of one category for one text encoder."""
        if encoder not in self.encoders:
            raise WeightsError(f"bank ({self.family}) has no '{encoder}' vectors; it has {', '.join(self.encoders)}")
        return self._rows[self._index[self.resolve(name)]].get(encoder)

    def suggest(self, name: str, n: int = 3) -> list[str]:
        """Up to ``n`` stored names close to ``name`` (difflib ratio, case-insensitive; then substrings)."""
        if not isinstance(name, str):
            return []
        query = _normalize(name).casefold()
        close = difflib.get_close_matches(query, list(self._folded), n=n, cutoff=0.6)
        out = [s for key in close for s in self._folded[key]]
        if len(out) < n and query:
            out += [s for s in self._names if query in s.casefold() and s not in out]
        return out[:n]

    def _find(self, name: str) -> str | None:
        if not isinstance(name, str):
            raise NameLookupError(f"category names are strings, got {type(name).__name__}")
        query = _normalize(name)
        if query in self._index:
            return query
        matches = self._folded.get(query.casefold(), [])
        if len(matches) > 1:
            raise NameLookupError(f"'{name}' matches several categories that differ only in case: "
                                  f"{', '.join(repr(m) for m in matches)}; use the exact name")
        return matches[0] if matches else None

    def _miss_message(self, name: str) -> str:
        where = f" in {self.path.name}" if self.path else ""
        msg = f"no category '{name}'{where} ({len(self)} categories)"
        hints = self.suggest(name)
        return msg + (f"; did you mean {', '.join(repr(h) for h in hints)}?" if hints else "")

    def _reindex(self) -> None:
        self._index = {n: i for i, n in enumerate(self._names)}
        self._folded = {}
        for n in self._names:
            self._folded.setdefault(n.casefold(), []).append(n)

    # ------------------------------------------------------------------ editing
    def add(self, name: str, vectors: torch.Tensor | Mapping[str, torch.Tensor], *,
            lora: CategoryLora | None = None, replace: bool = False) -> None:
        """Add a category (or replace one with ``replace=True``).

        Args:
            name: category name (any script; stored NFC-normalized).
            vectors: ``[vectors_per_id, width]`` (768 for sd15; a tiny bank's width, or any width for the
                first category of a tiny bank without one), or a mapping encoder -> tensor.
            lora: optional per-category LoRA.
            replace: overwrite an existing category of the same name instead of raising.
        """
        name = _check_name(name)
        tensors = self._check_vectors(name, vectors)
        if lora is not None:
            _check_lora(name, lora)
        if name in self._index and not replace:
            raise WeightsError(f"category '{name}' already exists (pass replace=True to overwrite)")
        if self.family in FREE_WIDTH_FAMILIES and self._meta.width is None:
            self._meta.width = int(tensors["clip_l"].shape[-1])  # the first vectors fix a tiny bank's width
        if name in self._index:
            self._rows[self._index[name]] = _Row(tensors=tensors)
        else:
            self._names.append(name)
            self._rows.append(_Row(tensors=tensors))
            self._index[name] = len(self._names) - 1
            self._folded.setdefault(name.casefold(), []).append(name)
        self._loras.pop(name, None)
        if lora is not None:
            self._loras[name] = lora

    def rename(self, old: str, new: str) -> None:
        """Rename a category (``old`` may differ in case); the new name must be free."""
        stored = self.resolve(old)
        new = _check_name(new)
        if new in self._index and new != stored:
            raise WeightsError(f"cannot rename '{stored}' to '{new}': that category already exists")
        self._names[self._index[stored]] = new
        if stored in self._loras:
            self._loras[new] = self._loras.pop(stored)
        self._reindex()

    def remove(self, name: str) -> None:
        """Remove a category (``name`` may differ in case)."""
        stored = self.resolve(name)
        i = self._index[stored]
        del self._names[i], self._rows[i]
        self._loras.pop(stored, None)
        self._reindex()

    def set_lora(self, name: str, lora: CategoryLora | None) -> None:
        """Attach (or with ``None`` detach) a per-category LoRA."""
        stored = self.resolve(name)
        if lora is None:
            self._loras.pop(stored, None)
        else:
            self._loras[stored] = _check_lora(stored, lora)

    def merge(self, other: "CategoryBank", on_conflict: str = "error") -> "CategoryBank":
        """Add every category of ``other`` to this bank (its vectors are read now).

        Args:
            other: a bank of the same family, width and vectors per identifier.
            on_conflict: ``"error"`` (default), ``"keep"`` (ours wins) or ``"replace"`` (theirs wins)
                when both banks have a category of the same name.

        Returns:
            ``self``.
        """
        self._check_mergeable(other, on_conflict)
        for name in other._names:
            if name in self._index and on_conflict == "keep":
                continue
            row = other._rows[other._index[name]]
            vectors = {enc: row.get(enc) for enc in other.encoders}
            self.add(name, vectors, lora=other._loras.get(name), replace=True)
        if other.training:
            self._meta.training.setdefault("merged_from", []).append(other.training)
        return self

    def _check_mergeable(self, other: "CategoryBank", on_conflict: str) -> None:
        if on_conflict not in ("error", "keep", "replace"):
            raise WeightsError(f"on_conflict must be 'error', 'keep' or 'replace', not {on_conflict!r}")
        if (other.family, other.vectors_per_id) != (self.family, self.vectors_per_id):
            raise WeightsError(
                f"cannot merge a {other.family} bank with {other.vectors_per_id} vectors per identifier into a "
                f"{self.family} bank with {self.vectors_per_id}"
            )
        if self.width is not None and other.width is not None and other.width != self.width:
            raise WeightsError(
                f"cannot merge a {other.family} bank of width {other.width} into a {self.family} bank of width "
                f"{self.width}: identifier vectors only fit the text encoder they were trained for"
            )
        clash = [n for n in other._names if n in self._index]
        if clash and on_conflict == "error":
            raise WeightsError(f"both banks have {len(clash)} categories of the same name (e.g. '{clash[0]}'); "
                               "pass on_conflict='keep' or 'replace'")

    def _check_vectors(self, name: str, vectors: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if isinstance(vectors, torch.Tensor):
            if len(self.encoders) != 1:
                raise WeightsError(f"a {self.family} bank needs vectors for {', '.join(self.encoders)}: pass a dict")
            vectors = {self.encoders[0]: vectors}
        if set(vectors) != set(self.encoders):
            raise WeightsError(f"category '{name}': vectors for {sorted(vectors)} given, bank needs "
                               f"{list(self.encoders)}")
        out = {}
        for enc in self.encoders:
            t = vectors[enc]
            width = self._width(enc)
            got = f"got {getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}"
            if width is None:  # a tiny bank's first vectors: any width in range
                if (not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim != 2
                        or t.shape[0] != self.vectors_per_id or not 1 <= t.shape[1] <= MAX_WIDTH):
                    raise WeightsError(f"category '{name}': {enc} vectors must be a float tensor of shape "
                                       f"[{self.vectors_per_id}, width] (width 1..{MAX_WIDTH}), {got}")
            else:
                want = (self.vectors_per_id, width)
                if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != want:
                    fixed = f" (this {self.family} bank's width is {width})" if self.family in FREE_WIDTH_FAMILIES else ""
                    raise WeightsError(f"category '{name}': {enc} vectors must be a float tensor of shape "
                                       f"{list(want)}{fixed}, {got}")
            out[enc] = check_finite(t.detach().to("cpu", self.dtype).clone(), f"{enc} of '{name}'")
        return out

    # ------------------------------------------------------------------ saving
    def tensors(self) -> dict[str, torch.Tensor]:
        """All vectors stacked: encoder -> ``[categories, vectors, width]`` (reads every row)."""
        cache: dict[tuple[int, str], torch.Tensor] = {}
        out = {}
        for enc in self.encoders:
            rows = [self._row_tensor(r, enc, cache) for r in self._rows]
            if rows:
                out[enc] = torch.stack(rows).to(self.dtype)
                continue
            width = self._width(enc)
            if width is None:
                raise WeightsError(f"this empty {self.family} bank has no width yet: add a category or pass width=")
            out[enc] = torch.zeros(0, self.vectors_per_id, width, dtype=self.dtype)
        return out

    @staticmethod
    def _row_tensor(row: _Row, enc: str, cache: dict[tuple[int, str], torch.Tensor]) -> torch.Tensor:
        if row.tensors is not None:
            return row.tensors[enc]
        assert row.reader is not None
        key = (id(row.reader), enc)
        if key not in cache:
            cache[key] = row.reader.tensor(enc)
        return cache[key][row.index]

    def metadata(self) -> dict[str, str]:
        """The header metadata this bank saves with."""
        meta = {
            "format": "pt",
            META + "kind": BANK_KIND,
            META + "schema": str(SCHEMA_VERSION),
            META + "family": self.family,
            META + "categories": json.dumps(self._names, ensure_ascii=False),
            META + "template": self.template,
            META + "vectors_per_id": str(self.vectors_per_id),
        }
        if self.family in FREE_WIDTH_FAMILIES and self.width is not None:
            meta[META + "width"] = str(self.width)
        if self._loras:
            meta[META + "loras"] = json.dumps(
                {n: {"file": lo.file, "strength": lo.strength} for n, lo in self._loras.items()}, ensure_ascii=False)
        if self.training:
            meta[META + "training"] = json.dumps(self.training, ensure_ascii=False, default=str)
        return meta

    def save(self, path: str | os.PathLike) -> Path:
        """Write the bank atomically (temp file in the same folder, then ``os.replace``).

        Saving over the file the bank was loaded from is safe. Afterwards the bank reads lazily from the
        new file.

        Args:
            path: destination ``.safetensors`` path.

        Returns:
            The path written.
        """
        stacked = self.tensors()
        self._rows = [_Row(tensors={e: stacked[e][i] for e in self.encoders}) for i in range(len(self))]
        self.close()
        dest = atomic_save(stacked, path, self.metadata())
        self._attach(SafeReader(dest), list(self._names))
        return dest


# ---------------------------------------------------------------------- validation helpers
def load_bank(path: str | os.PathLike) -> CategoryBank:
    """Open a category bank lazily. Same as :meth:`CategoryBank.load`."""
    return CategoryBank.load(path)


def is_bank(header: Header) -> bool:
    """Whether a safetensors header says it is a category bank."""
    return header.metadata.get(META + "kind") == BANK_KIND


def _normalize(name: str) -> str:
    return unicodedata.normalize("NFC", name.strip()) if isinstance(name, str) else name


def _check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise WeightsError(f"category names must be strings, got {type(name).__name__}")
    norm = unicodedata.normalize("NFC", name)
    if not norm.strip():
        raise WeightsError("category names must not be empty")
    if norm != norm.strip():
        raise WeightsError(f"category name {name!r} has leading or trailing spaces")
    if len(norm) > MAX_NAME_CHARS:
        raise WeightsError(f"category name is {len(norm)} characters; the limit is {MAX_NAME_CHARS}")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in norm):
        raise WeightsError(f"category name {name!r} contains control characters")
    return norm


def _check_family(family: str) -> None:
    if family not in FAMILY_ENCODERS:
        raise WeightsError(f"unknown base family {family!r}; known: {', '.join(FAMILY_ENCODERS)}")


def _check_width(family: str, width: Any) -> None:
    if width is None:
        return
    if type(width) is not int or not 1 <= width <= MAX_WIDTH:
        raise WeightsError(f"bank width must be an integer 1..{MAX_WIDTH}, got {width!r}")
    fixed = ENCODER_WIDTHS["clip_l"]
    if family not in FREE_WIDTH_FAMILIES and width != fixed:
        raise WeightsError(f"{family} banks have width {fixed}, not {width}; vectors of a small self-trained "
                           f"model go in a '{TINY_FAMILY}' bank")


def _check_vectors_per_id(n: Any) -> None:
    if type(n) is not int or not 1 <= n <= MAX_VECTORS:
        raise WeightsError(f"vectors per identifier must be an integer 1..{MAX_VECTORS}, got {n!r}")


def _check_template(template: Any) -> None:
    if not isinstance(template, str) or template.count("{id}") != 1:
        raise WeightsError(f"prompt template must contain '{{id}}' exactly once, got {template!r}")


def _check_lora(name: str, lora: Any) -> CategoryLora:
    if not isinstance(lora, CategoryLora):
        raise WeightsError(f"category '{name}': lora must be a CategoryLora")
    file, strength = lora.file, lora.strength
    if (not isinstance(file, str) or not file.lower().endswith(".safetensors") or "/" in file or "\\" in file
            or file.startswith(".")):
        raise WeightsError(f"category '{name}': LoRA must be a bare .safetensors file name, got {file!r}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise WeightsError(f"category '{name}': LoRA strength must be a finite number, got {strength!r}")
    return lora


def _json_field(meta: Mapping[str, str], key: str, header: Header, default: Any = None) -> Any:
    if META + key not in meta:
        if default is not None:
            return default
        raise MalformedFileError(f"{header.path.name}: bank metadata lacks '{META + key}'")
    return parse_json_value(meta[META + key], META + key, header.path)


def _parse_bank_header(header: Header) -> tuple[_Meta, list[str], dict[str, CategoryLora]]:
    meta, fname = header.metadata, header.path.name
    if not is_bank(header):
        raise FormatMismatchError(f"{fname}: not a category bank (metadata '{META}kind' is "
                                  f"{meta.get(META + 'kind')!r}); run 'productbg weights inspect' to see what it is")
    try:
        _check_schema(meta.get(META + "schema"), fname)
        family = meta.get(META + "family", "")
        _check_family(family)
        vpi = _int_field(meta, "vectors_per_id", fname)
        _check_vectors_per_id(vpi)
        width = _int_field(meta, "width", fname) if META + "width" in meta else None
        _check_width(family, width)
        template = meta.get(META + "template", DEFAULT_TEMPLATE)
        _check_template(template)
        names = _parse_names(_json_field(meta, "categories", header), fname)
        loras = _parse_loras(_json_field(meta, "loras", header, default={}), names, fname)
        training = _json_field(meta, "training", header, default={})
        if not isinstance(training, dict):
            raise MalformedFileError(f"{fname}: bank metadata 'training' must be a JSON object")
        dtype, width = _check_bank_tensors(header, family, len(names), vpi, width)
    except (MalformedFileError, FormatMismatchError):
        raise
    except WeightsError as e:
        raise MalformedFileError(f"{fname}: {e}") from None
    return _Meta(family, vpi, template, training, dtype, width if family in FREE_WIDTH_FAMILIES else None), names, loras


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
    out = [_check_name(n) for n in names]
    if len(set(out)) != len(out):
        seen: set[str] = set()
        dup = next(n for n in out if n in seen or seen.add(n))  # type: ignore[func-returns-value]
        raise MalformedFileError(f"{fname}: category '{dup}' appears twice")
    return out


def _parse_loras(raw: Any, names: list[str], fname: str) -> dict[str, CategoryLora]:
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
        out[name] = _check_lora(name, CategoryLora(entry["file"], entry.get("strength", 1.0)))
    return out


def _check_bank_tensors(header: Header, family: str, count: int, vpi: int,
                        width: int | None) -> tuple[torch.dtype, int | None]:
    """The tensors' dtype, and a free-width family's width (from metadata, or the tensor when it has none)."""
    fname = header.path.name
    wanted = FAMILY_ENCODERS[family]
    if set(header.tensors) != set(wanted):
        raise MalformedFileError(f"{fname}: a {family} bank holds tensors {list(wanted)}, this file has "
                                 f"{sorted(header.tensors)}")
    dtypes = set()
    from_meta = width is not None
    for enc in wanted:
        info = header.tensors[enc]
        if info.dtype not in FLOAT_DTYPES:
            raise MalformedFileError(f"{fname}: '{enc}' has dtype {info.dtype}; expected F16, BF16, F32 or F64")
        if family in FREE_WIDTH_FAMILIES:
            if width is None:  # written before banks recorded their width: the tensor says it
                if len(info.shape) != 3 or not 1 <= info.shape[2] <= MAX_WIDTH:
                    raise MalformedFileError(f"{fname}: '{enc}' has shape {list(info.shape)}; a {family} bank "
                                             f"holds [categories, vectors, width] with width 1..{MAX_WIDTH}")
                width = int(info.shape[2])
            enc_width, source = width, f" (metadata '{META}width')" if from_meta else ""
        else:
            enc_width, source = ENCODER_WIDTHS[enc], ""
        expect = (count, vpi, enc_width)
        if info.shape != expect:
            raise MalformedFileError(f"{fname}: '{enc}' has shape {list(info.shape)} but the metadata says "
                                     f"{count} categories x {vpi} vectors x {enc_width}{source} = {list(expect)}")
        dtypes.add(FLOAT_DTYPES[info.dtype])
    if len(dtypes) > 1:
        raise MalformedFileError(f"{fname}: bank tensors have different dtypes")
    return dtypes.pop(), width
