"""The category bank: every category's identifier vectors in one ``.safetensors`` file, looked up by name.

:class:`CategoryBank` is the object: :meth:`CategoryBank.load` validates the header and memory-maps the file;
names come from the header and a category's vectors are read only when it is looked up. It is edited in
memory (``add``, ``rename``, ``remove``, ``set_lora``, ``merge``) and saved atomically.

Its parts live beside it, one idea each, and are re-exported here:

* :mod:`.bank_format`: the file layout (schema 1), header reading and writing, and the rules of every field
  (family, width, vectors per identifier, template);
* :mod:`.bank_names`: valid category names, exact / case-insensitive lookup and "did you mean" suggestions;
* :mod:`.category_lora`: :class:`CategoryLora`, a category's reference to a LoRA file in ``models/loras``.

Widths: "sd15" and "sdxl" fix them (768 for ``clip_l``, 1280 for ``clip_g``). A "tiny" bank's width is
whatever its text encoder has: given to the constructor (``width=``), or fixed by the first category added;
every later ``add``, ``merge`` and load is checked against it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from .bank_format import (BANK_KIND, DEFAULT_TEMPLATE, ENCODER_WIDTHS, FAMILY_ENCODERS, FREE_WIDTH_FAMILIES, MAX_VECTORS,
                          MAX_WIDTH, META, SCHEMA_VERSION, TINY_FAMILY, BankMeta, bank_metadata, check_family,
                          check_template, check_vectors_per_id, check_width, is_bank, parse_bank_header)
from .bank_names import MAX_NAME_CHARS, check_name, close_names, find_name, index_names
from .category_lora import CategoryLora, check_lora
from .errors import NameLookupError, WeightsError
from .safefile import FLOAT_DTYPES, SafeReader, atomic_save, check_finite, read_header

__all__ = [
    "Category", "CategoryBank", "CategoryLora", "load_bank", "is_bank",
    "BANK_KIND", "SCHEMA_VERSION", "DEFAULT_TEMPLATE", "ENCODER_WIDTHS", "TINY_FAMILY", "FAMILY_ENCODERS",
    "FREE_WIDTH_FAMILIES", "MAX_WIDTH", "MAX_VECTORS", "MAX_NAME_CHARS", "META",
]


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
    """Where one category's vectors live: a row of an open file (padded to ``vectors_per_id``; the first
    ``count`` are the category's), or its ``[count, width]`` tensors in memory."""

    __slots__ = ("reader", "index", "tensors", "count")

    def __init__(self, reader: SafeReader | None = None, index: int = 0,
                 tensors: dict[str, torch.Tensor] | None = None, count: int | None = None) -> None:
        self.reader, self.index, self.tensors, self.count = reader, index, tensors, count
        if tensors is not None and count is None:
            self.count = int(next(iter(tensors.values())).shape[0])

    def get(self, encoder: str) -> torch.Tensor:
        """The category's own ``[count, width]`` vectors (None count: the whole row)."""
        if self.tensors is not None:
            return self.tensors[encoder]
        assert self.reader is not None
        row = self.reader.rows(encoder, self.index, self.index + 1)[0]
        return row if self.count is None else row[:self.count]


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
        varied_counts: categories may have fewer vectors than ``vectors_per_id`` (each its own count, e.g.
            its description's tokens: ``productbg bank from-text``); saved as a schema-2 file when they do.
            Off (default): every category has exactly ``vectors_per_id``.
    """

    def __init__(self, family: str = "sd15", vectors_per_id: int = 1, template: str = DEFAULT_TEMPLATE,
                 training: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32,
                 width: int | None = None, varied_counts: bool = False, width_g: int | None = None) -> None:
        check_family(family)
        check_vectors_per_id(vectors_per_id)
        check_template(template)
        check_width(family, width)
        check_width(family, width_g, "clip_g")
        if dtype not in FLOAT_DTYPES.values():
            raise WeightsError(f"bank dtype must be a float dtype, got {dtype}")
        free = family in FREE_WIDTH_FAMILIES
        self._meta = BankMeta(family, vectors_per_id, template, dict(training or {}), dtype,
                              width if free else None, width_g if free and "clip_g" in FAMILY_ENCODERS[family] else None)
        self._names: list[str] = []
        self._rows: list[_Row] = []
        self._loras: dict[str, CategoryLora] = {}
        self._index: dict[str, int] = {}
        self._folded: dict[str, list[str]] = {}
        self._reader: SafeReader | None = None
        self.path: Path | None = None
        self.varied_counts = bool(varied_counts)

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
        meta, names, loras = parse_bank_header(header)
        bank = cls(meta.family, meta.vectors_per_id, meta.template, meta.training, meta.dtype, meta.width,
                   varied_counts=meta.counts is not None, width_g=meta.width_g)
        bank._loras = loras
        bank._attach(SafeReader(header.path, header), names, meta.counts)
        return bank

    def _attach(self, reader: SafeReader, names: list[str], counts: list[int] | None = None) -> None:
        self._reader, self.path = reader, reader.path
        self._names = names
        self._rows = [_Row(reader, i, count=None if counts is None else counts[i]) for i in range(len(names))]
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
        """Base model family (``"sd15"``, ``"sdxl"``, ``"flux"``, ``"tiny"`` or ``"tiny-sdxl"``)."""
        return self._meta.family

    @property
    def width(self) -> int | None:
        """Text width of the first encoder's vectors (768 for sd15/sdxl's ``clip_l``, 4096 for flux's ``t5xxl``);
        ``None`` for a tiny bank not yet given one."""
        return self._width(self.encoders[0])

    def _width(self, encoder: str) -> int | None:
        if self._meta.family in FREE_WIDTH_FAMILIES:
            return self._meta.width_g if encoder == "clip_g" else self._meta.width
        return ENCODER_WIDTHS[encoder]

    @property
    def encoders(self) -> tuple[str, ...]:
        """Text encoders that have vectors, e.g. ``("clip_l",)``."""
        return FAMILY_ENCODERS[self._meta.family]

    @property
    def vectors_per_id(self) -> int:
        """Vectors per identifier: the most any category may have (each has its own :meth:`vector_count`)."""
        return self._meta.vectors_per_id

    def vector_count(self, name: str) -> int:
        """How many vectors this category's identifier has (``vectors_per_id`` unless the bank records fewer)."""
        row = self._rows[self._index[self.resolve(name)]]
        return self.vectors_per_id if row.count is None else row.count

    def vector_counts(self) -> list[int]:
        """Every category's vector count, in row order."""
        return [self.vectors_per_id if r.count is None else r.count for r in self._rows]

    @property
    def template(self) -> str:
        """Default prompt template; ``{id}`` marks the identifier."""
        return self._meta.template

    @template.setter
    def template(self, value: str) -> None:
        check_template(value)
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
        return close_names(name, self._names, self._folded, n)

    def _find(self, name: str) -> str | None:
        return find_name(name, self._index, self._folded)

    def _miss_message(self, name: str) -> str:
        where = f" in {self.path.name}" if self.path else ""
        msg = f"no category '{name}'{where} ({len(self)} categories)"
        hints = self.suggest(name)
        return msg + (f"; did you mean {', '.join(repr(h) for h in hints)}?" if hints else "")

    def _reindex(self) -> None:
        self._index, self._folded = index_names(self._names)

    # ------------------------------------------------------------------ editing
    def add(self, name: str, vectors: torch.Tensor | Mapping[str, torch.Tensor], *,
            lora: CategoryLora | None = None, replace: bool = False) -> None:
        """Add a category (or replace one with ``replace=True``).

        Args:
            name: category name (any script; stored NFC-normalized).
            vectors: ``[n, width]`` with ``n`` 1..``vectors_per_id`` (the category's own count; 768 for sd15; a tiny bank's width, or any width for the
                first category of a tiny bank without one), or a mapping encoder -> tensor.
            lora: optional per-category LoRA.
            replace: overwrite an existing category of the same name instead of raising.
        """
        name = check_name(name)
        tensors = self._check_vectors(name, vectors)
        if lora is not None:
            check_lora(name, lora)
        if name in self._index and not replace:
            raise WeightsError(f"category '{name}' already exists (pass replace=True to overwrite)")
        if self.family in FREE_WIDTH_FAMILIES and self._meta.width is None:
            self._meta.width = int(tensors["clip_l"].shape[-1])  # the first vectors fix a tiny bank's width
        if "clip_g" in tensors and self.family in FREE_WIDTH_FAMILIES and self._meta.width_g is None:
            self._meta.width_g = int(tensors["clip_g"].shape[-1])
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
        new = check_name(new)
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
            self._loras[stored] = check_lora(stored, lora)

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
        for enc in self.encoders:
            mine, theirs = self._width(enc), other._width(enc)
            if mine is not None and theirs is not None and mine != theirs:
                what = f"{enc} width" if len(self.encoders) > 1 else "width"
                raise WeightsError(
                    f"cannot merge a {other.family} bank of {what} {theirs} into a {self.family} bank of "
                    f"{what} {mine}: identifier vectors only fit the text encoder they were trained for"
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
            n = "n" if self.varied_counts else str(self.vectors_per_id)
            n_ok = (isinstance(t, torch.Tensor) and t.ndim == 2
                    and (1 <= t.shape[0] <= self.vectors_per_id if self.varied_counts else t.shape[0] == self.vectors_per_id))
            n_rule = f" (n 1..{self.vectors_per_id})" if self.varied_counts else ""
            if width is None:  # a tiny bank's first vectors: any width in range
                if (not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim != 2
                        or not n_ok or not 1 <= t.shape[1] <= MAX_WIDTH):
                    raise WeightsError(f"category '{name}': {enc} vectors must be a float tensor of shape "
                                       f"[{n}, width] (width 1..{MAX_WIDTH}){n_rule}, {got}")
            else:
                if not isinstance(t, torch.Tensor) or not t.is_floating_point() or not n_ok or t.shape[1] != width:
                    fixed = f" (this {self.family} bank's width is {width})" if self.family in FREE_WIDTH_FAMILIES else ""
                    raise WeightsError(f"category '{name}': {enc} vectors must be a float tensor of shape "
                                       f"[{n}, {width}]{fixed}{n_rule}, {got}")
            out[enc] = check_finite(t.detach().to("cpu", self.dtype).clone(), f"{enc} of '{name}'")
        if len({int(t.shape[0]) for t in out.values()}) > 1:
            raise WeightsError(f"category '{name}': every text encoder needs the same number of vectors, got "
                               f"{ {e: int(t.shape[0]) for e, t in out.items()} }")
        return out

    # ------------------------------------------------------------------ saving
    def tensors(self) -> dict[str, torch.Tensor]:
        """All vectors stacked: encoder -> ``[categories, vectors, width]`` (reads every row)."""
        cache: dict[tuple[int, str], torch.Tensor] = {}
        out = {}
        for enc in self.encoders:
            rows = [_padded(self._row_tensor(r, enc, cache), self.vectors_per_id) for r in self._rows]
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
        return cache[key][row.index] if row.count is None else cache[key][row.index][:row.count]

    def metadata(self) -> dict[str, str]:
        """The header metadata this bank saves with."""
        return bank_metadata(self._meta, self._names, self._loras, self.vector_counts())

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
        counts = self.vector_counts()
        metadata = self.metadata()
        self._rows = [_Row(tensors={e: stacked[e][i][:counts[i]] for e in self.encoders}) for i in range(len(self))]
        self.close()
        dest = atomic_save(stacked, path, metadata)
        self._attach(SafeReader(dest), list(self._names), counts)
        return dest


def _padded(vectors: torch.Tensor, n: int) -> torch.Tensor:
    """``[count, width]`` vectors padded with zero rows to ``[n, width]`` (a bank row holds ``vectors_per_id``)."""
    if vectors.shape[0] == n:
        return vectors
    return torch.cat([vectors, vectors.new_zeros(n - vectors.shape[0], vectors.shape[1])])



def load_bank(path: str | os.PathLike) -> CategoryBank:
    """Open a category bank lazily. Same as :meth:`CategoryBank.load`."""
    return CategoryBank.load(path)
