"""Reading and writing ``.safetensors`` files defensively.

The safetensors header is validated here, in Python, *before* the file is handed to the safetensors
library: the 8-byte length is bounded, the JSON is parsed with duplicate-key detection, and every tensor's
dtype, shape and byte range is checked against the file size. Only then is the file memory-mapped with
``safetensors.safe_open``. Anything wrong raises :class:`~productbg.weights.errors.WeightsError`.

Pickle-based formats (``.pt``, ``.bin``, ``.ckpt``, ...) are refused by name and never opened.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import safetensors.torch
from safetensors import safe_open

from ..fileio import write_atomically
from .errors import MalformedFileError, WeightsError

#: Largest header we accept (the safetensors library's own limit).
MAX_HEADER_BYTES = 100_000_000

#: Bytes per element of every dtype we understand.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

#: Floating dtypes allowed for learned weights, and their torch equivalents.
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
}

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header.

    Attributes:
        dtype: safetensors dtype string, e.g. ``"F16"``.
        shape: tensor shape.
        begin: first byte, relative to the start of the data section.
        end: one past the last byte, relative to the start of the data section.
    """

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A validated safetensors header.

    Attributes:
        path: the file it was read from.
        tensors: tensor name -> :class:`TensorInfo`, in file order.
        metadata: the ``__metadata__`` string map (empty if absent).
        file_size: size of the file in bytes.
    """

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    file_size: int = 0


def check_suffix(path: str | os.PathLike) -> Path:
    """Refuse anything but ``.safetensors``; explain how to convert pickle files.

    Args:
        path: the file a user gave us.

    Returns:
        The path as a :class:`~pathlib.Path`.

    Raises:
        WeightsError: for a pickle-based format (saying why and how to convert) or any other non-``.safetensors``
            name.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise WeightsError(
            f"{p.name}: {suffix} files are Python pickles, and unpickling can run arbitrary code, so productbg "
            "never opens them. Convert it once, in an environment you trust, to .safetensors (e.g. load it with "
            "torch.load(path, weights_only=True), flatten nested dicts to 'group.key' names, and write it with "
            "safetensors.torch.save_file), or download the .safetensors release of the same weights."
        )
    if suffix != ".safetensors":
        raise WeightsError(f"{p.name}: only .safetensors files are read (got '{suffix or 'no extension'}')")
    return p


def read_header(path: str | os.PathLike) -> Header:
    """Read and fully validate the header of a safetensors file, without touching tensor data.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        The validated :class:`Header`.

    Raises:
        WeightsError: if the file is unsafe, unreadable or malformed.
    """
    p = check_suffix(path)
    try:
        with open(p, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            n = _read_header_length(fh.read(8), size, p)
            raw = fh.read(n)
    except OSError as e:
        raise WeightsError(f"{p.name}: cannot read file ({e.strerror or e})") from None
    if len(raw) != n:
        raise MalformedFileError(f"{p.name}: file is truncated inside its header")
    doc = _parse_header_json(raw, p)
    metadata = _parse_metadata(doc.pop("__metadata__", None), p)
    for name in doc:
        _check_unicode(name, p)
    tensors = {name: _parse_entry(name, entry, p) for name, entry in doc.items()}
    _check_layout(tensors, size - 8 - n, p)
    return Header(path=p, tensors=tensors, metadata=metadata, file_size=size)


def _read_header_length(prefix: bytes, size: int, p: Path) -> int:
    if len(prefix) < 8:
        raise MalformedFileError(f"{p.name}: file is {size} bytes, too short to be safetensors (truncated?)")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES:
        raise MalformedFileError(f"{p.name}: header claims {n} bytes (limit {MAX_HEADER_BYTES}); not a valid file")
    if n > size - 8:
        raise MalformedFileError(f"{p.name}: header claims {n} bytes but the file has only {size - 8} after the "
                                 "length field (truncated?)")
    if n < 2:
        raise MalformedFileError(f"{p.name}: header is {n} bytes; too short for a JSON object")
    return n


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    """A header key given twice; not a ValueError, so that the reader tells it apart from invalid JSON."""


def _parse_header_json(raw: bytes, p: Path) -> dict[str, Any]:
    if not raw.lstrip().startswith(b"{"):
        raise MalformedFileError(f"{p.name}: header is not a JSON object (not a safetensors file?)")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise MalformedFileError(f"{p.name}: header names '{e.args[0]}' twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise MalformedFileError(f"{p.name}: header is not valid UTF-8 JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict):
        raise MalformedFileError(f"{p.name}: header is not a JSON object")
    return doc


def _parse_metadata(meta: Any, p: Path) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise MalformedFileError(f"{p.name}: __metadata__ must map strings to strings")
    for k, v in meta.items():
        _check_unicode(k, p)
        _check_unicode(v, p)
    return dict(meta)


def _check_unicode(text: str, p: Path) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedFileError(f"{p.name}: header holds an invalid Unicode escape (lone surrogate)") from None


def parse_json_value(text: str, what: str, p: Path) -> Any:
    """Parse a JSON document stored in a metadata string; reject bad JSON and invalid Unicode."""
    try:
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):
        raise MalformedFileError(f"{p.name}: metadata '{what}' is not valid JSON") from None
    except UnicodeEncodeError:
        raise MalformedFileError(f"{p.name}: metadata '{what}' holds an invalid Unicode escape") from None
    return value


def _is_int(x: Any) -> bool:
    return type(x) is int  # bool is an int subclass; reject it


def _parse_entry(name: str, entry: Any, p: Path) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise MalformedFileError(f"{p.name}: tensor '{name}' entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise MalformedFileError(f"{p.name}: tensor '{name}' has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise MalformedFileError(f"{p.name}: tensor '{name}' has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise MalformedFileError(f"{p.name}: tensor '{name}' has invalid data_offsets {offsets!r}")
    info = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    if info.end - info.begin != info.numel * DTYPE_SIZES[dtype]:
        raise MalformedFileError(
            f"{p.name}: tensor '{name}' is {dtype} {list(shape)} = {info.numel * DTYPE_SIZES[dtype]} bytes but its "
            f"data_offsets span {info.end - info.begin}"
        )
    return info


def _check_layout(tensors: Mapping[str, TensorInfo], data_size: int, p: Path) -> None:
    pos = 0
    for name, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != pos:
            raise MalformedFileError(f"{p.name}: tensor '{name}' data does not start where the previous ends "
                                     "(overlap or gap)")
        pos = info.end
    if pos != data_size:
        raise MalformedFileError(f"{p.name}: tensors cover {pos} bytes but the data section is {data_size} bytes "
                                 "(truncated or padded file)")


class SafeReader:
    """A memory-mapped, validated safetensors file; tensors are read on demand.

    Use as a context manager or call :meth:`close`.

    Args:
        path: a ``.safetensors`` file.
        header: an already-validated header for that file (read here if omitted).
    """

    def __init__(self, path: str | os.PathLike, header: Header | None = None) -> None:
        self.header = header or read_header(path)
        self.path = self.header.path
        self._handle = _guarded(self.path, lambda: _open(self.path))

    def tensor(self, name: str) -> torch.Tensor:
        """Read one whole tensor (a copy); raises WeightsError if it holds NaN or inf."""
        t = _guarded(self.path, lambda: self._handle.get_tensor(name).clone())
        return check_finite(t, name, self.path)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Read rows ``start:stop`` of the first dimension of a tensor; NaN/inf raise WeightsError."""
        t = _guarded(self.path, lambda: self._handle.get_slice(name)[start:stop].clone())
        return check_finite(t, f"{name}[{start}:{stop}]", self.path)

    def close(self) -> None:
        """Release the memory map."""
        handle, self._handle = self._handle, None
        if handle is not None and hasattr(handle, "__exit__"):
            handle.__exit__(None, None, None)

    def __enter__(self) -> "SafeReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open(path: Path) -> Any:
    handle = safe_open(str(path), framework="pt", device="cpu")
    return handle.__enter__() if hasattr(handle, "__enter__") else handle


def _guarded(path: Path, fn: Any) -> Any:
    """Run a safetensors call; turn anything it raises (even a Rust panic) into WeightsError."""
    try:
        return fn()
    except WeightsError:
        raise
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as e:  # pyo3's PanicException derives from BaseException
        raise MalformedFileError(f"{path.name}: safetensors could not read it ({type(e).__name__}: {e})") from None


def check_finite(t: torch.Tensor, what: str, path: Path | None = None) -> torch.Tensor:
    """Return ``t`` unchanged if it has no NaN/inf, else raise WeightsError naming it."""
    if t.is_floating_point() and t.numel() and not _all_finite(t):
        where = f"{path.name}: " if path else ""
        raise MalformedFileError(f"{where}tensor '{what}' contains NaN or infinite values")
    return t


def _all_finite(t: torch.Tensor) -> bool:
    # A sum is non-finite whenever an element is NaN/inf, and it is much faster than isfinite() on CPU for
    # half precision. Only when the sum itself overflows do we pay for the element-wise check.
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(t.sum(dtype=acc))):
        return True
    return bool(torch.isfinite(t).all())


def load_all(path: str | os.PathLike, names: Iterable[str] | None = None) -> tuple[dict[str, torch.Tensor], Header]:
    """Validate a file and read (some of) its tensors fully, checking each is finite.

    Args:
        path: a ``.safetensors`` file.
        names: tensors to read; all if omitted.

    Returns:
        (tensors, header).
    """
    with SafeReader(path) as reader:
        wanted = list(reader.header.tensors) if names is None else list(names)
        return {n: reader.tensor(n) for n in wanted}, reader.header


def require_float(header: Header, names: Iterable[str] | None = None) -> None:
    """Raise WeightsError unless the named tensors (default: all) have a float dtype."""
    for name in names if names is not None else header.tensors:
        dtype = header.tensors[name].dtype
        if dtype not in FLOAT_DTYPES:
            raise MalformedFileError(f"{header.path.name}: tensor '{name}' has dtype {dtype}; expected one of "
                                     f"{', '.join(FLOAT_DTYPES)}")


def atomic_save(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file atomically: temp file in the same folder, fsync, ``os.replace``.

    A reader never sees a half-written file, and a crash leaves the previous file intact.

    Args:
        tensors: name -> tensor (made contiguous, moved to CPU).
        path: destination ``.safetensors`` path.
        metadata: string -> string header metadata.

    Returns:
        The destination path.
    """
    dest = Path(path)
    if dest.suffix.lower() != ".safetensors":
        raise WeightsError(f"{dest.name}: weight files are written as .safetensors only")
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    # safetensors.torch.save_file looked up per call, so that a test can make it fail half-way
    return write_atomically(dest, lambda tmp: safetensors.torch.save_file(clean, tmp, metadata=dict(metadata or {})), fsync=True)
