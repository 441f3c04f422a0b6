"""Merging category banks into a new one, for the people who curate them (``productbg bank merge``).

:func:`merge_banks` builds a fresh :class:`~.bank.CategoryBank` from several banks of **one family** (and, for
"tiny" banks, one width): banks of different families are never mixed, since identifier vectors only fit the
text encoder they were made for. Banks with different vectors per identifier merge into a bank whose maximum
is the largest, each category keeping its own vectors (a schema-2 file when the counts differ). The vectors'
dtype is the narrowest that holds every input exactly (float16 + bfloat16 -> float32), so every category reads
back bit for bit.

Conflicts are reported, never resolved silently: two categories of the same name (or names that differ only
in letter case, which lookup could not tell apart) with different vectors, LoRA or preview are a conflict;
with ``on_conflict="error"`` (the default) :class:`MergeConflictError` lists every one and nothing is built.
``"keep"`` keeps the first bank's category, ``"replace"`` takes the last one's. The same category with the
same contents in two banks is not a conflict. Banks with different prompt templates need ``template=``.
Previews (:mod:`.bank_previews`) are compared here; the caller copies them (``MergeReport.origin`` says from
where) once the merged bank is written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .bank import CategoryBank
from .bank_previews import read_preview
from .errors import WeightsError

ON_CONFLICT = ("error", "keep", "replace")


class MergeConflictError(WeightsError):
    """Two banks disagree about a category (or the template); ``conflicts`` holds one line per problem
    (``productbg bank merge`` catches it to print each one)."""

    def __init__(self, conflicts: list[str]) -> None:
        self.conflicts = list(conflicts)
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        super().__init__(f"{len(conflicts)} merge conflict{'s' if len(conflicts) != 1 else ''}: {conflicts[0]}{more}")


@dataclass
class MergeReport:
    """What a merge did: categories taken from each bank, identical duplicates, conflicts resolved and how."""

    added: dict[str, int] = field(default_factory=dict)  # bank label -> categories it contributed
    identical: list[str] = field(default_factory=list)
    resolved: list[str] = field(default_factory=list)
    origin: dict[str, tuple[CategoryBank, str]] = field(default_factory=dict)  # merged name -> (bank, its name)


def _label(bank: CategoryBank, i: int) -> str:
    return bank.path.name if bank.path is not None else f"bank {i + 1}"


def _check_family(banks: Sequence[CategoryBank], labels: list[str]) -> None:
    first = banks[0]
    for bank, label in zip(banks[1:], labels[1:]):
        if bank.family != first.family:
            raise WeightsError(f"cannot merge {label} ({bank.family} bank) with {labels[0]} ({first.family} bank): "
                               "identifier vectors only fit the text encoder they were made for; banks of different "
                               "families are never mixed")
        for enc in first.encoders:
            mine, theirs = first._width(enc), bank._width(enc)
            if mine is not None and theirs is not None and mine != theirs:
                raise WeightsError(f"cannot merge {label} ({enc} width {theirs}) with {labels[0]} ({enc} width "
                                   f"{mine}): identifier vectors only fit the text encoder they were made for")


def _dtype(banks: Sequence[CategoryBank]) -> torch.dtype:
    dtype = banks[0].dtype
    for bank in banks[1:]:
        dtype = torch.promote_types(dtype, bank.dtype)
    return dtype


def _difference(a: CategoryBank, name_a: str, b: CategoryBank, name_b: str) -> str | None:
    """What differs between two categories ("vectors", "LoRA", "preview"), or None when they are the same
    (vectors compared exactly, as float64)."""
    ca, cb = a.get(name_a), b.get(name_b)
    if any(not torch.equal(ca.vectors[e].double(), cb.vectors[e].double()) for e in a.encoders):
        return "vectors"
    if ca.lora != cb.lora:
        return "LoRA"
    if _preview(a, name_a) != _preview(b, name_b):
        return "preview"
    return None


def _preview(bank: CategoryBank, name: str) -> bytes | None:
    return read_preview(bank.path, name) if bank.path is not None else None


def merge_banks(banks: Sequence[CategoryBank], on_conflict: str = "error",
                template: str | None = None) -> tuple[CategoryBank, MergeReport]:
    """A new in-memory bank holding every category of ``banks`` (read now), in order.

    Args:
        banks: two or more banks of one family (and width).
        on_conflict: ``"error"``, ``"keep"`` (the first bank's category wins) or ``"replace"`` (the last wins).
        template: the merged bank's prompt template; needed when the banks' templates differ.

    Returns:
        (the merged bank, a :class:`MergeReport`).

    Raises:
        MergeConflictError: conflicts with ``on_conflict="error"``, or different templates without ``template``.
        WeightsError: banks of different families or widths, a bad template or option.
    """
    if on_conflict not in ON_CONFLICT:
        raise WeightsError(f"on_conflict must be one of {', '.join(ON_CONFLICT)}, not {on_conflict!r}")
    if len(banks) < 2:
        raise WeightsError("merging needs at least two banks")
    labels = [_label(b, i) for i, b in enumerate(banks)]
    _check_family(banks, labels)
    templates = {b.template for b in banks}
    if template is None and len(templates) > 1:
        raise MergeConflictError([f"the banks' prompt templates differ ({', '.join(repr(t) for t in sorted(templates))}); "
                                  "choose one with --template"])
    vpi = max(b.vectors_per_id for b in banks)
    varied = any(b.varied_counts for b in banks) or len({b.vectors_per_id for b in banks}) > 1
    merged = CategoryBank(banks[0].family, vectors_per_id=vpi, template=template or banks[0].template,
                          training={"merged_from": [{"file": lab, **b.training} for lab, b in zip(labels, banks)]},
                          dtype=_dtype(banks), width=banks[0].width, varied_counts=varied)
    owner: dict[str, tuple[CategoryBank, str, str]] = {}  # casefolded name -> (bank, stored name, label)
    order: list[str] = []
    conflicts: list[str] = []
    report = MergeReport()
    for bank, label in zip(banks, labels):
        for name in bank.names:
            key = name.casefold()
            if key not in owner:
                owner[key] = (bank, name, label)
                order.append(key)
                continue
            first_bank, first_name, first_label = owner[key]
            diff = _difference(first_bank, first_name, bank, name)
            if first_name == name and diff is None:
                report.identical.append(name)
                continue
            what = "differ only in letter case" if first_name != name else f"have different {diff}"
            line = f"'{first_name}' ({first_label}) and '{name}' ({label}) {what}"
            if on_conflict == "error":
                conflicts.append(line)
            elif on_conflict == "replace":
                owner[key] = (bank, name, label)
                report.resolved.append(f"{line}: took {label}'s")
            else:
                report.resolved.append(f"{line}: kept {first_label}'s")
    if conflicts:
        raise MergeConflictError(conflicts)
    for key in order:
        bank, name, label = owner[key]
        category = bank.get(name)
        merged.add(name, dict(category.vectors), lora=category.lora)
        report.origin[name] = (bank, name)
        report.added[label] = report.added.get(label, 0) + 1
    return merged, report
