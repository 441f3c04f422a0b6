"""Category names in a bank: what a valid name is, and how a query finds one.

Names are stored NFC-normalized. A query matches exactly first, then ignoring letter case (an error when
several stored names differ only in case); a miss suggests close names (difflib, then substrings).
"""
from __future__ import annotations

import difflib
import unicodedata
from typing import Any, Iterable

from .errors import NameLookupError, WeightsError

MAX_NAME_CHARS = 256


def normalize(name: str) -> str:
    """A query as names are stored: stripped, NFC (non-strings pass through)."""
    return unicodedata.normalize("NFC", name.strip()) if isinstance(name, str) else name


def check_name(name: Any) -> str:
    """The stored form of a new category name; :class:`WeightsError` when it is not a valid one."""
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


def index_names(names: Iterable[str]) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Name -> row, and case-folded name -> the stored names that fold to it (in row order)."""
    names = list(names)
    folded: dict[str, list[str]] = {}
    for n in names:
        folded.setdefault(n.casefold(), []).append(n)
    return {n: i for i, n in enumerate(names)}, folded


def find_name(name: Any, index: dict[str, int], folded: dict[str, list[str]]) -> str | None:
    """The stored name a query means, or ``None``; :class:`NameLookupError` for a non-string or an ambiguous query."""
    if not isinstance(name, str):
        raise NameLookupError(f"category names are strings, got {type(name).__name__}")
    query = normalize(name)
    if query in index:
        return query
    matches = folded.get(query.casefold(), [])
    if len(matches) > 1:
        raise NameLookupError(f"'{name}' matches several categories that differ only in case: "
                              f"{', '.join(repr(m) for m in matches)}; use the exact name")
    return matches[0] if matches else None


def close_names(name: Any, names: list[str], folded: dict[str, list[str]], n: int = 3) -> list[str]:
    """Up to ``n`` stored names close to ``name`` (difflib ratio, case-insensitive; then substrings)."""
    if not isinstance(name, str):
        return []
    query = normalize(name).casefold()
    close = difflib.get_close_matches(query, list(folded), n=n, cutoff=0.6)
    out = [s for key in close for s in folded[key]]
    if len(out) < n and query:
        out += [s for s in names if query in s.casefold() and s not in out]
    return out[:n]
