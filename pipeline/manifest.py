"""Batch manifests: CSV or JSONL rows of (product, category, reference, seed), validated row by row.

Columns / keys (CSV needs a header row; JSONL one object per line):

    product    required  image path (relative paths are relative to the manifest's folder)
    category   optional  category name (empty = none)
    reference  optional  reference image for the style
    seed       optional  integer (default: --seed)
    n          optional  images for this row (default: --n)
    name       optional  output folder inside --out (default: <product stem>-<category>-s<seed>)

A row that cannot be used becomes a :class:`Row` with ``error`` set — reported and skipped by the batch,
never fatal. Output names are checked to stay inside ``--out``: absolute paths, ``..``, backslashes, drive
letters and names that resolve (through symlinks) outside it are refused. Sharding splits rows by index:
process ``r`` of ``w`` takes rows ``i`` with ``i mod w == r`` — disjoint, and together every row.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from ..fileio import not_a_file
from .errors import PipelineError

MAX_SEED = 2 ** 63 - 1
MAX_ROW_IMAGES = 64  # at 512²; the CLI passes the bound for its --size
COLUMNS = ("product", "category", "reference", "seed", "n", "name")
MAX_NAME_CHARS = 200
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Row:
    """One manifest row.

    Attributes:
        line: line number in the manifest (for messages).
        product, reference: resolved image paths (reference may be None).
        category: category name or None. seed: first seed. n: images for this row.
        name: output folder relative to --out ('/'-separated).
        error: why the row cannot be used (None when it can).
    """

    line: int
    product: Path | None = None
    category: str | None = None
    reference: Path | None = None
    seed: int = 0
    n: int = 1
    name: str = ""
    error: str | None = None

    def describe(self) -> dict[str, Any]:
        """JSON-ready identification of the row."""
        return {"line": self.line, "name": self.name or None, "product": str(self.product) if self.product else None}


@dataclass(frozen=True)
class Shard:
    """Which part of the manifest this process runs: rows ``i`` with ``i % count == index``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise PipelineError(f"invalid shard {self.index} of {self.count}")

    def take(self, rows: list[Row]) -> list[Row]:
        """This shard's rows, in manifest order."""
        return rows[self.index::self.count]


def shard_from_env(env: dict[str, str] | None = None) -> Shard:
    """The shard of this process under ``accelerate launch`` / ``torchrun`` (RANK, WORLD_SIZE), else 0 of 1."""
    env = os.environ if env is None else env
    rank, world = _env_integer(env, "RANK", "0"), _env_integer(env, "WORLD_SIZE", "1")
    if world < 1:
        raise PipelineError(f"WORLD_SIZE={world}: the number of processes must be at least 1 (set by accelerate "
                            "launch / torchrun; unset it to run one process)")
    if not 0 <= rank < world:
        raise PipelineError(f"RANK={rank} with WORLD_SIZE={world}: the rank must be from 0 to {world - 1} (each "
                            "process of WORLD_SIZE has its own RANK; unset both to run one process)")
    return Shard(rank, world)


def _env_integer(env: dict[str, str], name: str, default: str) -> int:
    text = env.get(name, default)
    try:
        return int(text)
    except ValueError:
        raise PipelineError(f"{name}={text!r} is not an integer (set by accelerate launch / torchrun; unset it to "
                            "run one process)") from None


# ---------------------------------------------------------------------------------------------- reading
def read_manifest(path: str | os.PathLike, out: str | os.PathLike, default_seed: int = 0,
                  default_n: int = 1, max_n: int = MAX_ROW_IMAGES) -> list[Row]:
    """Read and check every row of a manifest.

    Args:
        path: ``.csv`` or ``.jsonl`` manifest.
        out: the output folder (names are checked to stay inside it).
        default_seed, default_n: values for rows without ``seed`` / ``n``.
        max_n: the most images a row may ask for (memory); rows above it fail.

    Returns:
        Rows in manifest order; unusable ones carry ``error``. Duplicate output names: the later rows fail.

    Raises:
        PipelineError: the manifest itself cannot be read (missing, unknown format, no ``product`` column).
    """
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"manifest not found: {path}")
    raw = list(_jsonl(path) if path.suffix.lower() in (".jsonl", ".ndjson") else _csv(path))
    root, out_dir = path.resolve().parent, Path(out).resolve()
    rows = [_row(line, data, root, out_dir, default_seed, default_n, max_n) for line, data in raw]
    return _mark_duplicates(rows)


def _csv(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    if path.suffix.lower() not in (".csv", ".tsv"):
        raise PipelineError(f"{path.name}: a manifest must be .csv, .tsv or .jsonl")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            header = [(c or "").strip() for c in reader.fieldnames or []]
            if "product" not in header:
                raise PipelineError(f"{path.name}: the first line must name the columns, with at least 'product' "
                                    f"(got {header or 'nothing'}); known columns: {', '.join(COLUMNS)}")
            for record in reader:
                row = {(k or "").strip(): v for k, v in record.items() if k is not None}
                if any((v or "").strip() for v in row.values() if isinstance(v, str)):
                    yield reader.line_num, row
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PipelineError(f"{path.name}: cannot read the manifest ({e})") from None


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any] | str]]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path.name}: cannot read the manifest ({e})") from None
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            data = json.loads(text)
        except ValueError as e:
            yield number, f"not valid JSON ({e.msg})"
            continue
        yield number, data if isinstance(data, dict) else "each line must be a JSON object"


def _row(line: int, data: dict[str, Any] | str, root: Path, out: Path, seed: int, n: int, max_n: int) -> Row:
    if isinstance(data, str):
        return Row(line, error=data)
    try:
        return _parse(line, data, root, out, seed, n, max_n)
    except PipelineError as e:
        return Row(line, error=str(e))


def _text(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise PipelineError(f"'{key}' must be text, got {type(value).__name__}")
    return str(value).strip()


def _integer(data: dict[str, Any], key: str, default: int, low: int, high: int = 2 ** 63 - 1) -> int:
    text = _text(data, key)
    if not text:
        return default
    if not re.fullmatch(r"[+-]?\d+", text):
        raise PipelineError(f"'{key}' must be an integer, got {text!r}")
    value = int(text)
    if value < low or value > high:
        raise PipelineError(f"'{key}' must be from {low} to {high}, got {value}")
    return value


def _parse(line: int, data: dict[str, Any], root: Path, out: Path, seed: int, n: int, max_n: int) -> Row:
    product = _text(data, "product")
    if not product:
        raise PipelineError("no product path")
    product_path = _image_path(product, root, "product")
    reference = _text(data, "reference")
    row = Row(line, product_path, _text(data, "category") or None,
              _image_path(reference, root, "reference") if reference else None,
              _integer(data, "seed", seed, 0), _integer(data, "n", n, 1, max_n))
    if row.seed + row.n - 1 > MAX_SEED:
        raise PipelineError(f"'seed' {row.seed} with 'n' {row.n}: the last seed passes {MAX_SEED}")
    name = _text(data, "name") or default_name(row)
    return replace(row, name=safe_name(name, out))


def _image_path(text: str, root: Path, what: str) -> Path:
    p = Path(text).expanduser()
    p = p if p.is_absolute() else root / p
    problem = not_a_file(p)
    if problem:
        raise PipelineError(f"{what} image {p}: {problem}")
    return p


def default_name(row: Row) -> str:
    """``<product stem>-<category>-s<seed>`` with unsafe characters replaced by ``_``."""
    parts = [row.product.stem if row.product else "item", row.category or "", f"s{row.seed}"]
    return "-".join(_UNSAFE.sub("_", p).strip("._") or "x" for p in parts if p)[:MAX_NAME_CHARS]


def safe_name(name: str, out: Path) -> str:
    """Check an output name stays inside ``out``; return it normalised ('/'-separated).

    Raises:
        PipelineError: absolute, ``..``, backslash, drive letter, hidden/empty parts, or escaping via symlinks.
    """
    if "\\" in name or "\x00" in name or re.match(r"^[A-Za-z]:", name):
        raise PipelineError(f"output name {name!r} is not a plain relative path (no backslashes or drives)")
    posix = PurePosixPath(name)
    if posix.is_absolute() or any(p in ("..", ".", "") or p.startswith(".") for p in posix.parts) or not posix.parts:
        raise PipelineError(f"output name {name!r} must stay inside --out (no absolute paths, '..' or hidden parts)")
    if len(name) > MAX_NAME_CHARS:
        raise PipelineError(f"output name is {len(name)} characters; the limit is {MAX_NAME_CHARS}")
    target = (out / Path(*posix.parts)).resolve()
    if target == out or not target.is_relative_to(out):
        raise PipelineError(f"output name {name!r} resolves outside --out ({target})")
    return posix.as_posix()


def _mark_duplicates(rows: list[Row]) -> list[Row]:
    seen: dict[str, int] = {}
    out = []
    for row in rows:
        key = row.name.casefold()
        if row.error is None and key in seen:
            row = replace(row, error=f"output name {row.name!r} is already used by line {seen[key]}")
        elif row.error is None:
            seen[key] = row.line
        out.append(row)
    return out
